"""Markovian scaling: per-token cost and KV-cache memory of Markovian vs long-CoT decoding.

Fixed chunk size C (default 256) and thinking lengths L = C, 2C, 4C, 8C. For each L, a batch
of B requests (default 8) with the same P-token prompts, greedy, decodes exactly L tokens in two
ways with the jreason `Engine`:
- long-CoT: a plain engine with max_len = P + L; every request keeps its whole trace in context,
  so each step attends over (and the cache holds) up to P + L positions.
- Markovian: `MarkovianConfig(chunk_size=C)` (carryover m = C/2, `max_chunks` the fewest whose
  `max_trace_tokens()` reaches L) on an engine with max_len = P + C, whatever L is; requests
  carry `max_tokens=L`, so the trace stops at exactly L tokens. Each reset re-prefills the
  prompt + the last C/2 tokens.
A random model's greedy trace never stops early, so every request decodes exactly L tokens.

Reported per (mode, L): wall seconds (median over `--reps`, the two modes alternating, fresh
prompts every repetition), ms per generated token (wall / (B x L)), the KV cache the engine
holds (the sum of `engine.state.cache` nbytes: it is preallocated max_slots x max_len, so it is
exactly the peak) and the most context tokens any slot held (`max(result.peak_context)`), and
compile time (first call minus the median). The target: Markovian ms/token stays flat (within
15% from C to 8C) and its cache constant, while long-CoT's grow with L; the change C -> 8C is
printed for both. A two-panel plot (ms/token vs L, cache MB vs L) goes to `--plot`.

Checks before timing (greedy, all token for token): long-CoT at L = C equals transformers
`generate` on the same weights; long-CoT traces of every L extend the shorter ones; Markovian
traces of every L are prefixes of the 8C one and start with the long-CoT first C tokens (the
first chunk is plain decoding); and every later chunk of the first requests equals plain
decoding from that chunk's context (the reset + re-prefill computes what a fresh prompt would).

Time on the 2-core CPU machine, demo model, 3 reps: ~7-10 min (measured engine steps at batch 8:
~7 ms at max_len 288, ~25 ms at 2080, so a repetition is ~30 s Markovian + ~75 s long-CoT; the
script prints a projection after the first repetition); --size 100m takes hours.
At L = C both engines have the same shapes (max_len P + C), so that compile is counted once, on
long-CoT.

    python tools/bench/markovian.py                          # demo, C 256, batch 8
    python tools/bench/markovian.py --chunk 128 --batch 4 --reps 5 --plot /tmp/m.png
    python tools/bench/markovian.py --quick --no-record      # C 32, batch 2, plot in /tmp
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_report, device_name, random_qwen2  # noqa: E402
from forward import SIZES as FORWARD_SIZES  # noqa: E402

SIZES = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab)
    "demo": (128, 4, 4, 2, 384, 512),
    "100m": FORWARD_SIZES["100m"],
}
ROOT = Path(__file__).resolve().parents[2]
MODES = ("long-CoT", "Markovian")


def markovian_config(C: int, L: int):
    """Chunk size C, carryover C/2, and the fewest chunks whose trace capacity reaches L."""
    from jreason.decode.markovian import MarkovianConfig

    chunks = 1
    while MarkovianConfig(chunk_size=C, max_chunks=chunks).max_trace_tokens() < L:
        chunks += 1
    return MarkovianConfig(chunk_size=C, max_chunks=chunks)


def run(engine, prompts: np.ndarray, L: int, markovian=None) -> list:
    """Results of B requests of exactly L tokens each (the engine's Result objects)."""
    from jreason.decode.engine import Request

    rids = [engine.submit(Request(p.tolist(), max_tokens=L, markovian=markovian)) for p in prompts]
    results = engine.run_until_idle()
    out = [results.pop(r) for r in rids]
    assert all(len(r.tokens) == L for r in out), "a request did not decode exactly L tokens"
    return out


def hf_generate(ref, prompts: np.ndarray, n: int) -> np.ndarray:
    import torch

    ids = torch.tensor(prompts)
    with torch.no_grad():
        out = ref.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[:, prompts.shape[1] :].numpy()


def tokens(results) -> np.ndarray:
    return np.array([r.tokens for r in results])


def expect_equal(a: np.ndarray, b: np.ndarray, what: str) -> None:
    rows, cols = np.nonzero(a != b) if a.shape == b.shape else ([0], [-1])
    msg = "equal" if len(rows) == 0 else f"differ (row {rows[0]}, token {cols[0]})"
    print(f"check {what}: {msg}", flush=True)
    assert len(rows) == 0, f"{what}: greedy outputs differ; refusing to time them"


def cache_bytes(engine) -> int:
    import jax

    return sum(x.nbytes for x in jax.tree.leaves(engine.state.cache))


def check_chunks(engine, results, C: int, rows: int) -> None:
    """Every chunk after the first equals plain greedy decoding from that chunk's context."""
    from jreason.decode.engine import Request

    chunks = [c for r in results[:rows] for c in r.chunks[1:]]
    rids = [engine.submit(Request(c.context, max_tokens=len(c.tokens))) for c in chunks]
    out = engine.run_until_idle()
    plain = [out.pop(r).tokens for r in rids]
    bad = [i for i, (c, t) in enumerate(zip(chunks, plain)) if c.tokens != t]
    print(
        f"check {len(chunks)} Markovian chunks (requests 0..{rows - 1}) vs plain decoding "
        f"from their contexts: {'equal' if not bad else f'{len(bad)} differ'}",
        flush=True,
    )
    assert not bad, "a Markovian chunk differs from plain decoding of its context"


def bench(args) -> tuple[list[dict], dict]:
    from jreason.decode.engine import Engine
    from jreason.model.hf import load_hf
    from jreason.model.transformer import abstract_model

    with tempfile.TemporaryDirectory() as tmp:
        ref = random_qwen2(SIZES[args.size])
        ref.save_pretrained(tmp)
        cfg, params = load_hf(tmp, param_dtype="float32")
    model, _ = abstract_model(cfg)
    C, B, P = args.chunk, args.batch, args.prompt_len
    lengths = [m * C for m in args.multiples]
    mk = {L: markovian_config(C, L) for L in lengths}
    print(
        f"{args.size} ({cfg.n_params / 1e6:.2f}M), batch {B}, prompt {P}, C {C}, lengths "
        f"{lengths}, Markovian max_chunks {[mk[L].max_chunks for L in lengths]}",
        flush=True,
    )
    engines = {("long-CoT", L): Engine(model, params, max_slots=B, max_len=P + L) for L in lengths}
    markov_engine = Engine(model, params, max_slots=B, max_len=P + C)
    for L in lengths:
        engines["Markovian", L] = markov_engine

    def decode(mode, L, prompts):
        return run(engines[mode, L], prompts, L, mk[L] if mode == "Markovian" else None)

    # First calls (compile) on one prompt set, with the greedy checks.
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(1, cfg.vocab_size, size=(B, P))
    first, out, peak = {}, {}, {}
    for L in lengths:
        for mode in MODES:
            t0 = time.perf_counter()
            out[mode, L] = decode(mode, L, prompts)
            first[mode, L] = time.perf_counter() - t0
            peak[mode, L] = max(r.peak_context for r in out[mode, L])
    expect_equal(
        tokens(out["long-CoT", C]), hf_generate(ref, prompts, C), f"long-CoT {C} vs transformers"
    )
    for a, b in zip(lengths, lengths[1:]):
        expect_equal(
            tokens(out["long-CoT", b])[:, :a], tokens(out["long-CoT", a]), f"long-CoT {b}[:{a}]"
        )
    longest = tokens(out["Markovian", lengths[-1]])
    for L in lengths:
        expect_equal(longest[:, :L], tokens(out["Markovian", L]), f"Markovian {lengths[-1]}[:{L}]")
    expect_equal(longest[:, :C], tokens(out["long-CoT", C]), f"Markovian[:{C}] vs long-CoT")
    for L in lengths:
        assert peak["Markovian", L] <= P + C, "a Markovian context outgrew query + C"
        assert max(len(r.chunks) for r in out["Markovian", L]) == mk[L].max_chunks
    check_chunks(markov_engine, out["Markovian", lengths[-1]], C, min(B, 2))

    times = {key: [] for key in first}
    t_start = time.perf_counter()
    for rep in range(args.reps):
        p = rng.integers(1, cfg.vocab_size, size=(B, P))  # fresh prompts every repetition
        for L in lengths:
            for mode in MODES if rep % 2 == 0 else MODES[::-1]:  # alternate which goes first
                t0 = time.perf_counter()
                decode(mode, L, p)
                times[mode, L].append(time.perf_counter() - t0)
        if rep == 0 and args.reps > 1:
            spent = time.perf_counter() - t_start
            print(
                f"rep 1 took {spent:.0f} s; projected {spent * (args.reps - 1):.0f} s more",
                flush=True,
            )

    rows, series = [], {mode: {"L": [], "ms": [], "mb": []} for mode in MODES}
    for L in lengths:
        for mode in MODES:
            wall = statistics.median(times[mode, L])
            ms = 1e3 * wall / (B * L)
            mb = cache_bytes(engines[mode, L]) / 2**20
            for k, v in (("L", L), ("ms", ms), ("mb", mb)):
                series[mode][k].append(v)
            rows.append(
                {
                    "model": f"Qwen2 {args.size} ({cfg.n_params / 1e6:.2f}M)",
                    "L": f"{L} ({L // C}C)",
                    "mode": mode,
                    "engine max_len": engines[mode, L].max_len,
                    "chunks": mk[L].max_chunks if mode == "Markovian" else "-",
                    "wall s": f"{wall:.2f}",
                    "ms/token": f"{ms:.3f}",
                    "tok/s": f"{B * L / wall:,.1f}",
                    "KV cache MB": f"{mb:.2f}",
                    "peak context": peak[mode, L],
                    "compile s": f"{max(first[mode, L] - wall, 0.0):.2f}",
                }
            )
    return rows, series


def plot(series: dict, C: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ms, ax_mb) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, marker in zip(MODES, ("o", "s")):
        s = series[mode]
        ax_ms.plot(s["L"], s["ms"], marker=marker, label=mode)
        ax_mb.plot(s["L"], s["mb"], marker=marker, label=mode)
    for ax, ylabel in ((ax_ms, "ms per generated token"), (ax_mb, "KV cache MB (allocated)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(series[MODES[0]]["L"])
        ax.set_xticklabels([f"{L // C}C\n{L}" for L in series[MODES[0]]["L"]])
        ax.set_xlabel(f"thinking tokens L (C = {C})")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", default="demo", choices=sorted(SIZES))
    ap.add_argument("--chunk", type=int, default=256, help="C, the Markovian chunk size")
    ap.add_argument("--multiples", type=int, nargs="+", default=[1, 2, 4, 8], help="L / C")
    ap.add_argument("--batch", type=int, default=8, help="B requests decoded together")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--plot", type=Path, default=None, help="default docs/markovian_scaling.png")
    ap.add_argument("--quick", action="store_true", help="C 32, batch 2, prompt 16 (smoke test)")
    ap.add_argument(
        "--no-record", action="store_true", help="print only; do not touch BENCHMARKS.md"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.chunk, args.batch, args.prompt_len = 32, 2, 16
    if args.plot is None:
        quick = Path(tempfile.gettempdir()) / "markovian_scaling.png"
        args.plot = quick if args.quick else ROOT / "docs" / "markovian_scaling.png"
    if args.multiples != sorted(set(args.multiples)) or args.multiples[0] != 1:
        ap.error("--multiples must be increasing and start at 1 (L = C is the baseline)")
    import torch

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    rows, series = bench(args)
    C = args.chunk
    for mode in MODES:
        ms = series[mode]["ms"]
        print(
            f"{mode}: ms/token {ms[0]:.3f} at C -> {ms[-1]:.3f} at "
            f"{args.multiples[-1]}C ({ms[-1] / ms[0] - 1:+.1%}); KV cache "
            f"{series[mode]['mb'][0]:.2f} -> {series[mode]['mb'][-1]:.2f} MB"
        )
    title = (
        f"Markovian (C={C}, carryover C/2) vs long-CoT decoding: Qwen2 {args.size}, "
        f"batch {args.batch}, fp32, greedy"
    )
    plot(series, C, args.plot, title)
    append_report(
        f"Markovian scaling (fp32, greedy, batch {args.batch}, {args.prompt_len}-token prompts, "
        f"C = {C}, carryover C/2): jreason Engine, Markovian vs long-CoT",
        rows,
        command="python tools/bench/markovian.py " + " ".join(sys.argv[1:]),
        device=device_name(),
        record=not args.no_record,
    )


if __name__ == "__main__":
    main()
