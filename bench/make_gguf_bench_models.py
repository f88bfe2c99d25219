#!/usr/bin/env python3
"""Writes random-weight checkpoints in the shapes of DeepSeek-V2-Lite and DeepSeek-R1-Distill-Qwen-1.5B, and
quantizes each with `tiefsee quantize` to Q8_0 and Q4_K_M, for `compare_llamacpp.py` (never commit them).

Output, under --out (default /tmp/tiefsee-gguf-bench):
  v2-lite/            Hugging Face folder: config.json, model.safetensors (bf16), tokenizer
  v2-lite.q8_0.gguf, v2-lite.q4_k_m.gguf
  r1-qwen-1.5b/       likewise, and r1-qwen-1.5b.q8_0.gguf, r1-qwen-1.5b.q4_k_m.gguf

Shapes (--scale full, the default):
- v2-lite: DeepSeek-V2-Lite's config (hidden 2048, 27 layers, the first dense with intermediate 10944, 16 heads,
  kv_lora_rank 512, qk nope/rope 128/64, v 128, no q_lora, MoE intermediate 1408, 2 shared experts, top-6
  routing, YaRN, vocab 102400) with 8 routed experts instead of 64 (--v2-lite-experts). Scaled down to keep the
  files and their making small on this machine (tiefsee itself now reads bf16 and quantized weights in place):
  64 experts are 15.7B parameters, 31 GB in bf16, while 8 are 3.11B (6.2 GB); and not the layer count, because llama.cpp (0.3.36) accepts a deepseek2 model without q_lora_rank
  only with 26 or 27 layers. This is the model of the llama-bench numbers in /work/shared/FIELD-NOTES.md.
  Note that with exactly 8 experts llama.cpp's Q4_K_M gives attn_output Q5_K (tiefsee does the same).
- r1-qwen-1.5b: DeepSeek-R1-Distill-Qwen-1.5B's config (hidden 1536, 28 layers, 12 heads, 2 KV heads,
  intermediate 8960, q/k/v biases, untied head, vocab 151936): 1.78B parameters.
--scale tiny keeps the layer counts (and so llama.cpp's acceptance) but shrinks every width, for checking the
scripts end to end in seconds.

Tokenizers are the fixtures' (tests/fixtures/models/{deepseek-v2-lite,qwen2}: the real pre-tokenizers, a small
vocabulary); the ids past them are written as llama.cpp's converter does ([PAD{id}], unused). Benchmarks use
random ids, so the vocabulary's content does not matter, only the embedding and head sizes.

Weights: normal(0, 0.02) (norms 1), bf16, written with a small streaming safetensors writer (numpy only: no
torch needed).

Usage: python3 bench/make_gguf_bench_models.py [--out DIR] [--scale full|tiny] [--only v2-lite|r1-qwen-1.5b]
       [--types q8_0,q4_k_m] [--tiefsee target/release/tiefsee]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "models"


def v2_lite_config(scale: str, experts: int) -> dict:
    tiny = scale == "tiny"
    return {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "hidden_act": "silu",
        "hidden_size": 64 if tiny else 2048,
        "intermediate_size": 128 if tiny else 10944,
        "moe_intermediate_size": 32 if tiny else 1408,
        "num_hidden_layers": 27,
        "num_attention_heads": 4 if tiny else 16,
        "num_key_value_heads": 4 if tiny else 16,
        "q_lora_rank": None,
        "kv_lora_rank": 32 if tiny else 512,
        "qk_nope_head_dim": 16 if tiny else 128,
        "qk_rope_head_dim": 8 if tiny else 64,
        "v_head_dim": 16 if tiny else 128,
        "first_k_dense_replace": 1,
        "n_routed_experts": experts,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "n_group": 1,
        "topk_group": 1,
        "topk_method": "greedy",
        "scoring_func": "softmax",
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "moe_layer_freq": 1,
        "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
        "attention_bias": False,
        "tie_word_embeddings": False,
        "vocab_size": 1024 if tiny else 102400,
        "torch_dtype": "bfloat16",
    }


def r1_qwen_config(scale: str) -> dict:
    tiny = scale == "tiny"
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": 96 if tiny else 1536,
        "intermediate_size": 256 if tiny else 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "max_position_embeddings": 131072,
        "max_window_layers": 21,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000,
        "sliding_window": 4096,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "vocab_size": 1024 if tiny else 151936,
        "torch_dtype": "bfloat16",
    }


def deepseek_tensors(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, heads = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    out = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (heads * qk, h)),
            (f"{p}.self_attn.kv_a_proj_with_mqa.weight", (c["kv_lora_rank"] + c["qk_rope_head_dim"], h)),
            (f"{p}.self_attn.kv_a_layernorm.weight", (c["kv_lora_rank"],)),
            (f"{p}.self_attn.kv_b_proj.weight", (heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"])),
            (f"{p}.self_attn.o_proj.weight", (h, heads * c["v_head_dim"])),
        ]
        if i < c["first_k_dense_replace"]:
            inter = c["intermediate_size"]
            out += [
                (f"{p}.mlp.gate_proj.weight", (inter, h)),
                (f"{p}.mlp.up_proj.weight", (inter, h)),
                (f"{p}.mlp.down_proj.weight", (h, inter)),
            ]
            continue
        inter = c["moe_intermediate_size"]
        out.append((f"{p}.mlp.gate.weight", (c["n_routed_experts"], h)))
        for e in range(c["n_routed_experts"]):
            out += [
                (f"{p}.mlp.experts.{e}.gate_proj.weight", (inter, h)),
                (f"{p}.mlp.experts.{e}.up_proj.weight", (inter, h)),
                (f"{p}.mlp.experts.{e}.down_proj.weight", (h, inter)),
            ]
        shared = inter * c["n_shared_experts"]
        out += [
            (f"{p}.mlp.shared_experts.gate_proj.weight", (shared, h)),
            (f"{p}.mlp.shared_experts.up_proj.weight", (shared, h)),
            (f"{p}.mlp.shared_experts.down_proj.weight", (h, shared)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (c["vocab_size"], h))]
    return out


def qwen_tensors(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, heads, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    d = h // heads
    inter = c["intermediate_size"]
    out = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (heads * d, h)),
            (f"{p}.self_attn.q_proj.bias", (heads * d,)),
            (f"{p}.self_attn.k_proj.weight", (kv * d, h)),
            (f"{p}.self_attn.k_proj.bias", (kv * d,)),
            (f"{p}.self_attn.v_proj.weight", (kv * d, h)),
            (f"{p}.self_attn.v_proj.bias", (kv * d,)),
            (f"{p}.self_attn.o_proj.weight", (h, heads * d)),
            (f"{p}.mlp.gate_proj.weight", (inter, h)),
            (f"{p}.mlp.up_proj.weight", (inter, h)),
            (f"{p}.mlp.down_proj.weight", (h, inter)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (c["vocab_size"], h))]
    return out


def to_bf16(x: np.ndarray) -> np.ndarray:
    """f32 -> bf16 bits, rounding to nearest even (as torch does)."""
    bits = x.astype(np.float32).view(np.uint32)
    bits = bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))
    return (bits >> 16).astype(np.uint16)


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int) -> None:
    """Streams random bf16 tensors into one safetensors file: the header first, then each tensor."""
    header, offset = {}, 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name, shape in tensors:
            if name.endswith("norm.weight"):
                f.write(to_bf16(np.ones(shape, dtype=np.float32)).tobytes())
                continue
            # Row by row for the big ones: at most ~100M values in memory at a time.
            rows = shape[0]
            per = max(1, 100_000_000 // max(1, int(np.prod(shape[1:]))))
            for start in range(0, rows, per):
                part = (min(per, rows - start), *shape[1:])
                f.write(to_bf16(rng.standard_normal(part, dtype=np.float32) * 0.02).tobytes())


def write_model(out: Path, config: dict, tensors: list, tokenizer_from: Path, seed: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fixture_config = json.loads((tokenizer_from / "config.json").read_text())
    for key in ("bos_token_id", "eos_token_id"):
        if key in fixture_config:
            config[key] = fixture_config[key]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, out / name)
    n = sum(int(np.prod(s)) for _, s in tensors)
    print(f"{out.name}: {n / 1e9:.3f}B parameters, writing {n * 2 / 2**30:.1f} GiB of bf16", flush=True)
    write_safetensors(out / "model.safetensors", tensors, seed)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/tiefsee-gguf-bench"))
    ap.add_argument("--scale", choices=["full", "tiny"], default="full")
    ap.add_argument("--v2-lite-experts", type=int, default=8, help="routed experts (DeepSeek-V2-Lite has 64)")
    ap.add_argument("--only", choices=["v2-lite", "r1-qwen-1.5b"])
    ap.add_argument("--types", default="q8_0,q4_k_m")
    ap.add_argument("--tiefsee", type=Path, default=REPO / "target" / "release" / "tiefsee")
    args = ap.parse_args()

    models = {
        "v2-lite": lambda: (v2_lite_config(args.scale, args.v2_lite_experts), deepseek_tensors, "deepseek-v2-lite"),
        "r1-qwen-1.5b": lambda: (r1_qwen_config(args.scale), qwen_tensors, "qwen2"),
    }
    for seed, (name, make) in enumerate(models.items()):
        if args.only and name != args.only:
            continue
        config, tensors_of, tokenizer = make()
        folder = args.out / name
        write_model(folder, config, tensors_of(config), FIXTURES / tokenizer, seed)
        for ty in args.types.split(","):
            gguf = args.out / f"{name}.{ty}.gguf"
            print(f"quantizing {gguf.name}", flush=True)
            subprocess.run(
                [str(args.tiefsee), "quantize", "--model", str(folder), "--out", str(gguf), "--type", ty],
                check=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
