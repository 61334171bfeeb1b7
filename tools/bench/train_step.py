"""SFT step throughput: jreason's jitted train step vs a PyTorch + transformers AdamW step.

Same model config and initial weights (a random Qwen2 built by transformers and loaded into
jreason), same batch of packed-free rows, fp32, the same AdamW hyper-parameters, clipping on
both sides. The first steps of both are checked to give the same loss before anything is timed;
then the two steps alternate for several repetitions and medians are reported, with jreason's
compile time separately. Prints a table and appends it to BENCHMARKS.md.

    python tools/bench/train_step.py                     # small and 20M models, batch 8 x 256
    python tools/bench/train_step.py --sizes small --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_report, device_name, random_qwen2  # noqa: E402

SIZES = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab)
    "small": (256, 4, 4, 2, 704, 8192),
    "20m": (512, 6, 8, 2, 1408, 16384),
}
LR, WD, B1, B2, EPS, CLIP = 1e-4, 0.0, 0.9, 0.95, 1e-8, 1.0


def bench(size: str, batch: int, seq: int, reps: int) -> dict:
    import torch

    from jreason.model.hf import load_hf
    from jreason.model.transformer import abstract_model, param_axes
    from jreason.sharding import make_mesh
    from jreason.train import state as state_lib
    from jreason.train.config import OptimConfig
    from jreason.train.sft import cross_entropy_loss, to_global_batch
    from jreason.train.step import compile_step, make_train_step

    vocab = SIZES[size][-1]
    ref = random_qwen2(SIZES[size], tie=False).train()
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        cfg, params = load_hf(tmp, param_dtype="float32")
    model, _ = abstract_model(cfg)

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=(batch, seq + 1)).astype(np.int32)
    jbatch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
        "segment_ids": np.ones((batch, seq), np.int32),
        "loss_mask": np.ones((batch, seq), np.float32),
    }
    mesh = make_mesh(devices=jax.devices()[:1])
    optim = OptimConfig(
        lr=LR,
        schedule="constant",
        warmup_steps=0,
        weight_decay=WD,
        b1=B1,
        b2=B2,
        eps=EPS,
        clip_norm=CLIP,
    )
    optimizer, schedule = state_lib.make_optimizer(optim, 10_000)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    sh = state_lib.state_shardings(optimizer, shapes, param_axes(cfg), mesh)
    state = jax.jit(lambda p: state_lib.init_state(p, optimizer, 0), out_shardings=sh)(params)
    step = compile_step(make_train_step(model, optimizer, schedule, cross_entropy_loss), sh, mesh)
    gbatch = to_global_batch(jbatch, mesh, 1)

    # optax's constant schedule after a 0-step warmup starts at lr from step 1; torch likewise.
    topt = torch.optim.AdamW(ref.parameters(), lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
    inputs_t = torch.tensor(jbatch["inputs"], dtype=torch.long)
    labels_t = torch.tensor(jbatch["targets"], dtype=torch.long)

    def torch_step():
        topt.zero_grad(set_to_none=True)
        logits = ref(input_ids=inputs_t).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), labels_t.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
        topt.step()
        return float(loss.detach())

    t0 = time.perf_counter()
    state, m = step(state, gbatch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    loss_t = torch_step()
    loss_diff = abs(float(m["loss"]) - loss_t)
    assert loss_diff < 1e-3, (
        f"first-step losses differ: jreason {float(m['loss'])} vs torch {loss_t}"
    )

    jr, th = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        state, m = step(state, gbatch)
        jax.block_until_ready(m)
        jr.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch_step()
        th.append(time.perf_counter() - t0)
    n = batch * seq
    jr_tps, th_tps = n / statistics.median(jr), n / statistics.median(th)
    return {
        "model": f"Qwen2 {size} ({cfg.n_params / 1e6:.1f}M)",
        "batch x seq": f"{batch} x {seq}",
        "jreason tok/s": f"{jr_tps:,.0f}",
        "torch+transformers tok/s": f"{th_tps:,.0f}",
        "ratio": f"{jr_tps / th_tps:.2f}x",
        "jreason compile s": f"{compile_s:.1f}",
        "step-1 abs dloss": f"{loss_diff:.1e}",
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["small", "20m"], choices=sorted(SIZES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    rows = [bench(s, args.batch, args.seq, args.reps) for s in args.sizes]
    append_report(
        "SFT train step (fp32, AdamW): jreason vs PyTorch + transformers",
        rows,
        command="python tools/bench/train_step.py " + " ".join(sys.argv[1:]),
        device=device_name(),
        record=not args.no_record,
    )


if __name__ == "__main__":
    main()
