"""Training metrics: model FLOPs and MFU, one logger that writes JSONL + TensorBoard + a progress bar.

`MetricsLogger.log(step, {...})` is the only thing a trainer calls per step. Each call appends one
line to `run_dir/metrics.jsonl` (flushed at once, so a killed run keeps every step it logged),
writes the same numbers as TensorBoard scalars under `run_dir/tb`, and moves a tqdm bar. The JSONL
file is the record of truth: `read_jsonl` + `plot_metrics` turn it into a PNG without TensorBoard.

MFU follows PaLM (Chowdhery et al. 2022, appendix B): model FLOPs only, so rematerialization and
padding do not count as useful work, divided by the dense bf16 peak of the chips in use.

Left out on purpose: no aggregation across hosts (only process 0 logs, the others pass
`enabled=False`), no averaging over steps (the trainer decides what a step's metrics are), no
wandb or other network sinks.
"""

from __future__ import annotations

import json
import math
import numbers
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

# Dense (no sparsity) bf16 peak FLOP/s per chip, keyed by substrings of jax `Device.device_kind`.
# The longest key contained in the device kind wins, so "TPU v5 lite" beats "TPU v5".
PEAK_BF16_FLOPS: dict[str, float] = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e reports itself as "TPU v5 lite"
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # v5p reports itself as "TPU v5" (older runtimes) or "TPU v5p"
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,  # SXM; "NVIDIA H100 80GB HBM3"
    "NVIDIA H100 PCIe": 756e12,  # the PCIe card is clocked lower than SXM
    "NVIDIA H200": 989e12,  # same compute die as H100 SXM, more HBM
}

JSONL_NAME = "metrics.jsonl"
TB_DIR = "tb"
RESERVED_KEYS = ("step", "time")

# plot_metrics figure geometry: one row per key, fixed size so output is reproducible.
PLOT_WIDTH_IN = 8.0
PLOT_ROW_HEIGHT_IN = 3.0
PLOT_DPI = 100


def peak_flops(device_kind: str) -> float | None:
    """Per-chip dense bf16 peak for a jax `device_kind`, or None (CPU, unknown chip: MFU is n/a)."""
    kind = device_kind.lower()
    matches = [k for k in PEAK_BF16_FLOPS if k.lower() in kind]
    if not matches:
        return None
    return PEAK_BF16_FLOPS[max(matches, key=len)]


def train_flops_per_token(cfg, seq_len: int) -> float:
    """Model FLOPs for one training token (forward + backward) of a decoder at length `seq_len`.

    PaLM appendix B style, with P = matmul parameters a token passes through:

        P     = (n_params - embedding tables) + V * D      # the lm_head matmul counts even if tied
        flops = 6 * P  +  6 * L * N * H * T

    6 * P: every weight does one multiply-add (2 FLOPs) per token in the forward pass and twice
    that in the backward pass (gradients w.r.t. activations and w.r.t. weights). The input
    embedding is a gather, not a matmul, so it is excluded; the output projection is a (D, V)
    matmul whether or not its weights are shared with the embedding, so V * D is added back.
    Norm scales and biases stay in P; they are < 0.1% of it for any real model.

    Attention: per layer and token, QK^T and AV are each 2 * N * H * T FLOPs forward over T keys,
    so 4 * N * H * T forward and 12 * N * H * T with the backward pass. Causal masking means a
    token attends to T / 2 keys on average, giving 6 * L * N * H * T. N is query heads: grouped
    kv heads save memory, not score FLOPs. A sliding window is not taken into account.
    """
    if getattr(cfg, "family", None) == "recurrent":
        return _recurrent_train_flops_per_token(cfg, seq_len)
    D, V, L = cfg.d_model, cfg.vocab_size, cfg.n_layers
    N, H, T = cfg.n_heads, cfg.head_dim, seq_len
    embedding_tables = V * D * (1 if cfg.tie_embeddings else 2)
    matmul_params = cfg.n_params - embedding_tables + V * D
    attention = 6 * 2 * L * N * H * T / 2
    return float(6 * matmul_params + attention)


def _recurrent_train_flops_per_token(cfg, seq_len: int) -> float:
    """`train_flops_per_token` for a recurrent-depth model (model/recurrent.py) at E[r].

    Prelude, coda and head run forward and backward once. The core runs E[r] = mean + 1 times
    forward (its adapter, 2D x D, with it) but backward only through the last backprop_depth
    iterations, so it costs 1/3 of a layer's 3 passes per forward and 2/3 per backward.
    """
    one, two = (train_flops_per_token(cfg.block_config(n), seq_len) for n in (1, 2))
    layer = two - one  # a Block's forward + backward, attention included
    head = one - layer  # the lm_head matmul
    fwd = cfg.mean_recurrence + 1.0
    bwd = min(fwd, cfg.backprop_depth)
    core = cfg.n_core * layer + 6 * 2 * cfg.d_model * cfg.d_model
    return float(head + (cfg.n_prelude + cfg.n_coda) * layer + core * (fwd + 2 * bwd) / 3)


