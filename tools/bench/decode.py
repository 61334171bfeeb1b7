"""Greedy decode throughput: jreason's sampler and engine vs transformers `generate`, one run.

Builds a random Qwen2-shaped model with transformers, saves it, loads it into jreason, checks
that greedy outputs agree token for token between transformers `generate`, the one-jit sampler
(`jreason.decode.sampler.generate`) and the continuous-batching engine
(`jreason.decode.engine.Engine`), then times the three alternately (several repetitions,
medians) on a fixed batch of 32-token prompts + 128 new tokens in fp32 (or `--dtype`). Compile
time (first call) is reported separately. Also reports a roofline fraction: bytes read per
decode step (weights in their stored dtype + KV cache at the mean length) x steps/s over the
memory bandwidth measured here with a jitted vector x matrix product (512 MB on CPU; 4 GB on an
accelerator, where it reads HBM). Prints a table and appends it, with the command, date and
device, to BENCHMARKS.md.

`--dtype bfloat16` casts the reference to bf16 before it is saved, so both sides run the same
bf16 weights (jreason with param_dtype = dtype = bfloat16). transformers runs on the GPU when
torch sees one (`torch.cuda.is_available()`), on the CPU otherwise. Greedy outputs must agree
exactly only for fp32 on CPU: in bf16, or on a GPU (where XLA runs fp32 matmuls in TF32 and torch
does not), near-tied logits round differently, so the rows' agreement is reported (exact rows,
and the median index of the first differing token) instead of asserted; every side still
generates exactly NEW_TOKENS per row, so the timed work is the same.

    python tools/bench/decode.py                         # demo + 100M models, batch 1 and 16
    python tools/bench/decode.py --sizes demo --reps 5 --no-record
    python tools/bench/decode.py --sizes 1.5b --dtype bfloat16 --batches 1 64 --reps 2  # GPU
    python tools/bench/decode.py --sizes demo --cpu-threads 1  # XLA:CPU pool of one thread
    python tools/bench/decode.py --sizes demo --batches 1 --engine-cache 4096  # a server's cache

`--tunix` adds tunix's `Sampler` (google-tunix, greedy, its own Qwen2 loaded from the same
safetensors: tunix_peer.py) as a third peer, timed in the same alternation; run it with the
tunix virtualenv (rl_step.py's docstring; torch==2.13.0 installed there too):

    /tmp/tunix-venv/bin/python tools/bench/decode.py --tunix

`--cpu-threads N` sizes XLA:CPU's intra-op pool (jreason/cpu_threads.py; jreason's own
`--cpu-threads` flag); torch keeps every core unless `--torch-threads` says otherwise. Both
counts go into the table's heading.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_report, device_name, random_qwen2  # noqa: E402
from forward import SIZES as FORWARD_SIZES  # noqa: E402

SIZES = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab)
    "demo": (128, 4, 4, 2, 384, 512),
    "100m": FORWARD_SIZES["100m"],
    # Qwen2-1.5B's shape (tied embeddings): for GPUs only, far too slow on a 2-core CPU
    "1.5b": (1536, 28, 12, 2, 8960, 151936),
}
DTYPE_LABELS = {"float32": "fp32", "bfloat16": "bf16"}
PROMPT_LEN = 32
NEW_TOKENS = 128


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_reference(size: str, path: Path, dtype: str = "float32"):
    import torch

    model = random_qwen2(SIZES[size]).to(dtype=getattr(torch, dtype))
    model.save_pretrained(path)  # saved in `dtype`, so load_hf reads the very same weights
    return model.to(torch_device())


def measure_bandwidth(mbytes: int = 512, reps: int = 7, calls: int = 1) -> float:
    """GB/s of streaming a ~`mbytes` MB fp32 matrix through a jitted vector-matrix product.

    That is a decode step's access pattern (every weight read once, nothing written back) on
    every core XLA uses; a copy's write stream or a single-threaded reduction would understate
    what reading weights can reach (7.7 GB/s for a jitted sum vs 17 GB/s here, same machine).
    Each timing covers `calls` back-to-back products: on a GPU one 4 GB read takes ~1.5 ms, so
    the launch and sync overhead of a single call would show in the figure.
    """
    w = jnp.arange(mbytes * 2**20 // 4, dtype=jnp.float32).reshape(1024, -1)
    v = jnp.ones((1024,), jnp.float32)
    read = jax.jit(lambda v, w: v @ w)
    read(v, w).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = read(v, w)
        out.block_until_ready()
        times.append((time.perf_counter() - t0) / calls)
    return w.nbytes / statistics.median(times) / 1e9


def hf_generate(ref, prompts: np.ndarray) -> np.ndarray:
    import torch

    ids = torch.tensor(prompts, device=ref.device)
    with torch.no_grad():
        out = ref.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    out = out[:, prompts.shape[1] :].cpu().numpy()  # .cpu() waits for the GPU
    assert out.shape == (len(prompts), NEW_TOKENS), f"transformers gave {out.shape}"
    return out


def sampler_generate(model, params, prompts: np.ndarray) -> np.ndarray:
    from jreason.decode.sampler import generate

    res = generate(
        model, params, prompts.tolist(), max_new_tokens=NEW_TOKENS, bucket=PROMPT_LEN
    )  # returns host lists, so the device work is finished
    return np.array([r["tokens"] for r in res])


def engine_generate(engine, prompts: np.ndarray) -> np.ndarray:
    from jreason.decode.engine import Request

    rids = [engine.submit(Request(p.tolist(), max_tokens=NEW_TOKENS)) for p in prompts]
    results = engine.run_until_idle()
    out = np.array([results.pop(r).tokens for r in rids])
    return out


def first_diff(a: np.ndarray, b: np.ndarray) -> str:
    if a.shape != b.shape:
        return f"shapes {a.shape} vs {b.shape}"
    rows, cols = np.nonzero(a != b)
    if len(rows) == 0:
        return "none"
    return f"{len(set(rows.tolist()))} rows differ; first at row {rows[0]} token {cols[0]}"


def agreement(a: np.ndarray, b: np.ndarray) -> str:
    """How far two greedy outputs agree: exact rows, and the median first differing token."""
    if a.shape != b.shape:
        return f"shapes {a.shape} vs {b.shape}"
    same = a == b
    first = np.where(same.all(axis=1), a.shape[1], np.argmin(same, axis=1))
    if (first == a.shape[1]).all():
        return "exact"
    exact = int((first == a.shape[1]).sum())
    return f"{exact}/{len(a)} rows exact, median first diff at {np.median(first):.0f}"


def bench(
    size: str,
    batches: list[int],
    reps: int,
    bandwidth: float,
    dtype: str = "float32",
    engine_cache: int | None = None,
    tunix: bool = False,
) -> list[dict]:
    from jreason.decode.engine import Engine
    from jreason.model.hf import load_hf
    from jreason.model.transformer import abstract_model

    with tempfile.TemporaryDirectory() as tmp:
        ref = build_reference(size, Path(tmp), dtype)
        cfg, params = load_hf(tmp, param_dtype=dtype)
        if tunix:
            from tunix_peer import TunixGreedy

            peer = TunixGreedy.load(Path(tmp), cfg, PROMPT_LEN, NEW_TOKENS)
    cfg = cfg.replace(dtype=dtype)
    model, _ = abstract_model(cfg)
    # Exactness is required only where both sides run the same fp32 arithmetic (module docstring).
    strict = dtype == "float32" and jax.devices()[0].platform == "cpu" and ref.device.type == "cpu"
    # in the stored dtype: 4 bytes a weight in fp32, 2 in bf16
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    # K and V, in the compute dtype, per cached token of one row
    kv_bytes_per_token = (
        2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
    )
    mean_len = PROMPT_LEN + NEW_TOKENS / 2

    rows = []
    for batch in batches:
        rng = np.random.default_rng(batch)
        prompts = rng.integers(1, cfg.vocab_size, size=(batch, PROMPT_LEN))
        # cache sized for the job, like the sampler's (transformers' grows to the same length),
        # unless --engine-cache sizes it like a server's
        engine_len = engine_cache or PROMPT_LEN + NEW_TOKENS
        engine = Engine(model, params, max_slots=batch, max_len=engine_len)

        # First calls: compile for jreason; checks that all three agree token for token.
        t0 = time.perf_counter()
        ours_s = sampler_generate(model, params, prompts)
        sampler_compile = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours_e = engine_generate(engine, prompts)
        engine_compile = time.perf_counter() - t0
        theirs = hf_generate(ref, prompts)
        if tunix:
            t0 = time.perf_counter()
            ours_t = peer.generate(prompts)
            tunix_compile = time.perf_counter() - t0
        msg = (
            f"{size} batch {batch}: sampler vs transformers: {first_diff(ours_s, theirs)}; "
            f"engine vs transformers: {first_diff(ours_e, theirs)}; "
            f"engine vs sampler: {first_diff(ours_e, ours_s)}"
        )
        print(msg, flush=True)
        if strict:
            assert (ours_s == theirs).all() and (ours_e == theirs).all(), (
                "greedy outputs differ: refusing to time different computations (" + msg + ")"
            )
            match = "exact"
        else:
            match = f"sampler: {agreement(ours_s, theirs)}; engine: {agreement(ours_e, theirs)}"

        hf_t, s_t, e_t, t_t = [], [], [], []
        for _ in range(reps):
            # Fresh prompts each time so nothing is served from a cache of an identical call.
            p = rng.integers(1, cfg.vocab_size, size=(batch, PROMPT_LEN))
            t0 = time.perf_counter()
            hf_generate(ref, p)
            hf_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sampler_generate(model, params, p)
            s_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            engine_generate(engine, p)
            e_t.append(time.perf_counter() - t0)
            if tunix:
                t0 = time.perf_counter()
                peer.generate(p)
                t_t.append(time.perf_counter() - t0)

        n = batch * NEW_TOKENS
        hf, s, e = (n / statistics.median(t) for t in (hf_t, s_t, e_t))
        step_bytes = weight_bytes + batch * mean_len * kv_bytes_per_token

        def roofline(tok_s, batch=batch, step_bytes=step_bytes):
            steps_s = tok_s / batch
            return f"{step_bytes * steps_s / (bandwidth * 1e9):.1%}"

        rows.append(
            {
                "model": f"Qwen2 {size} ({cfg.n_params / 1e6:.2f}M)",
                "batch": batch,
                "engine cache": engine_len,
                "transformers tok/s": f"{hf:,.1f}",
                "sampler tok/s": f"{s:,.1f}",
                "engine tok/s": f"{e:,.1f}",
                "sampler / tf": f"{s / hf:.2f}x",
                "engine / tf": f"{e / hf:.2f}x",
                "compile s (sampler, engine)": f"{sampler_compile:.2f}, {engine_compile:.2f}",
                "MB read/step": f"{step_bytes / 1e6:.2f}",
                "roofline (sampler, engine)": f"{roofline(s)}, {roofline(e)}",
                "greedy match": match,
            }
        )
        if tunix:
            tx = n / statistics.median(t_t)
            rows[-1].update(
                {
                    "tunix tok/s": f"{tx:,.1f}",
                    "engine / tunix": f"{e / tx:.2f}x",
                    "tunix compile s": f"{tunix_compile:.2f}",
                    "tunix vs transformers": agreement(ours_t, theirs),
                }
            )
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["demo", "100m"], choices=sorted(SIZES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(DTYPE_LABELS),
        help="weights and compute of both sides (transformers torch_dtype; jreason param_dtype "
        "and dtype)",
    )
    ap.add_argument(
        "--no-record", action="store_true", help="print only; do not touch BENCHMARKS.md"
    )
    ap.add_argument(
        "--engine-cache",
        type=int,
        default=None,
        help="the engine's cache length per slot (default: prompt + new tokens, the job's "
        "length); a server's is its context length",
    )
    ap.add_argument(
        "--tunix",
        action="store_true",
        help="also time tunix's Sampler on the same weights (needs the tunix virtualenv)",
    )
    ap.add_argument("--cpu-threads", type=int, default=None, help="XLA:CPU pool size (jreason)")
    ap.add_argument(
        "--torch-threads", type=int, default=None, help="torch.set_num_threads (default: cores)"
    )
    args = ap.parse_args(argv)
    if args.tunix:
        try:
            import tunix  # noqa: F401
        except ImportError:
            ap.error("--tunix: tunix is not installed here; run with its virtualenv (see --help)")
        if args.dtype != "float32":
            ap.error("--tunix: fp32 only (tunix_peer loads tunix's Qwen2 in its default fp32)")
    if args.engine_cache is not None and args.engine_cache < PROMPT_LEN + NEW_TOKENS:
        ap.error(f"--engine-cache {args.engine_cache}: must hold {PROMPT_LEN + NEW_TOKENS} tokens")
    import torch

    from jreason import cpu_threads

    cores = len(os.sched_getaffinity(0))
    xla_threads = cpu_threads.start_backend(args.cpu_threads) or cores
    torch.set_num_threads(args.torch_threads or cores)
    on_cpu = jax.devices()[0].platform == "cpu"
    mbytes = 512 if on_cpu else 4096
    bandwidth = measure_bandwidth(mbytes, calls=1 if on_cpu else 10)
    print(
        f"measured read bandwidth (vector x {mbytes} MB matrix): {bandwidth:.1f} GB/s", flush=True
    )
    rows = [
        r
        for s in args.sizes
        for r in bench(
            s, args.batches, args.reps, bandwidth, args.dtype, args.engine_cache, args.tunix
        )
    ]
    where = "" if torch_device() == "cpu" else f"; transformers on {torch.cuda.get_device_name()}"
    append_report(
        f"Greedy decode ({DTYPE_LABELS[args.dtype]}, {PROMPT_LEN}-token prompts + {NEW_TOKENS} "
        f"new tokens): jreason sampler and engine vs transformers"
        f"{' and tunix Sampler' if args.tunix else ''}; memory bandwidth "
        f"{bandwidth:.1f} GB/s{where}; threads: XLA:CPU {xla_threads}, torch "
        f"{torch.get_num_threads()}",
        rows,
        command="python tools/bench/decode.py " + " ".join(sys.argv[1:]),
        device=device_name(),
        record=not args.no_record,
    )


if __name__ == "__main__":
    main()
