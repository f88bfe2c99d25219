"""Load test of `tiefsee serve`: continuous batching throughput and prefix-cache time to first token.

(a) Aggregate decode throughput with 1 streaming client, then with N concurrent ones (default 16): each
    request streams `POST /v1/completions` with its own prompt of the same length (token ids, so the
    length is exact and no two prompts share a cache block), the same `max_tokens`, `temperature=0`,
    `logprobs=0` (one event per token whatever its text).
    Every request must answer 200, end with `data: [DONE]`, and report `completion_tokens == max_tokens`.
    Decode throughput is measured as llama.cpp's `llama-batched-bench` measures its S_TG, with no prompt
    processing in the steps timed: the tokens that arrive while every stream is decoding (from the last
    stream's first token to the first stream's last one), per second. Issue target: N-stream / 1-stream
    >= 4x at 16 streams. Also printed, a window that does include prompt processing: sum over requests
    of (completion_tokens - 1) / (time the last request finished - time the first request got its first
    token), into which the later requests' prefills fall (on the R1-Qwen-1.5B shape here, 15 x 32
    prompt tokens take about 12 s of an 85 s window), and end to end: all tokens over the whole run.
(b) Time to first token (first SSE event of a `max_tokens=1` stream) of a long prompt never seen before,
    then of a second prompt sharing that prefix with a different tail; the server's
    `prompt_cache_hit_tokens` is reported. Issue target: cold / hit >= 5x.

Everything is loopback-only and bounded: one server on a free 127.0.0.1 port (killed on exit), a fixed
number of requests, a timeout on each. Standard library only. Prints one table and one JSON line.

    .venv/bin/python bench/make_bench_model.py              # once: /tmp/tiefsee-bench-model
    .venv/bin/python bench/serve_load.py [--model /tmp/tiefsee-bench-model] [--streams 16] [--max-tokens 128]
"""

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e_api"))
from tiefsee_server import FIXTURE_MODEL, HOST, Server  # noqa: E402

BENCH_MODEL = Path("/tmp/tiefsee-bench-model")


@dataclass
class Result:
    """One streamed request as the client saw it."""

    status: int = 0
    sent: float = 0.0
    first_event: float | None = None  # first `data:` event (the first token, or with it)
    finished: float | None = None
    done: bool = False  # `data: [DONE]` received
    usage: dict = field(default_factory=dict)
    finish_reason: str | None = None
    error: str | None = None
    token_times: list[float] = field(default_factory=list)  # arrival of each event carrying a token

    def problems(self, max_tokens: int) -> list[str]:
        out = []
        if self.error:
            out.append(self.error)
        if self.status != 200:
            out.append(f"status {self.status}")
        if not self.done:
            out.append("no [DONE]")
        if self.usage.get("completion_tokens") != max_tokens:
            out.append(f"completion_tokens {self.usage.get('completion_tokens')} != {max_tokens} "
                       f"(finish_reason {self.finish_reason})")
        return out


async def read_chunked(reader: asyncio.StreamReader):
    """Yields the payload pieces of an HTTP/1.1 `Transfer-Encoding: chunked` body."""
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        data = await reader.readexactly(size)
        await reader.readexactly(2)
        yield data


async def stream_completion(port: int, body: dict, timeout_s: float) -> Result:
    """POSTs a streaming `/v1/completions` request over raw HTTP/1.1 and times its SSE events."""
    result = Result()
    payload = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n")
    writer = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(HOST, port)
            result.sent = time.perf_counter()
            writer.write(head.encode() + payload)
            await writer.drain()
            result.status = int((await reader.readline()).split()[1])
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            if headers.get("transfer-encoding") == "chunked":
                pieces = read_chunked(reader)
            else:
                async def whole():
                    yield await reader.read()
                pieces = whole()
            buffer = b""
            async for piece in pieces:
                buffer += piece
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if not line.startswith(b"data: "):
                        continue
                    now = time.perf_counter()
                    result.first_event = result.first_event or now
                    data = line[6:].strip()
                    if data == b"[DONE]":
                        result.done, result.finished = True, now
                        continue
                    event = json.loads(data)
                    if "error" in event:
                        result.error = event["error"].get("message")
                    if event.get("usage"):
                        result.usage = event["usage"]
                    for choice in event.get("choices", []):
                        result.finish_reason = choice.get("finish_reason") or result.finish_reason
                        if (choice.get("logprobs") or {}).get("tokens"):
                            result.token_times.append(now)
            if result.status != 200:
                result.error = result.error or buffer.decode(errors="replace")[:200]
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
        result.error = f"{type(e).__name__}: {e}"
    finally:
        if writer is not None:
            writer.close()
    result.finished = result.finished or time.perf_counter()
    return result


