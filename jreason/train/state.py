"""TrainState, the optimizer that updates it, and the shardings both live under.

The state is a plain dict pytree, `{"step", "params", "opt_state", "rng"}`: what orbax saves and
what the jitted step takes (donated) and returns. Optimizer moments get exactly the sharding of
the parameter they belong to (`optax.tree_map_params`), scalars are replicated, so the state's
sharding is derived from the one logical-axis table and nothing else.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jreason import sharding
from jreason.config import ConfigError
from jreason.train.config import OptimConfig


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    end = cfg.lr * cfg.min_lr_ratio
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, warmup + decay_steps, end)
    if cfg.schedule == "linear":
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)),
                optax.linear_schedule(cfg.lr, end, decay_steps),
            ],
            [warmup],
        )
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)), optax.constant_schedule(cfg.lr)],
        [warmup],
    )


def _decay_mask(params):
    # No weight decay on norm scales and biases (1-D per layer), as in GPT-2 / LLaMA recipes.
    def decays(path, x):
        name = str(path[-1].key)
        return not (name == "scale" or name.endswith("_bias"))

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig, total_steps: int):
    if cfg.schedule_steps is not None and cfg.schedule_steps < 1:
        raise ConfigError(f"optim.schedule_steps={cfg.schedule_steps} must be >= 1 (or null)")
    schedule = make_schedule(cfg, cfg.schedule_steps or total_steps)
    parts = []
    if cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=_decay_mask,
        )
    )
    return optax.chain(*parts), schedule


def init_state(params, optimizer, seed: int) -> dict:
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": optimizer.init(params),
        "rng": jax.random.key_data(jax.random.key(seed)),
    }


def state_shardings(optimizer, abstract_params, param_axes, mesh) -> dict:
    """NamedShardings for every leaf of the state, derived from the params' logical axes."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params_sh = sharding.param_shardings(param_axes, mesh, abstract_params)
    opt_shapes = jax.eval_shape(optimizer.init, abstract_params)
    opt_sh = optax.tree_map_params(
        optimizer,
        lambda _, sh: sh,
        opt_shapes,
        params_sh,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    return {"step": replicated, "params": params_sh, "opt_state": opt_sh, "rng": replicated}


def abstract_state(optimizer, abstract_params, shardings: dict, seed: int = 0) -> dict:
    """ShapeDtypeStructs with shardings: the restore target for orbax."""
    shapes = jax.eval_shape(lambda p: init_state(p, optimizer, seed), abstract_params)
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
