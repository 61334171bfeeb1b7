"""The SFT step: hand-checked loss, identical losses across meshes, accumulation, no recompiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_count import count_compiles

from jreason.model import init_model, load_config
from jreason.model.transformer import param_axes
from jreason.sharding import make_mesh
from jreason.train import state as state_lib
from jreason.train.config import OptimConfig
from jreason.train.sft import cross_entropy_loss, to_global_batch
from jreason.train.step import compile_step, make_train_step


def _batch(B=8, T=16, V=64, seed=0):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, V, (B, T)).astype(np.int32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    # two documents per row, padding at the end, some tokens (prompts) masked out
    seg = np.ones((B, T), np.int32)
    seg[:, T // 2 :] = 2
    seg[:, -2:] = 0
    pos = np.concatenate([np.arange(T // 2), np.arange(T - T // 2)])
    pos = np.broadcast_to(pos, (B, T)).astype(np.int32)
    mask = (rng.random((B, T)) < 0.7).astype(np.float32) * (seg > 0)
    return {
        "inputs": inputs,
        "targets": targets,
        "positions": pos,
        "segment_ids": seg,
        "loss_mask": mask,
    }


def _trainer(mesh, overrides=()):
    cfg = load_config("tiny-llama", ["vocab_size=64", "n_heads=4", "n_kv_heads=4", *overrides])
    model, params = init_model(cfg, jax.random.key(0))
    optimizer, schedule = state_lib.make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0), 10)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    sh = state_lib.state_shardings(optimizer, shapes, param_axes(cfg), mesh)
    state = jax.jit(lambda p: state_lib.init_state(p, optimizer, 0), out_shardings=sh)(params)
    step = compile_step(make_train_step(model, optimizer, schedule, cross_entropy_loss), sh, mesh)
    return model, state, step


def _run(mesh, accum=1, steps=3):
    _, state, step = _trainer(mesh)
    losses = []
    for i in range(steps):
        state, m = step(state, to_global_batch(_batch(seed=i), mesh, accum))
        losses.append(float(m["loss"]))
    return losses, jax.device_get(state["params"])


def test_loss_matches_hand_computation():
    model, state, _ = _trainer(make_mesh(devices=jax.devices()[:1]))
    params, b = state["params"], _batch()
    loss_sum, aux = cross_entropy_loss(model, params, jax.tree.map(jnp.asarray, b))
    logits, _ = model.apply(params, b["inputs"], b["positions"], None, b["segment_ids"])
    logits = np.asarray(logits, np.float64)
    top = logits.max(-1)
    logz = np.log(np.exp(logits - top[..., None]).sum(-1)) + top
    nll = logz - np.take_along_axis(logits, b["targets"][..., None], -1)[..., 0]
    np.testing.assert_allclose(float(loss_sum), (nll * b["loss_mask"]).sum(), rtol=1e-5)
    assert float(aux["n_tokens"]) == b["loss_mask"].sum()


@pytest.fixture(scope="module")
def single_device_run():
    return _run(make_mesh(devices=jax.devices()[:1]))


@pytest.mark.parametrize(
    "shape", [dict(data=8), dict(fsdp=8), dict(data=2, fsdp=2, tensor=2)], ids=str
)
def test_losses_equal_across_meshes(single_device_run, shape):
    # Losses must agree to 1e-5. Params get a looser absolute bound: Adam divides by sqrt(v), so
    # a parameter whose gradient is ~0 turns reduction-order noise into a visible update; a
    # wrong gradient would still show as a difference of order lr (1e-2).
    # Losses must agree to 1e-5. Params get a looser absolute bound: Adam divides by sqrt(v), so
    # a parameter whose gradient is ~0 turns reduction-order noise into a visible update; a
    # wrong gradient would still show as a difference of order lr (1e-2).
    losses, params = _run(make_mesh(**shape))
    np.testing.assert_allclose(losses, single_device_run[0], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4),
        params,
        single_device_run[1],
    )


def test_gradient_accumulation_4x2_equals_batch_8(single_device_run):
    losses, params = _run(make_mesh(devices=jax.devices()[:1]), accum=4)
    np.testing.assert_allclose(losses, single_device_run[0], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4),
        params,
        single_device_run[1],
    )


def test_no_recompilation_after_first_step():
    with count_compiles() as compiles:
        mesh = make_mesh(fsdp=8)
        _, state, step = _trainer(mesh)
        state, _ = step(state, to_global_batch(_batch(seed=0), mesh, 1))
        after_first = len(compiles)
        assert after_first >= 1  # the listener does see compilations
        for i in range(5):
            state, m = step(state, to_global_batch(_batch(seed=1 + i), mesh, 1))
        jax.block_until_ready(m)
    assert len(compiles) == after_first, compiles[after_first:]


@pytest.mark.parametrize(
    "overrides,rtol",
    [
        (["remat=full"], 1e-6),
        (["remat=dots"], 1e-6),
        (["scan_layers=false"], 1e-6),
        (["scan_layers=false", "remat=full"], 1e-6),
        (["dtype=bfloat16"], 2e-2),
    ],
    ids=["remat-full", "remat-dots", "layer-loop", "layer-loop-remat", "bf16-compute-fp32-master"],
)
def test_remat_and_dtype_policy(overrides, rtol):
    """Remat and a layer loop instead of a scan change nothing numerically; bf16 compute over
    fp32 master weights stays close."""
    mesh = make_mesh(devices=jax.devices()[:1])
    runs = []
    for extra in ([], overrides):
        _, state, step = _trainer(mesh, extra)
        losses = []
        for i in range(2):
            state, m = step(state, to_global_batch(_batch(seed=i), mesh, 1))
            losses.append(float(m["loss"]))
        assert state["params"]["embed"].dtype == jnp.float32  # master weights stay fp32
        runs.append(losses)
    np.testing.assert_allclose(runs[1], runs[0], rtol=rtol)


def test_schedule_steps_stops_partway_down_the_schedule():
    """optim.schedule_steps: a 6-step run on a 10-step horizon sees the first 6 learning rates of
    the 10-step run (and so decays less than a 6-step schedule); a bad value names the key."""
    import dataclasses

    from jreason.config import ConfigError

    cfg = OptimConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.0)
    _, full = state_lib.make_optimizer(cfg, 10)
    _, part = state_lib.make_optimizer(dataclasses.replace(cfg, schedule_steps=10), 6)
    _, short = state_lib.make_optimizer(cfg, 6)
    np.testing.assert_allclose([part(i) for i in range(6)], [full(i) for i in range(6)])
    assert float(short(5)) < float(part(5)) - 0.1
    with pytest.raises(ConfigError, match="optim.schedule_steps"):
        state_lib.make_optimizer(dataclasses.replace(cfg, schedule_steps=0), 6)
