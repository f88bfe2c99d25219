"""Writes a random DeepSeek-V3-architecture checkpoint big enough for serving benchmarks (never committed).

The fixture model (hidden 96, 3 layers) is so small that HTTP and scheduling overheads swamp the model;
this one has hidden 512, 8 layers (the first dense), 16 routed experts + 1 shared, about 55M parameters
(about 20M active per token), in bf16 as DeepSeek publishes. The tokenizer is the fixture's (vocab 704).
The MTP layer is left out (`num_nextn_predict_layers: 0`), and the end-of-sequence rows of `lm_head` are
zeroed: their logit is then exactly 0 while the largest of the other 700 logits is always positive, so
greedy decoding never ends early and every benchmark request generates exactly `max_tokens`. Weights are initialized, converted to the
published layout and saved with tests/fixtures/make_models.py's own functions.

`--fp8` writes the same model in DeepSeek's FP8 release format instead (e4m3 decoder-layer weights with one
`weight_scale_inv` per 128x128 block, the rest bf16), by default to /tmp/tiefsee-bench-model-fp8.

Usage: .venv/bin/python bench/make_bench_model.py [--fp8] [--out /tmp/tiefsee-bench-model]
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "models" / "deepseek-v3"
sys.path.insert(0, str(REPO / "tests" / "fixtures"))
import make_models  # noqa: E402


def bench_variant(vocab_size: int, fp8: bool) -> make_models.Variant:
    config = make_models.deepseek_common() | {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_size": 512,
        "intermediate_size": 1408,
        "moe_intermediate_size": 256,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "q_lora_rank": 192,
        "kv_lora_rank": 128,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32,
        "v_head_dim": 64,
        "first_k_dense_replace": 1,
        "n_routed_experts": 16,
        "n_shared_experts": 1,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "num_nextn_predict_layers": 0,
        "max_position_embeddings": 2048,
        "rope_scaling": {
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 512,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "vocab_size": vocab_size,
    }
    if fp8:
        config["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [make_models.FP8_BLOCK, make_models.FP8_BLOCK],
        }
    return make_models.Variant("deepseek-v3-bench", "deepseek-v3", config, torch.bfloat16, seed=7013, fp8=fp8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp8", action="store_true", help="DeepSeek's block-scaled FP8 release format")
    parser.add_argument("--out", type=Path, default=None,
                        help="default /tmp/tiefsee-bench-model, or /tmp/tiefsee-bench-model-fp8 with --fp8")
    args = parser.parse_args()

    fixture_config = json.loads((FIXTURE / "config.json").read_text())
    variant = bench_variant(fixture_config["vocab_size"], args.fp8)
    out = args.out or Path("/tmp/tiefsee-bench-model-fp8" if args.fp8 else "/tmp/tiefsee-bench-model")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(FIXTURE / name, out / name)
    config = dict(variant.config)
    config.update(bos_token_id=fixture_config["bos_token_id"], eos_token_id=fixture_config["eos_token_id"],
                  torch_dtype=make_models.DTYPE_NAMES[variant.storage],
                  transformers_version=transformers.__version__)
    make_models.write_json(out / "config.json", dict(sorted(config.items())))

    with make_models.quiet_transformers():
        hf_config = transformers.AutoConfig.from_pretrained(out)
    torch.manual_seed(variant.seed)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32, attn_implementation="eager").eval()
    make_models.init_weights(model, variant)
    eos = config["eos_token_id"]
    with torch.no_grad():
        model.lm_head.weight[eos if isinstance(eos, list) else [eos]] = 0.0
    stored = make_models.to_storage(make_models.published_tensors(model, variant), variant)
    make_models.save_checkpoint(out, stored, variant.shards)
    params = sum(t.numel() for t in stored.values())
    print(f"wrote {out}: {params / 1e6:.1f}M parameters, {len(stored)} tensors")


if __name__ == "__main__":
    main()
