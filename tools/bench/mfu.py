"""SFT train-step throughput and MFU of a Llama-style model from a preset, on all local devices.

What is measured. jreason's real SFT step (`train.step.make_train_step` with
`sft.cross_entropy_loss`, AdamW from `train.state.make_optimizer` with clipping and weight
decay, compiled by `compile_step` with the state donated) on a model built from a preset
(default `llama-3.2-1b`, 1.24B params) with random weights created already sharded on the
devices (`transformer.init_model(..., mesh=)`, fsdp over every local device): nothing is
downloaded. Compute in `--dtype` (bfloat16 by default), parameters and optimizer moments in
`--param-dtype` (float32 by default: mixed precision, as a real run would train).
`--logits-chunk`, `--remat`, `--scan-layers` and `--attention` are the ModelConfig switches of
the same names; `--logits-chunk` and `--remat` take several values, one table row each (on CPU
their steps alternate, so every row sees the same machine load; on an accelerator they run one
after another, one state at a time: `--interleave` chooses).

How. The step is lowered and compiled ahead of time (reported as compile s, with XLA's own
memory plan: temp = activations and other scratch, args = state + batch), run `--warmup` times,
then `--steps` times with `block_until_ready` on the new state and metrics after each; the
median is the step time. Two different random batches alternate so no step sees the same
input twice in a row. tokens/s = batch x seq / step; model FLOPs per token come from
`train.metrics.train_flops_per_token` (6 x matmul params + causal attention, PaLM style: remat
recompute does not count) and MFU from `train.metrics.mfu` against the chip's dense bf16 peak
(`metrics.PEAK_BF16_FLOPS`, by device kind). Where no peak is known (CPU) MFU is n/a and the
table gives the fraction of a matmul roof measured here instead: a jitted square matmul in the
compute dtype (2048^3 on CPU, 8192^3 on accelerators), labeled "of measured matmul". Peak device
memory comes from `device.memory_stats()` where the backend has it (GPU, TPU).

    # CPU, a small override so it finishes in a minute or two
    nice -n 10 python tools/bench/mfu.py --override n_layers=2 d_model=256 d_ff=704 \\
        n_heads=4 n_kv_heads=2 vocab_size=8192 --batch 4 --seq 256 --dtype float32 \\
        --attention xla --steps 5 --logits-chunk 0 128 --record

    # one H100, the issue's target (>= 45% MFU for a ~1B Llama); tools/bench/gpu.sh runs it
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python tools/bench/mfu.py --preset llama-3.2-1b \\
        --batch 8 --seq 2048 --attention cudnn --remat dots --logits-chunk 1024 --record

Left out: data loading (batches are made once and stay on the devices), checkpoints, logging,
gradient accumulation (one microbatch per step), multi-host meshes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_report, device_name  # noqa: E402

REMATS = ("none", "full", "dots", "dots_no_batch")


def build_config(args, logits_chunk: int, remat: str):
    """The preset with `--override key=value`s, then the bench's dtype/attention/remat switches."""
    from jreason.model.config import load_config

    cfg = load_config(args.preset, list(args.override))
    kw = dict(
        dtype=args.dtype,
        param_dtype=args.param_dtype,
        attention_impl=args.attention,
        remat=remat,
        logits_chunk=logits_chunk,
    )
    if args.scan_layers is not None:
        kw["scan_layers"] = args.scan_layers
    if args.seq > cfg.max_seq_len:
        kw["max_seq_len"] = args.seq
    return cfg.replace(**kw)


def measure_matmul(dtype: str, n: int, reps: int = 5) -> float:
    """FLOP/s of a jitted (n x n) @ (n x n) in `dtype` on the first device: the compute roof
    where no spec peak is known. A fresh operand each time, so nothing is a cached result."""
    a = jnp.ones((n, n), dtype) / n
    mm = jax.jit(lambda a, b: a @ b)
    mm(a, a).block_until_ready()
    times = []
    for i in range(reps):
        b = (a + i).block_until_ready()
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def report_numbers(
    cfg,
    batch: int,
    seq: int,
    step_s: float,
    device_kind: str,
    n_devices: int,
    roof_flops: float | None = None,
) -> dict:
    """tokens/s, model FLOP/s and MFU of one step time: the arithmetic behind the table."""
    from jreason.train import metrics

    tokens_per_s = batch * seq / step_s
    flops_per_token = metrics.train_flops_per_token(cfg, seq)
    flops_per_s = tokens_per_s * flops_per_token
    return {
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_per_token,
        "flops_per_s": flops_per_s,
        "mfu": metrics.mfu(tokens_per_s, flops_per_token, device_kind, n_devices),
        "roof_fraction": None if not roof_flops else flops_per_s / (roof_flops * n_devices),
    }


