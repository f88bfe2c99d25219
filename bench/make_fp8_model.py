"""Converts a DeepSeek checkpoint folder (bf16/f16/f32 safetensors) to DeepSeek's FP8 release format, for
measuring FP8 checkpoints at size (never commit the output).

The conversion is tests/fixtures/make_models.py's (`is_fp8_weight`, and `quantize_fp8`'s arithmetic done for all
blocks at once): every 2-D linear weight inside a decoder layer becomes e4m3 with one f32 `weight_scale_inv` per
128x128 block (amax / 448, partial blocks at the edges), everything else keeps its dtype, and config.json gains
the `quantization_config` DeepSeek-V3 ships. Tensors are converted one at a time.

Usage: .venv/bin/python bench/make_fp8_model.py SRC_DIR OUT_DIR
  e.g. .venv/bin/python bench/make_fp8_model.py /tmp/tiefsee-gguf-bench/v2-lite /tmp/tiefsee-gguf-bench/v2-lite-fp8
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "fixtures"))
import make_models  # noqa: E402

BLOCK = make_models.FP8_BLOCK


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`make_models.quantize_fp8` for all blocks at once: (e4m3 [out, in], scale_inv f32 [ceil(out/128),
    ceil(in/128)])."""
    rows, cols = w.shape
    nr, nc = -(-rows // BLOCK), -(-cols // BLOCK)
    padded = torch.zeros(nr * BLOCK, nc * BLOCK, dtype=torch.float32)
    padded[:rows, :cols] = w.to(torch.float32)
    blocks = padded.view(nr, BLOCK, nc, BLOCK)
    scale_inv = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / make_models.FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).to(torch.float8_e4m3fn).view(nr * BLOCK, nc * BLOCK)
    return q[:rows, :cols].contiguous(), scale_inv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()

    config = json.loads((args.src / "config.json").read_text())
    if not config.get("model_type", "").startswith("deepseek"):
        sys.exit(f"{args.src}: not a DeepSeek checkpoint (model_type {config.get('model_type')!r})")
    if "quantization_config" in config:
        sys.exit(f"{args.src}: already quantized ({config['quantization_config']})")
    files = sorted(args.src.glob("*.safetensors"))
    if not files:
        sys.exit(f"{args.src}: no safetensors files")
    args.out.mkdir(parents=True, exist_ok=True)
    for f in args.src.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, args.out / f.name)
    config["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [BLOCK, BLOCK],
    }
    make_models.write_json(args.out / "config.json", config)

    weight_map = {}
    fp8_params = 0
    for f in files:
        out = {}
        with safe_open(f, framework="pt") as src:
            for name in src.keys():
                t = src.get_tensor(name)
                if make_models.is_fp8_weight(name, t):
                    out[name], out[name + "_scale_inv"] = quantize_fp8(t)
                    fp8_params += t.numel()
                else:
                    out[name] = t
        save_file(out, args.out / f.name, metadata={"format": "pt"})
        weight_map.update({name: f.name for name in out})
    if len(files) > 1:
        make_models.write_json(args.out / "model.safetensors.index.json",
                               {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))})
    print(f"wrote {args.out}: {fp8_params / 1e6:.1f}M weights in FP8, {len(weight_map)} tensors")


if __name__ == "__main__":
    main()
