"""Prefill throughput: jreason's jitted forward vs transformers on the same weights, one run.

Builds a random Qwen2-shaped model with transformers, saves it, loads it into jreason, checks
the logits agree, then times both forwards alternately (several repetitions, medians) on the
same token batch in fp32. Compile time (first call) is reported separately. Prints a table and
appends it, with the command, date and device, to BENCHMARKS.md.

    python tools/bench/forward.py                      # small + 100M models, batch 4 x 256
    python tools/bench/forward.py --sizes small --batch 8 --seq 128 --reps 5
"""

from __future__ import annotations

import argparse
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

SIZES = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab)
    "small": (256, 4, 4, 2, 704, 8192),  # ~2.9M non-embedding; the protocol's "2.9M" row
    "100m": (768, 12, 12, 2, 2048, 32000),
}


def build_reference(size: str, path: Path):
    model = random_qwen2(SIZES[size])
    model.save_pretrained(path)
    return model


def bench(size: str, batch: int, seq: int, reps: int) -> dict:
    import torch

    from jreason.model.hf import load_hf
    from jreason.model.transformer import abstract_model

    with tempfile.TemporaryDirectory() as tmp:
        ref = build_reference(size, Path(tmp))
        cfg, params = load_hf(tmp, param_dtype="float32")
    model, _ = abstract_model(cfg)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, size=(batch, seq))
    positions = np.broadcast_to(np.arange(seq), tokens.shape)
    tokens_j, positions_j = jnp.asarray(tokens), jnp.asarray(positions)
    tokens_t = torch.tensor(tokens)

    forward = jax.jit(lambda p, t, pos: model.apply(p, t, pos)[0])
    t0 = time.perf_counter()
    ours = forward(params, tokens_j, positions_j).block_until_ready()
    compile_s = time.perf_counter() - t0
    with torch.no_grad():
        theirs = ref(input_ids=tokens_t).logits.numpy()
    max_diff = float(np.abs(np.asarray(ours) - theirs).max())
    assert max_diff < 1e-3, f"logits differ by {max_diff}: refusing to time different models"

    jr_times, hf_times = [], []
    for _ in range(reps):
        # Fresh inputs each time so nothing is served from a cache of an identical call.
        t0 = time.perf_counter()
        forward(params, tokens_j + 0, positions_j).block_until_ready()
        jr_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.no_grad():
            ref(input_ids=tokens_t.clone())
        hf_times.append(time.perf_counter() - t0)
    n = batch * seq
    jr, hf = n / statistics.median(jr_times), n / statistics.median(hf_times)
    return {
        "model": f"Qwen2 {size} ({cfg.n_params / 1e6:.1f}M)",
        "batch x seq": f"{batch} x {seq}",
        "jreason tok/s": f"{jr:,.0f}",
        "transformers tok/s": f"{hf:,.0f}",
        "ratio": f"{jr / hf:.2f}x",
        "jreason compile s": f"{compile_s:.2f}",
        "max abs dlogit": f"{max_diff:.1e}",
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["small", "100m"], choices=sorted(SIZES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument(
        "--no-record", action="store_true", help="print only; do not touch BENCHMARKS.md"
    )
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, len(__import__("os").sched_getaffinity(0))))
    rows = [bench(s, args.batch, args.seq, args.reps) for s in args.sizes]
    append_report(
        "Prefill forward (fp32): jreason vs transformers",
        rows,
        command="python tools/bench/forward.py " + " ".join(sys.argv[1:]),
        device=device_name(),
        record=not args.no_record,
    )


if __name__ == "__main__":
    main()