def request(prompt: list[int], max_tokens: int) -> dict:
    # `logprobs: 0` (the sampled token's own) makes every token an event, even one whose text is empty
    # or held back: a random-weight model with a small stand-in tokenizer samples ids it cannot spell,
    # whose text would otherwise arrive all at once at the end.
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "logprobs": 0,
            "stream_options": {"include_usage": True}}


def metrics(port: int) -> dict[str, float]:
    """The server's Prometheus counters and gauges, by name."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def throughput(port: int, prompts: list[list[int]], max_tokens: int, timeout_s: float) -> dict:
    """Runs one request per prompt concurrently; returns decode and end-to-end tokens/s, and the mean
    number of tokens generated per engine step (how full the continuous batch was)."""

    async def run():
        return await asyncio.gather(*(stream_completion(port, request(p, max_tokens), timeout_s)
                                      for p in prompts))

    before = metrics(port)
    results = asyncio.run(run())
    after = metrics(port)
    steps = after.get("tiefsee_engine_steps_total", 0) - before.get("tiefsee_engine_steps_total", 0)
    problems = [f"request {i}: {'; '.join(p)}" for i, r in enumerate(results) if (p := r.problems(max_tokens))]
    if problems:
        raise RuntimeError("requests failed:\n  " + "\n  ".join(problems))
    start = min(r.sent for r in results)
    first = min(r.first_event for r in results)
    end = max(r.finished for r in results)
    generated = sum(r.usage["completion_tokens"] for r in results)
    # Steady state: while every stream is decoding (after the last first token, before the first last
    # token), no prefill shares the steps.
    if all(len(r.token_times) >= 2 for r in results):
        t0 = max(r.token_times[0] for r in results)
        t1 = min(r.token_times[-1] for r in results)
        tokens = sum(1 for r in results for t in r.token_times if t0 < t <= t1)
        steady = tokens / (t1 - t0) if t1 > t0 and tokens else float("nan")
    else:
        steady = float("nan")
    return {
        "decode_tok_s": (generated - len(results)) / (end - first),
        "steady_tok_s": steady,
        "e2e_tok_s": generated / (end - start),
        "wall_s": end - start,
        "ttft_mean_s": statistics.mean(r.first_event - r.sent for r in results),
        "tokens_per_step": generated / steps if steps else float("nan"),
    }


def ttft(port: int, prompt: list[int], timeout_s: float) -> tuple[float, dict]:
    result = asyncio.run(stream_completion(port, request(prompt, 1), timeout_s))
    if problems := result.problems(1):
        raise RuntimeError("TTFT request failed: " + "; ".join(problems))
    return result.first_event - result.sent, result.usage


def prompt_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    """BOS then `n - 1` ordinary token ids (ids 0-2 are BOS, EOS and padding in the fixture tokenizer)."""
    return [0] + [rng.randrange(3, vocab) for _ in range(n - 1)]


def ordinary_vocab(model: Path) -> int:
    """Ordinary (not added) token ids of a checkpoint folder's tokenizer.json, or of a GGUF file's vocabulary
    (tokens of type 1, `normal`)."""
    if model.is_file():
        import gguf  # noqa: PLC0415

        types = gguf.GGUFReader(model).fields["tokenizer.ggml.token_type"]
        return sum(1 for i in types.data if int(types.parts[i][0]) == 1)
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    return len(tokenizer["model"]["vocab"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=BENCH_MODEL if BENCH_MODEL.exists() else FIXTURE_MODEL)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--long-prompt-tokens", type=int, default=400)
    parser.add_argument("--tail-tokens", type=int, default=8, help="tokens after the shared prefix")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement; medians reported")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per request")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--log", type=Path, default=None, help="keep the server's log here")
    args = parser.parse_args()
    if not 1 <= args.streams <= 64 or not 1 <= args.repeats <= 10:
        parser.error("--streams must be in 1..64 and --repeats in 1..10")
    if args.long_prompt_tokens + args.tail_tokens + 1 > args.ctx:
        parser.error("--long-prompt-tokens + --tail-tokens must leave room for a token in --ctx")

    rng = random.Random(args.seed)
    vocab = ordinary_vocab(args.model)
    server_args = ["--ctx", str(args.ctx), "--max-seqs", str(max(16, args.streams))]
    with Server(args.model, server_args, lifetime_s=1800, log=args.log) as server:
        port = server.port
        throughput(port, [prompt_ids(rng, args.prompt_tokens, vocab)], 8, args.timeout)  # warm-up

        runs = {1: [], args.streams: []}
        for _ in range(args.repeats):
            for n in runs:
                prompts = [prompt_ids(rng, args.prompt_tokens, vocab) for _ in range(n)]
                runs[n].append(throughput(port, prompts, args.max_tokens, args.timeout))
        tp = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}

        cold, hit, hits = [], [], []
        for _ in range(args.repeats):
            prefix = prompt_ids(rng, args.long_prompt_tokens, vocab)
            tails = [[rng.randrange(3, vocab) for _ in range(args.tail_tokens)] for _ in range(2)]
            t_cold, u_cold = ttft(port, prefix + tails[0], args.timeout)
            t_hit, u_hit = ttft(port, prefix + tails[1], args.timeout)
            if u_cold.get("prompt_cache_hit_tokens"):
                raise RuntimeError(f"the cold request hit the cache: {u_cold}")
            cold.append(t_cold)
            hit.append(t_hit)
            hits.append(u_hit.get("prompt_cache_hit_tokens", 0))

    one, many = tp[1]["decode_tok_s"], tp[args.streams]["decode_tok_s"]
    steady_one, steady_many = tp[1]["steady_tok_s"], tp[args.streams]["steady_tok_s"]
    summary = {
        "model": str(args.model),
        "ctx": args.ctx,
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "decode_tok_s_1": round(one, 1),
        f"decode_tok_s_{args.streams}": round(many, 1),
        "e2e_tok_s_1": round(tp[1]["e2e_tok_s"], 1),
        f"e2e_tok_s_{args.streams}": round(tp[args.streams]["e2e_tok_s"], 1),
        "throughput_ratio": round(many / one, 2),
        "steady_tok_s_1": round(steady_one, 1),
        f"steady_tok_s_{args.streams}": round(steady_many, 1),
        "steady_ratio": round(steady_many / steady_one, 2),
        f"tokens_per_step_{args.streams}": round(tp[args.streams]["tokens_per_step"], 2),
        "long_prompt_tokens": args.long_prompt_tokens + args.tail_tokens,
        "prompt_cache_hit_tokens": min(hits),
        "ttft_cold_s": round(statistics.median(cold), 4),
        "ttft_hit_s": round(statistics.median(hit), 4),
        "ttft_ratio": round(statistics.median(cold) / statistics.median(hit), 2),
    }
    rows = [
        ("decode tok/s, 1 stream", f"{steady_one:.1f}", ""),
        (f"decode tok/s, {args.streams} streams (all decoding)", f"{steady_many:.1f}", ""),
        ("decode throughput ratio", f"{summary['steady_ratio']:.2f}x", ">= 4x" if args.streams == 16 else ""),
        (f"generated tokens per engine step, {args.streams} streams",
         f"{tp[args.streams]['tokens_per_step']:.2f}", ""),
        (f"tok/s, {args.streams} streams, window with later prefills", f"{many:.1f}", ""),
        ("ratio of that window (against 1 stream's)", f"{summary['throughput_ratio']:.2f}x", ""),
        ("end-to-end ratio (all tokens over the whole run)",
         f"{tp[args.streams]['e2e_tok_s'] / tp[1]['e2e_tok_s']:.2f}x", ""),
        (f"TTFT cold, {summary['long_prompt_tokens']}-token prompt", f"{summary['ttft_cold_s'] * 1e3:.1f} ms", ""),
        (f"TTFT prefix hit ({summary['prompt_cache_hit_tokens']} cached)", f"{summary['ttft_hit_s'] * 1e3:.1f} ms", ""),
        ("TTFT ratio", f"{summary['ttft_ratio']:.2f}x", ">= 5x"),
    ]
    print(f"tiefsee serve load test: {args.model}, --ctx {args.ctx}, prompts of {args.prompt_tokens} tokens, "
          f"max_tokens {args.max_tokens}, temperature 0, median of {args.repeats}")
    print(f"{'measure':<52} {'value':>12}  target")
    for name, value, target in rows:
        print(f"{name:<52} {value:>12}  {target}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
