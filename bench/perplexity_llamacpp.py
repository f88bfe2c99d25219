#!/usr/bin/env python3
"""Perplexity of llama.cpp and tiefsee on the same GGUF files and the same text, with their ratio.

llama.cpp runs in-process through llama-cpp-python (0.3.36): the text is tokenized by llama.cpp itself
(BOS as the vocabulary asks), evaluated in one batch with logits for every position, and the perplexity is
exp(mean negative log-likelihood of tokens 1..n-1). tiefsee runs as `tiefsee perplexity --json` with a
context of at least the text's length, so both score the same tokens in one window; the script checks that
both counted the same number of tokens (the tokenizers agree id for id on the fixtures' texts, see
tests/fixtures/gguf-models/tokenize.json).

With `--exact-reference`, each quantized file is also rewritten with every tensor dequantized to F32 (the
`gguf` package's dequantization: the exact weights, no 8-bit activations) and tiefsee's perplexity on that copy
is printed as the reference each engine's quantized result can be measured against; when the two engines
disagree, this says which one departs from the weights the file holds.

Usage:
  .venv/bin/python bench/perplexity_llamacpp.py FILE.gguf [FILE.gguf ...] [--text FILE] [--tiefsee BIN]
      [--cache-type bf16|f32|q8] [--exact-reference] [--json-out results.json]
With no file: the quantized fixtures (tests/fixtures/gguf-models/*.q8_0.gguf, *.q4_k_m.gguf). With no --text,
a fixed mixed-language text (the golden perplexity texts of the fixtures, repeated to about 300 tokens).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


def default_text() -> str:
    texts = []
    for golden in sorted((FIXTURES / "models").glob("*/golden.json")):
        text = json.loads(golden.read_text()).get("perplexity", {}).get("text")
        if text and text not in texts:
            texts.append(text)
    return " ".join(texts * 2)


def llama_cpp_perplexity(path: Path, text: str, threads: int) -> tuple[float, int]:
    from llama_cpp import Llama  # noqa: PLC0415

    probe = Llama(str(path), vocab_only=True, verbose=False)
    tokens = probe.tokenize(text.encode("utf-8"), add_bos=True, special=True)
    del probe
    n = len(tokens)
    llm = Llama(str(path), n_ctx=n + 8, n_batch=n, n_ubatch=n, n_threads=threads, n_threads_batch=threads,
                logits_all=True, verbose=False)
    llm.eval(tokens)
    logits = np.asarray(llm.scores[:n], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    nll = -sum(log_probs[i - 1, tokens[i]] for i in range(1, n))
    return math.exp(nll / (n - 1)), n


def tiefsee_perplexity(tiefsee: Path, path: Path, text_file: Path, ctx: int, cache_type: str) -> tuple[float, int]:
    out = subprocess.run(
        [str(tiefsee), "perplexity", "--model", str(path), "--file", str(text_file), "--ctx", str(ctx), "--json",
         "--cache-type", cache_type],
        check=True, capture_output=True, text=True,
    )
    result = json.loads(out.stdout)
    return result["perplexity"], result["tokens"]


def dequantized_copy(path: Path, out: Path) -> None:
    """Writes `path` to `out` with its metadata unchanged and every tensor as F32 (F16 ones kept as they are)."""
    import gguf  # noqa: PLC0415

    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(out, reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        kind = field.types[0]
        sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_type=sub_type)
    for tensor in reader.tensors:
        shape = [int(x) for x in reversed(tensor.shape)]
        if tensor.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = np.array(tensor.data).reshape(shape)
        else:
            data = gguf.dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(shape)
        writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--text", type=Path)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--tiefsee", type=Path, default=REPO / "target" / "release" / "tiefsee")
    ap.add_argument("--cache-type", default="bf16", choices=["f32", "bf16", "q8"])
    ap.add_argument("--exact-reference", action="store_true",
                    help="also score an F32 copy with every tensor dequantized (the exact weights)")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    files = args.files or sorted(
        p for p in (FIXTURES / "gguf-models").glob("*.gguf") if p.name.endswith((".q8_0.gguf", ".q4_k_m.gguf"))
    )
    text = args.text.read_text(encoding="utf-8") if args.text else default_text()
    rows = []
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt") as f:
        f.write(text)
        f.flush()
        for path in files:
            peer, peer_tokens = llama_cpp_perplexity(path, text, args.threads)
            ours, our_tokens = tiefsee_perplexity(args.tiefsee, path, Path(f.name), peer_tokens + 8, args.cache_type)
            if ours is None or peer_tokens != our_tokens:
                print(f"{path.name}: llama.cpp scored {peer_tokens} tokens, tiefsee {our_tokens}", file=sys.stderr)
                return 1
            row = {"model": path.name, "tokens": our_tokens, "llama_cpp_ppl": peer, "tiefsee_ppl": ours,
                   "relative_difference": ours / peer - 1}
            if args.exact_reference:
                with tempfile.TemporaryDirectory() as tmp:
                    exact_path = Path(tmp) / "exact.gguf"
                    dequantized_copy(path, exact_path)
                    exact, _ = tiefsee_perplexity(args.tiefsee, exact_path, Path(f.name), peer_tokens + 8, "f32")
                row |= {"exact_weights_ppl": exact, "llama_cpp_vs_exact": peer / exact - 1,
                        "tiefsee_vs_exact": ours / exact - 1}
            rows.append(row)
    print(f"tiefsee cache {args.cache_type}, {args.threads} threads")
    exact = args.exact_reference
    print("| model | tokens | llama.cpp ppl | tiefsee ppl | difference |"
          + (" exact weights ppl | llama.cpp vs exact | tiefsee vs exact |" if exact else ""))
    print("|---|---|---|---|---|" + ("---|---|---|" if exact else ""))
    for r in rows:
        line = (f"| {r['model']} | {r['tokens']} | {r['llama_cpp_ppl']:.4f} | {r['tiefsee_ppl']:.4f} | "
                f"{100 * r['relative_difference']:+.3f}% |")
        if exact:
            line += (f" {r['exact_weights_ppl']:.4f} | {100 * r['llama_cpp_vs_exact']:+.3f}% |"
                     f" {100 * r['tiefsee_vs_exact']:+.3f}% |")
        print(line)
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
