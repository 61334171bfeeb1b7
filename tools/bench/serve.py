"""Serving over HTTP: throughput, time to first token and inter-token latency of `jreason serve`.

A loopback load generator (httpx, asyncio). It starts `jreason serve` as a subprocess (or uses a
server already running, `--url`), warms it up, then for each concurrency level (default 1, 8
and 32) keeps that many streamed completion requests in flight until `--requests` have finished.
Every request has the same shape: a `--prompt-tokens` random-word prompt, exactly
`--max-tokens` generated tokens (`ignore_eos`, greedy), `stream=true` with `logprobs=0` so that
every token arrives as its own server-sent event and its arrival time is measured on the client:
- TTFT: request sent -> its first token event;
- ITL: the gap between a request's consecutive token events (divided among the tokens of an
  event, when a step delivered several);
- throughput: generated tokens / wall time of the level, and requests/s.
p50 / p99 over all requests (TTFT) or all gaps (ITL) of a level. Everything here is the whole
stack: HTTP, JSON, SSE, detokenization, the engine thread and the device; `tools/bench/serving.py`
measures the engine alone.

Without `--model`, the served model is a random Qwen2 of the `tiny` preset's shape (0.85M
params, the demo's) with a sentencepiece tokenizer trained here on task text, so the script
needs no download. The server and the load generator share the machine: on 2 CPU cores they
compete for them, so CPU numbers are a lower bound of what the server alone could do.

    python tools/bench/serve.py                                # tiny random model, 64 req/level
    python tools/bench/serve.py --model runs/demo/export-hf --max-slots 32
    python tools/bench/serve.py --url http://127.0.0.1:8000 --served-model-name tiny
    python tools/bench/serve.py --quick --no-record            # 8 requests/level, 8 tokens
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_report, device_name  # noqa: E402


def build_model(root: Path) -> Path:
    """A random `tiny`-preset model with a sentencepiece tokenizer trained on task text."""
    import jax

    from jreason.data.tasks import get_task
    from jreason.model import load_config
    from jreason.model.store import save_model
    from jreason.model.transformer import abstract_model
    from jreason.tokenizer import load_tokenizer, train_sentencepiece

    task = get_task("arithmetic")
    lines = []
    for ex in task.generate(0, 500):
        lines += [ex.prompt, task.reference_completion(ex)]
    train_sentencepiece(lines, 512, root / "tok" / "tokenizer")
    tok = load_tokenizer(root / "tok")
    cfg = load_config("tiny", [f"vocab_size={tok.vocab_size}"])
    _, shapes = abstract_model(cfg)
    rng = np.random.default_rng(0)

    def draw(path, s):  # numpy init: no compile; norm scales 1, the rest N(0, 0.02)
        if "scale" in jax.tree_util.keystr(path):
            return np.ones(s.shape, s.dtype)
        return (0.02 * rng.standard_normal(s.shape)).astype(s.dtype)

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    return save_model(root / "model", cfg, params, tokenizer_dir=root / "tok")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, model: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "jreason", "serve", "--model", str(model), "--port", str(port),
           "--max-slots", str(args.max_slots), "--max-len", str(args.max_len),
           "--served-model-name", args.served_model_name,
           "--max-queue", str(max(args.concurrency) + 8)]  # fmt: skip
    log = open(Path(tempfile.gettempdir()) / "jreason-bench-serve.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"jreason serve exited ({proc.returncode}); see {log.name}")
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"jreason serve did not come up in 600 s; see {log.name}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.25)


def prompts(n: int, n_tokens: int, seed: int) -> list[str]:
    # short arithmetic-flavoured words: about one token each with the task tokenizer
    words = ["one", "two", "+", "-", "*", "=", "sum", "add", "the", "is", "of", "and", "7", "42"]
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=n_tokens)) for _ in range(n)]


async def one_request(client, url: str, body: dict) -> dict:
    """Streams one completion; returns its TTFT, per-token gaps and token count."""
    t0 = time.perf_counter()
    first, last, gaps, n = None, None, [], 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            choices = event.get("choices") or []
            k = len((choices[0].get("logprobs") or {}).get("tokens") or []) if choices else 0
            if k == 0:
                continue
            now = time.perf_counter()
            if first is None:
                first = now - t0
                gaps += [0.0] * (k - 1)
            else:
                gaps += [(now - last) / k] * k
            last, n = now, n + k
    return {"ttft": first, "gaps": gaps, "tokens": n}


async def run_level(url: str, bodies: list[dict], concurrency: int) -> tuple[list[dict], float]:
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    out: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def worker():
            while not queue.empty():
                out.append(await one_request(client, url, queue.get_nowait()))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return out, wall


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def bench(args, url: str) -> list[dict]:
    body = {
        "model": args.served_model_name,
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "logprobs": 0,
    }
    warm = [{**body, "prompt": p} for p in prompts(max(args.concurrency), args.prompt_tokens, 1)]
    t0 = time.perf_counter()
    asyncio.run(run_level(url, warm, max(args.concurrency)))  # compiles, fills caches
    print(f"warm-up: {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for level, c in enumerate(args.concurrency):
        bodies = [
            {**body, "prompt": p} for p in prompts(args.requests, args.prompt_tokens, 2 + level)
        ]
        results, wall = asyncio.run(run_level(url, bodies, c))
        tokens = sum(r["tokens"] for r in results)
        assert tokens == args.requests * args.max_tokens, "a request ended early"
        ttft = [r["ttft"] * 1e3 for r in results]
        itl = [g * 1e3 for r in results for g in r["gaps"]]
        row = {
            "concurrency": c,
            "requests": len(results),
            "output tok/s": f"{tokens / wall:,.1f}",
            "req/s": f"{len(results) / wall:.2f}",
            "TTFT p50 ms": f"{pct(ttft, 50):.1f}",
            "TTFT p99 ms": f"{pct(ttft, 99):.1f}",
            "ITL p50 ms": f"{pct(itl, 50):.2f}",
            "ITL p99 ms": f"{pct(itl, 99):.2f}",
        }
        print(row, flush=True)
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="model dir to serve (default: a random tiny model)")
    ap.add_argument("--url", help="bench a running server instead of starting one")
    ap.add_argument("--served-model-name", default="bench")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="words per prompt (~tokens)")
    ap.add_argument("--max-tokens", type=int, default=64, help="generated tokens per request")
    ap.add_argument("--max-slots", type=int, default=32, help="engine slots (started server)")
    ap.add_argument("--max-len", type=int, default=256, help="KV cache per slot (started server)")
    ap.add_argument("--quick", action="store_true", help="8 requests/level, 8 tokens (smoke test)")
    ap.add_argument(
        "--no-record", action="store_true", help="print only; do not touch BENCHMARKS.md"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.max_tokens, args.prompt_tokens = 8, 8, 8
    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url
        if url is None:
            model = Path(args.model) if args.model else build_model(Path(tmp))
            proc, url = start_server(args, model)
        try:
            rows = bench(args, url)
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    what = args.model or ("a running server" if args.url else "random tiny (0.85M)")
    append_report(
        f"HTTP serving (`jreason serve`, loopback, streamed, greedy): {what}, "
        f"{args.prompt_tokens}-word prompts, {args.max_tokens} tokens per request",
        rows,
        command="python tools/bench/serve.py " + " ".join(sys.argv[1:]),
        device=device_name() + "; server and load generator on the same machine",
        record=not args.no_record,
    )


if __name__ == "__main__":
    main()
