"""Coconut's multi-stage curriculum (model/latent.py) over the shared train step.

    for stage in stages:                      e.g. 1 .. max_latent_stage (+1: drop every step)
        fresh optimizer state, step 0         if coconut.reset_optimizer (Coconut's default),
                                              so each stage also restarts the lr schedule
        steps_per_stage x step(state, batch_fn(stage, i))

The step is `make_train_step(model, optimizer, schedule, loss_fn)` jitted once with the state
donated: every stage's batches have the same shapes (`collate` pads rows to seq_len and
latent_pos to max_latents), so nothing recompiles between stages. `loss_fn` defaults to
`coconut_loss`; the baselines (no-CoT, CoT) run the same loop as one stage with
`sft.cross_entropy_loss`.

Left out: checkpointing, sharding and the grain pipeline (train/sft.py has them for one-stage
runs); batches here come from a caller's function of (stage, step index).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from jreason.model.latent import CoconutConfig, coconut_loss
from jreason.train import state as state_lib
from jreason.train.config import OptimConfig
from jreason.train.step import make_train_step


def train_stages(
    model,
    params,
    cfg: CoconutConfig,
    optim: OptimConfig,
    batch_fn: Callable[[int, int], dict],
    stages: Sequence[int],
    *,
    loss_fn=coconut_loss,
    seed: int = 0,
    on_step: Callable[[int, int, dict], None] | None = None,
):
    """Trains `params` through `stages`; returns (params, [per-stage last-step metrics]).

    `batch_fn(stage, i)` gives step i's batch as (A, b, T) arrays (A = grad_accum
    microbatches); `on_step(stage, i, metrics)` sees every step's metrics (device arrays).
    """
    if not stages:
        raise ValueError("train_stages: stages: needs at least one stage")
    optimizer, schedule = state_lib.make_optimizer(optim, cfg.steps_per_stage)
    step = jax.jit(make_train_step(model, optimizer, schedule, loss_fn), donate_argnums=0)
    state, history = None, []
    for stage in stages:
        if state is None or cfg.reset_optimizer:
            start = params if state is None else state["params"]
            # a copy: the step donates the state, and the caller's params stay usable
            state = state_lib.init_state(jax.tree.map(jnp.copy, start), optimizer, seed)
        for i in range(cfg.steps_per_stage):
            state, metrics = step(state, batch_fn(stage, i))
            if on_step is not None:
                on_step(stage, i, metrics)
        history.append({"stage": stage, **{k: float(v) for k, v in metrics.items()}})
    return state["params"], history
