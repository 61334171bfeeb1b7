"""The jitted train step shared by SFT and RL: `step(state, batch) -> (state, metrics)`.

A loss function (looked up by name: `sft.LOSSES`, `rl.losses.LOSSES`) returns a *sum* over
tokens plus the number of tokens it covers. The step sums both over the gradient-accumulation
microbatches (a `lax.scan`) and divides once at the end, so accumulating 4 x 2 rows is the same
update as one batch of 8 (not a mean of means).

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
        metrics = {k: v / n for k, v in sums.items() if k not in ("n_tokens", "loss_sum")}
        metrics |= {
            "loss": sums["loss_sum"] / n,
            "tokens": sums["n_tokens"],
            "grad_norm": optax.tree_utils.tree_norm(grads),
            "lr": schedule(state["step"]),
        }
        return new_state, metrics

    return step


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