def mfu(
    tokens_per_s: float, flops_per_token: float, device_kind: str, n_devices: int
) -> float | None:
    """Model FLOPs utilization in [0, 1]: achieved model FLOP/s over the peak of all chips.

    `tokens_per_s` is the global throughput (all devices together). None when the chip's peak is
    unknown (CPU), so callers log it as n/a instead of a made-up number.
    """
    peak = peak_flops(device_kind)
    if peak is None:
        return None
    return tokens_per_s * flops_per_token / (peak * n_devices)


def _to_scalar(key: str, value: Any) -> float | int | None:
    """Python number for JSON: None stays None, ints stay ints, anything else goes through float()."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Integral):  # int and numpy integer types
        return int(value)
    dtype = getattr(value, "dtype", None)  # jax integer arrays are not numbers.Integral
    if dtype is not None and getattr(value, "size", 0) == 1 and np.issubdtype(dtype, np.integer):
        return int(value)
    try:
        return float(value)  # numpy / jax scalars and 0-d or size-1 arrays
    except (TypeError, ValueError) as e:
        shape = getattr(value, "shape", None)
        raise TypeError(
            f"metric {key!r}: expected a scalar, got {type(value).__name__}"
            + (f" of shape {shape}" if shape is not None else "")
        ) from e


def _fmt(value: float | int | None) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


class MetricsLogger:
    """Per-step metrics to `run_dir/metrics.jsonl`, TensorBoard (`run_dir/tb`) and a tqdm bar.

    With `enabled=False` (every process but 0 in a multi-host run) each method is a no-op and no
    file or directory is created. `start_step` places the bar when resuming; the JSONL file is
    appended to, never truncated, so a resumed run continues the same record.
    """

    POSTFIX_KEYS = 4  # how many of the latest metrics the progress bar shows

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool = True,
        total_steps: int | None = None,
        tensorboard: bool = True,
        console: bool = True,
        start_step: int = 0,
    ):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / JSONL_NAME, "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            from tensorboardX import SummaryWriter  # lazy: only process 0 pays the import

            # flush_secs well under the default 120 s so a killed run loses little in TB either.
            self._tb = SummaryWriter(str(self.run_dir / TB_DIR), flush_secs=10)
        if console:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps,
                initial=start_step,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )

    def log(self, step: int, metrics: Mapping[str, Any], *, prefix: str = "") -> None:
        """Record `metrics` at `step`; keys become `prefix + key` in every sink.

        None values (e.g. MFU on CPU) are written as JSON null and left out of TensorBoard.
        NaN / inf are kept as they are (a diverged loss must be visible); Python's json module
        writes them as the non-standard tokens NaN / Infinity, which `read_jsonl` reads back.
        """
        if not self.enabled:
            return
        step = int(step)
        values = {f"{prefix}{k}": _to_scalar(f"{prefix}{k}", v) for k, v in metrics.items()}
        clash = [k for k in values if k in RESERVED_KEYS]
        if clash:
            raise ValueError(f"metric names {clash} are reserved for the record's own fields")

        record = {"step": step, "time": time.time(), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

        if self._tb is not None:
            for k, v in values.items():
                if v is not None:
                    self._tb.add_scalar(k, v, global_step=step)

        if self._bar is not None:
            if step > self._bar.n:
                self._bar.update(step - self._bar.n)
            shown = list(values.items())[: self.POSTFIX_KEYS]
            self._bar.set_postfix_str(", ".join(f"{k}={_fmt(v)}" for k, v in shown), refresh=True)

    def close(self) -> None:
        """Flush and close every sink; safe to call twice."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl. A torn last line (process killed mid-write) is dropped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
    return records


def plot_metrics(
    records: list[dict], out_png: str | Path, keys: tuple[str, ...] = ("loss", "eval_accuracy")
) -> Path:
    """One PNG with a subplot per key found in `records` (x = step); absent keys are skipped.

    The figure is PLOT_WIDTH_IN wide and PLOT_ROW_HEIGHT_IN per subplot at PLOT_DPI. It uses the
    Agg canvas directly (no pyplot), so it needs no display and leaves matplotlib's global
    backend alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = {}
    for key in keys:
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if pts:
            series[key] = pts
    if not series:
        raise ValueError(f"plot_metrics: none of the keys {list(keys)} occur in the records")

    fig = Figure(figsize=(PLOT_WIDTH_IN, PLOT_ROW_HEIGHT_IN * len(series)), dpi=PLOT_DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(series), 1, squeeze=False)[:, 0]
    for ax, (key, pts) in zip(axes, series.items()):
        steps, vals = zip(*pts)
        # Sparse series (periodic eval) read better with markers; dense ones (loss) without.
        ax.plot(steps, vals, marker="o" if len(pts) <= 50 else None, markersize=3)
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
        last = vals[-1]
        if isinstance(last, numbers.Real) and math.isfinite(last):
            ax.set_title(f"{key} (last: {last:.4g})", fontsize=9)
    axes[-1].set_xlabel("step")
    fig.tight_layout()

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=PLOT_DPI, format="png")
    return out
