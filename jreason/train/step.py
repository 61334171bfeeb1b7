"""The jitted train step shared by SFT and RL: `step(state, batch) -> (state, metrics)`.

A loss function (looked up by name: `sft.LOSSES`, `rl.losses.LOSSES`) returns a *sum* over
tokens plus the number of tokens it covers. The step sums both over the gradient-accumulation
microbatches (a `lax.scan`) and divides once at the end, so accumulating 4 x 2 rows is the same
update as one batch of 8 (not a mean of means).

`n_tokens` is the loss's denominator: tokens for SFT, but an RL loss may count sequences
(`rl/losses.py`). Every other aux value is a sum too, reported divided by `n_tokens`, unless
the loss also returns a count for it: a key `<group>_count` is the denominator of the metrics
`<group>` and `<group>_<name>` (so `token_count` averages `token_entropy`, `token_kl`, ... over
tokens even when the loss is a mean over sequences), and is itself reported as a plain sum.

Randomness: each microbatch gets `mb["rng"]`, raw uint32 key data split from
`fold_in(state["rng"], state["step"])`, so a stochastic loss (recurrent depth's sampled r) draws
fresh values every step and a resumed run draws the same ones; deterministic losses never read
it. A batch that already carries `rng` (A, ...) keeps it: the caller chose the keys.

Compiled once with explicit in/out shardings and the state donated; batch shapes are fixed by
the pipeline, so nothing recompiles after step 1.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

# A loss: (model, params, microbatch) -> (loss_sum, {"n_tokens": ..., other sums}).
LossFn = Callable[..., tuple[jax.Array, dict]]


def make_train_step(model, optimizer, schedule, loss_fn: LossFn):
    def step(state, batch):
        """batch leaves are (A, b, T): A microbatches of b rows each."""
        params = state["params"]
        if "rng" not in batch:
            # made here, inside the jit: replicated, and no input sharding to declare
            A = jax.tree.leaves(batch)[0].shape[0]
            key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
            batch = {**batch, "rng": jax.random.key_data(jax.random.split(key, A))}  # (A, 2)
        grad_fn = jax.value_and_grad(lambda p, mb: loss_fn(model, p, mb), has_aux=True)

        def micro(carry, mb):
            grads, sums = carry
            (loss_sum, aux), g = grad_fn(params, mb)
            grads = jax.tree.map(jnp.add, grads, g)
            sums = jax.tree.map(jnp.add, sums, {"loss_sum": loss_sum, **aux})
            return (grads, sums), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        mb0 = jax.tree.map(lambda x: x[0], batch)
        sums0 = jax.tree.map(
            lambda x: jnp.zeros((), jnp.float32),
            {"loss_sum": 0.0, **jax.eval_shape(lambda: loss_fn(model, params, mb0)[1])},
        )
        (grads, sums), _ = jax.lax.scan(micro, (zeros, sums0), batch)
        n = jnp.maximum(sums["n_tokens"], 1.0)
        grads = jax.tree.map(lambda g: g / n, grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_state = {
            "step": state["step"] + 1,
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
            "rng": state["rng"],
        }
        metrics = {k: _mean(k, sums, n) for k in sums if k not in ("n_tokens", "loss_sum")}
        metrics |= {
            "loss": sums["loss_sum"] / n,
            "tokens": sums["n_tokens"],
            "grad_norm": optax.tree_utils.tree_norm(grads),
            "lr": schedule(state["step"]),
        }
        return new_state, metrics

    return step


def _mean(key: str, sums: dict, n):
    """The reported value of aux sum `key`: see the module docstring for which count divides it."""
    if key.endswith("_count"):
        return sums[key]
    parts = key.split("_")
    for i in range(len(parts), 0, -1):  # the longest `<group>_count` wins
        count = "_".join(parts[:i]) + "_count"
        if count in sums:
            return sums[key] / jnp.maximum(sums[count], 1.0)
    return sums[key] / n


def batch_sharding(mesh) -> NamedSharding:
    """(A, b, T) batches: rows split over data and fsdp, microbatch and time axes whole."""
    return NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"), None))


def compile_step(step_fn, state_shardings, mesh):
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