def random_batch(rng, vocab: int, batch: int, seq: int) -> dict:
    """One (b, T) SFT batch of random tokens: unpacked rows, every target counted."""
    tokens = rng.integers(0, vocab, size=(batch, seq + 1)).astype(np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
        "segment_ids": np.ones((batch, seq), np.int32),
        "loss_mask": np.ones((batch, seq), np.float32),
    }


def peak_memory_bytes(devices) -> int | None:
    """The largest per-device peak allocation so far, or None where the backend keeps no stats."""
    peaks = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001 - CPU backends raise or return None; both mean "unknown"
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
    return max(peaks) if peaks else None


class Run:
    """One configuration's compiled step, its (donated, replaced each step) state and batches."""

    def __init__(self, cfg, args, mesh):
        from jreason.model.transformer import init_model, param_axes
        from jreason.train import state as state_lib
        from jreason.train.config import OptimConfig
        from jreason.train.sft import cross_entropy_loss, to_global_batch
        from jreason.train.step import compile_step, make_train_step

        self.cfg, self.args, self.devices = cfg, args, list(mesh.devices.flat)
        t0 = time.perf_counter()
        model, params = init_model(cfg, jax.random.key(args.seed), mesh=mesh)
        optimizer, schedule = state_lib.make_optimizer(
            OptimConfig(lr=1e-5, schedule="constant", warmup_steps=0), args.steps + args.warmup
        )
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        sh = state_lib.state_shardings(optimizer, shapes, param_axes(cfg), mesh)
        init = jax.jit(lambda p: state_lib.init_state(p, optimizer, args.seed), out_shardings=sh)
        self.state = init(params)
        del params
        rng = np.random.default_rng(args.seed)
        self.batches = [
            to_global_batch(random_batch(rng, cfg.vocab_size, args.batch, args.seq), mesh, 1)
            for _ in range(2)
        ]
        jax.block_until_ready((self.state, self.batches))
        self.init_s = time.perf_counter() - t0

        step = make_train_step(model, optimizer, schedule, cross_entropy_loss)
        t0 = time.perf_counter()
        self.compiled = compile_step(step, sh, mesh).lower(self.state, self.batches[0]).compile()
        self.compile_s = time.perf_counter() - t0
        self.mem = self.compiled.memory_analysis()
        self.losses, self.times, self.n = [], [], 0

    def step(self) -> None:
        """One step, blocked on; timed once the warm-up steps are done."""
        t0 = time.perf_counter()
        self.state, m = self.compiled(self.state, self.batches[self.n % 2])
        jax.block_until_ready((self.state, m))
        if self.n >= self.args.warmup:
            self.times.append(time.perf_counter() - t0)
        self.losses.append(float(m["loss"]))
        self.n += 1

    def release(self) -> None:
        self.state = self.batches = self.compiled = None

    def row(self, roof_flops: float | None) -> dict:
        cfg, args, devices = self.cfg, self.args, self.devices
        if not all(np.isfinite(self.losses)):
            raise FloatingPointError(f"non-finite loss: {self.losses}")
        step_s = statistics.median(self.times)
        nums = report_numbers(
            cfg, args.batch, args.seq, step_s, devices[0].device_kind, len(devices), roof_flops
        )
        peak, mem = peak_memory_bytes(devices), self.mem
        row = {
            "model": f"{args.preset}{' (overridden)' if args.override else ''} "
            f"{cfg.n_params / 1e6:,.1f}M",
            "dtype (compute/params)": f"{cfg.dtype}/{cfg.param_dtype}",
            "attention": cfg.attention_impl,
            "remat": cfg.remat,
            "logits chunk": cfg.logits_chunk or "off",
            "scan": "yes" if cfg.scan_layers else "no",
            "devices x batch x seq": f"{len(devices)} x {args.batch} x {args.seq}",
            "step s (median)": f"{step_s:.4f}",
            "tok/s": f"{nums['tokens_per_s']:,.0f}",
            "model TFLOP/s": f"{nums['flops_per_s'] / 1e12:.3f}",
            "MFU (spec peak)": "n/a" if nums["mfu"] is None else f"{nums['mfu']:.1%}",
            "of measured matmul": "n/a"
            if nums["roof_fraction"] is None
            else f"{nums['roof_fraction']:.1%}",
            "XLA temp MB": f"{mem.temp_size_in_bytes / 1e6:,.1f}" if mem else "n/a",
            "XLA args MB": f"{mem.argument_size_in_bytes / 1e6:,.1f}" if mem else "n/a",
            # the allocator's peak over the process so far: earlier rows' runs included
            "peak device GB (so far)": "n/a" if peak is None else f"{peak / 1e9:.2f}",
            "compile s": f"{self.compile_s:.1f}",
            "init s": f"{self.init_s:.1f}",
            "loss first/last": f"{self.losses[0]:.3f}/{self.losses[-1]:.3f}",
        }
        print(
            f"  logits_chunk={cfg.logits_chunk} remat={cfg.remat}: step {step_s:.4f} s "
            f"(min {min(self.times):.4f}, max {max(self.times):.4f}), {row['tok/s']} tok/s, "
            f"{nums['flops_per_token'] / 1e9:.3f} GFLOP/token, MFU {row['MFU (spec peak)']}, "
            f"{row['of measured matmul']} of measured matmul",
            flush=True,
        )
        return row


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="llama-3.2-1b", help="configs/models/<name>.yaml or a path")
    ap.add_argument(
        "--override",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="ModelConfig fields over the preset, e.g. n_layers=2 d_model=256",
    )
    ap.add_argument("--batch", type=int, default=8, help="global rows per step")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    ap.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--attention", default="xla", choices=("xla", "cudnn", "reference"))
    ap.add_argument("--remat", nargs="+", default=["none"], choices=REMATS)
    ap.add_argument("--logits-chunk", nargs="+", type=int, default=[0], help="0 = full logits")
    ap.add_argument(
        "--scan-layers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="lax.scan over layers (default: the preset's, i.e. yes)",
    )
    ap.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with several --remat/--logits-chunk values, keep every state live and alternate "
        "their steps (default: on CPU only; an accelerator may not hold two states)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from jreason.sharding import make_mesh

    mesh = make_mesh(fsdp=-1, devices=jax.local_devices())
    if args.batch % mesh.size:
        raise SystemExit(f"--batch {args.batch} must divide by the {mesh.size} devices")
    dev = mesh.devices.flat[0]
    n = 2048 if dev.platform == "cpu" else 8192
    roof = measure_matmul(args.dtype, n)
    print(
        f"{dev.device_kind} x {mesh.size}: {args.dtype} matmul {n}^3 measured at "
        f"{roof / 1e12:.3f} TFLOP/s per device",
        flush=True,
    )
    cfgs = [build_config(args, c, r) for r in args.remat for c in args.logits_chunk]
    interleave = dev.platform == "cpu" if args.interleave is None else args.interleave
    rows = []
    if interleave:
        # every configuration's state stays live; their steps alternate, so each sees the same
        # machine load (a shared CPU swings 20-30%)
        runs = [Run(cfg, args, mesh) for cfg in cfgs]
        for _ in range(args.warmup + args.steps):
            for run in runs:
                run.step()
        rows = [run.row(roof) for run in runs]
    else:
        for cfg in cfgs:  # one state on the devices at a time: what fits one accelerator
            run = Run(cfg, args, mesh)
            for _ in range(args.warmup + args.steps):
                run.step()
            rows.append(run.row(roof))
            run.release()
    from jreason.train.metrics import peak_flops

    peak = peak_flops(dev.device_kind)
    peak_txt = "no spec peak" if peak is None else f"spec bf16 peak {peak / 1e12:.0f} TFLOP/s"
    append_report(
        f"SFT train step MFU (AdamW, {args.warmup} warm-up steps, median of {args.steps}); "
        f"{peak_txt}, {args.dtype} matmul {n}^3 measured {roof / 1e12:.3f} TFLOP/s per device",
        rows,
        command="python tools/bench/mfu.py " + " ".join(sys.argv[1:]),
        device=f"{device_name()} x {mesh.size}",
        record=args.record,
    )


if __name__ == "__main__":
    main()
