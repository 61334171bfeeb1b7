"""The batch sampler against the plain forward pass, and sampling filters against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from greedy_reference import argmax_reference

from jreason.decode.sampler import generate
from jreason.decode.sampling import SamplingArrays, argmax, sample
from jreason.model import init_model, load_config
from jreason.model.transformer import unstack_layers


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("tiny-qwen3", ["vocab_size=64"])
    # scale up the init so greedy continuations are not all one token
    model, params = init_model(cfg.replace(init_std=0.2), jax.random.key(1))
    return model, params


def test_greedy_equals_full_forward_argmax_for_mixed_lengths(tiny):
    model, params = tiny
    prompts = [[1, 5, 9], [3, 4, 5, 6, 7, 8, 9, 10, 11], [2]]
    outs = generate(model, params, prompts, max_new_tokens=12, bucket=8)
    for prompt, out in zip(prompts, outs):
        assert out["tokens"] == argmax_reference(model, params, prompt, 12)


def test_stop_tokens_end_rows_independently(tiny):
    model, params = tiny
    prompts = [[1, 5, 9], [3, 4]]
    free = generate(model, params, prompts, max_new_tokens=10)
    stop = free[0]["tokens"][3]
    outs = generate(model, params, prompts, max_new_tokens=10, stop_ids=[stop])
    first = free[0]["tokens"].index(stop)
    assert outs[0]["tokens"] == free[0]["tokens"][: first + 1]
    if stop in free[1]["tokens"]:
        assert outs[1]["tokens"] == free[1]["tokens"][: free[1]["tokens"].index(stop) + 1]
    else:
        assert outs[1]["tokens"] == free[1]["tokens"]


def test_filters_only_draw_allowed_tokens():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4))
    params = SamplingArrays(
        temperature=jnp.array([1.0, 1.0, 1.0, 0.0]),
        top_k=jnp.array([2, 0, 0, 0]),
        top_p=jnp.array([1.0, 0.7, 1.0, 1.0]),
        min_p=jnp.array([0.0, 0.0, 0.5, 0.0]),
    )
    allowed = [{0, 1}, {0, 1}, {0, 1}, {0}]  # top-k 2; mass before token < .7; p >= .25; greedy
    seen = [set() for _ in range(4)]
    keys = jax.random.split(jax.random.key(0), 200)
    toks, logps = jax.vmap(lambda k: sample(logits, jax.random.split(k, 4), params))(keys)
    for b in range(4):
        seen[b] = set(np.asarray(toks[:, b]).tolist())
        assert seen[b] <= allowed[b], (b, seen[b])
    assert seen[0] == {0, 1}  # both allowed tokens do get drawn
    # log-probs are those of the unfiltered, temperature-scaled distribution
    np.testing.assert_allclose(np.exp(logps[:, 0]), np.where(toks[:, 0] == 0, 0.5, 0.3), rtol=1e-5)


def test_argmax_is_jnp_argmax_with_ties_nans_and_bools():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, (64, 37)).astype(np.float32)  # many ties: the first index must win
    x[3, [9, 5]] = np.nan  # a NaN counts as the maximum, the first NaN wins
    x[7] = -np.inf
    x[8] = np.nan
    x[9, -1] = np.inf
    above = rng.random((64, 37)) > 0.8
    above[0] = False  # no True: index 0, as jnp.argmax
    for a in (x, above):
        want = np.asarray(jnp.argmax(jnp.asarray(a), axis=-1))
        np.testing.assert_array_equal(np.asarray(argmax(jnp.asarray(a))), want)


def test_keys_as_a_function_draw_the_same_tokens():
    logits = jax.random.normal(jax.random.key(3), (6, 50)) * 3
    params = SamplingArrays(
        temperature=jnp.array([1.0, 0.0, 0.7, 1.3, 0.0, 1.0]),
        top_k=jnp.array([0, 0, 5, 0, 0, 0]),
        top_p=jnp.array([1.0, 1.0, 1.0, 0.9, 1.0, 1.0]),
        min_p=jnp.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.1]),
    )
    keys = jax.random.split(jax.random.key(4), 6)
    for p in (params, SamplingArrays.fill(6)):  # mixed rows, and the all-greedy branch
        eager = sample(logits, keys, p)
        lazy = jax.jit(lambda lg, p: sample(lg, lambda: keys, p))(logits, p)
        for a, b in zip(eager, lazy):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("layout", ["stored", "decode", "fused_in_major", "fused_out_major"])
def test_apply_at_is_the_full_logits_at_each_rows_index(tiny, layout):
    model, params = tiny
    if layout == "decode":  # per-layer weights, fused projections, on CPU output-major
        params = model.decode_params(params)
    elif layout.startswith("fused"):  # either fused layout, whatever the backend
        params = unstack_layers(params, out_major=layout == "fused_out_major")
        assert ("head_vd" in params) == (layout == "fused_out_major")
    tokens = jax.random.randint(jax.random.key(5), (3, 7), 1, 64)
    positions = jnp.broadcast_to(jnp.arange(7), (3, 7))
    index = jnp.array([6, 2, 4])
    full, cache_full = model.apply(params, tokens, positions, model.init_cache(3, 12))
    at, cache_at = model.apply_at(params, tokens, positions, model.init_cache(3, 12), index)
    np.testing.assert_allclose(at, full[jnp.arange(3), index], rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(cache_at), jax.tree.leaves(cache_full)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if layout != "stored":  # and both equal the stored layout's forward (the unfused matmuls)
        stored, _ = model.apply(tiny[1], tokens, positions, model.init_cache(3, 12))
        np.testing.assert_allclose(full, stored, rtol=1e-5, atol=1e-5)
