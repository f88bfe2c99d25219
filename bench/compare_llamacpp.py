#!/usr/bin/env python3
"""Prompt-processing (pp) and generation (tg) speed of llama.cpp and tiefsee on the same GGUF files, same thread
count, in one run (the machine drifts between runs), with the ratio tiefsee / llama.cpp.

llama.cpp runs in-process through llama-cpp-python (0.3.36; it builds its own llama.cpp): `Llama(path,
n_threads=T, n_threads_batch=T, n_ctx=depth+max(p,n), n_batch=n_ubatch=p)`, one warm-up of each test, then per
repetition: a fresh context (`reset()` and the KV cache cleared), `depth` random tokens evaluated untimed, then
pp = one `eval` of p random tokens, tg = n `eval` calls of one random token each (the depth tokens are evaluated
once and the state restored before each test, as `tiefsee bench` copies its cache). The FIELD-NOTES measured this
within noise of `llama-bench -p 512 -n 128`. tiefsee runs as `tiefsee bench --json` with the same p, n, depth,
threads and repetitions, after llama.cpp's model is freed. Decode is also put against the memory-bandwidth
roofline `tiefsee bench` reports: the bytes one token reads (its active weights as stored plus the cache rows
it attends to) into the read bandwidth measured in the same run.

Usage:
  .venv/bin/python bench/compare_llamacpp.py FILE.gguf [FILE.gguf ...] [-p 512] [-n 128] [-t 2] [-r 3]
      [--depth 0] [--tiefsee target/release/tiefsee] [--json-out results.json]
With no file, every *.gguf in /tmp/tiefsee-gguf-bench (bench/make_gguf_bench_models.py's output).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def mean_std(samples: list[float]) -> tuple[float, float]:
    return statistics.fmean(samples), statistics.stdev(samples) if len(samples) > 1 else 0.0


def llama_cpp_bench(path: Path, p: int, n: int, depth: int, threads: int, reps: int) -> dict:
    from llama_cpp import Llama, llama_cpp  # noqa: PLC0415

    batch = max(p, 512 if depth else 1)
    llm = Llama(
        str(path),
        n_ctx=depth + max(p, n) + 8,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=batch,
        n_ubatch=batch,
        verbose=False,
    )
    rng = np.random.default_rng(1234)
    vocab = llm.n_vocab()
    depth_tokens = rng.integers(0, vocab, depth).tolist()
    prompt = rng.integers(0, vocab, p).tolist()
    gen = rng.integers(0, vocab, max(n, 1)).tolist()

    # The depth tokens are evaluated once; every test starts from a copy of that state.
    llm.reset()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
    if depth_tokens:
        llm.eval(depth_tokens)
    at_depth = llm.save_state()

    def fresh() -> None:
        llm.load_state(at_depth)

    def pp() -> float:
        fresh()
        start = time.perf_counter()
        llm.eval(prompt)
        return p / (time.perf_counter() - start)

    def tg(count: int) -> float:
        fresh()
        start = time.perf_counter()
        for t in gen[:count]:
            llm.eval([t])
        return count / (time.perf_counter() - start)

    result = {}
    if p > 0:
        pp()
        result["pp"] = [pp() for _ in range(reps)]
    if n > 0:
        tg(1)
        result["tg"] = [tg(n) for _ in range(reps)]
    del llm
    gc.collect()
    return result


def tiefsee_bench(tiefsee: Path, path: Path, p: int, n: int, depth: int, threads: int, reps: int) -> dict:
    cmd = [str(tiefsee), "bench", "--model", str(path), "-p", str(p), "-n", str(n), "-t", str(threads),
           "-r", str(reps), "--depth", str(depth), "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    v = json.loads(out)
    return {"pp": v["pp_samples"], "tg": v["tg_samples"], "kv_bytes_per_token": v["kv_bytes_per_token"],
            "roofline_tps": v.get("tg_roofline_tps"), "read_bandwidth_gbs": v.get("read_bandwidth_gbs"),
            "decode_bytes_per_token": v.get("decode_bytes_per_token")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--depth", type=int, default=0)
    ap.add_argument("--tiefsee", type=Path, default=REPO / "target" / "release" / "tiefsee")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    files = args.files or sorted(Path("/tmp/tiefsee-gguf-bench").glob("*.gguf"))
    if not files:
        ap.error("no GGUF files given and none in /tmp/tiefsee-gguf-bench (run bench/make_gguf_bench_models.py)")
    if args.p <= 0 and args.n <= 0 or args.repetitions < 1 or args.threads < 1:
        ap.error("need -p or -n > 0, -r >= 1 and -t >= 1")

    rows, results = [], []
    for path in files:
        print(f"{path.name}: llama.cpp ...", file=sys.stderr, flush=True)
        peer = llama_cpp_bench(path, args.p, args.n, args.depth, args.threads, args.repetitions)
        print(f"{path.name}: tiefsee ...", file=sys.stderr, flush=True)
        ours = tiefsee_bench(args.tiefsee, path, args.p, args.n, args.depth, args.threads, args.repetitions)
        at = f" @ d{args.depth}" if args.depth else ""
        for test, count in (("pp", args.p), ("tg", args.n)):
            if count <= 0:
                continue
            (pm, ps), (tm, ts) = mean_std(peer[test]), mean_std(ours[test])
            roof = ours["roofline_tps"] if test == "tg" else None
            of_roof = f"{100 * pm / roof:.0f}% / {100 * tm / roof:.0f}%" if roof else ""
            rows.append((path.name, f"{test}{count}{at}", f"{pm:.2f} ± {ps:.2f}", f"{tm:.2f} ± {ts:.2f}", tm / pm,
                         of_roof))
            results.append({"model": str(path), "test": test, "tokens": count, "depth": args.depth,
                            "threads": args.threads, "llama_cpp_tps": peer[test], "tiefsee_tps": ours[test],
                            "ratio": tm / pm, "kv_bytes_per_token": ours["kv_bytes_per_token"],
                            "roofline_tps": roof, "read_bandwidth_gbs": ours["read_bandwidth_gbs"],
                            "decode_bytes_per_token": ours["decode_bytes_per_token"]})

    header = ("model", "test", "llama.cpp t/s", "tiefsee t/s", "tiefsee / llama.cpp", "of roofline (llama.cpp / tiefsee)")
    rows = [(*r[:4], f"{r[4]:.2f}x", r[5]) for r in rows]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(6)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    bandwidths = [r["read_bandwidth_gbs"] for r in results if r["read_bandwidth_gbs"]]
    measured = f", read bandwidth {min(bandwidths):.1f}-{max(bandwidths):.1f} GB/s" if bandwidths else ""
    print(f"threads {args.threads}, repetitions {args.repetitions}{measured}")
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
