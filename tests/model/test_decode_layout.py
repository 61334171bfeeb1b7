"""The decode layout (transformer.unstack_layers): per-layer weights, fused projections, and on
CPU output-major weights and head. Both fused layouts must compute what the stored one does,
for every bias switch and for tied and untied heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jreason.model import init_model, load_config
from jreason.model.transformer import unstack_layers

SWITCHES = {
    "qwen2 tied": ["qkv_bias=true", "tie_embeddings=true"],
    "all biases untied": [
        "qkv_bias=true",
        "o_bias=true",
        "mlp_bias=true",
        "tie_embeddings=false",
    ],
    "qk_norm untied": ["qk_norm=true", "tie_embeddings=false"],
}


@pytest.mark.parametrize("switches", sorted(SWITCHES))
@pytest.mark.parametrize("out_major", [False, True])
def test_fused_layouts_compute_the_stored_forward(switches, out_major):
    cfg = load_config("tiny", ["vocab_size=96", "n_layers=2", *SWITCHES[switches]])
    model, params = init_model(cfg.replace(init_std=0.2), jax.random.key(3))
    # biases are initialized to zero: give them values, so a bias on the wrong axis shows
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    params = jax.tree.unflatten(
        treedef, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )
    decode = unstack_layers(params, out_major=out_major)

    layer = decode["layers"][0]
    D, F = cfg.d_model, cfg.d_ff
    C, H = cfg.n_heads + 2 * cfg.n_kv_heads, cfg.head_dim
    if out_major:
        assert layer["attn"]["q_proj"].shape == (C, H, D)
        assert layer["attn"]["o_proj"].shape == (D, cfg.n_heads, H)
        assert layer["attn"]["k_proj"].shape == (0, H, D)
        assert layer["mlp"]["gate_proj"].shape == (2 * F, D)
        assert layer["mlp"]["up_proj"].shape == (0, D)
        assert layer["mlp"]["down_proj"].shape == (D, F)
        assert decode["head_vd"].shape == (cfg.vocab_size, D)
    else:
        assert layer["attn"]["q_proj"].shape == (D, C, H)
        assert layer["attn"]["k_proj"].shape == (D, 0, H)
        assert layer["mlp"]["up_proj"].shape == (D, 0)
        assert "head_vd" not in decode
        # a tied head on CPU: a (D, V) copy, so no step transposes the embedding
        on_cpu = jax.default_backend() == "cpu"
        assert ("head_dv" in decode) == (on_cpu and cfg.tie_embeddings)

    tokens = jax.random.randint(jax.random.key(5), (2, 9), 1, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    want, cache_want = model.apply(params, tokens, positions, model.init_cache(2, 12))
    got, cache_got = model.apply(decode, tokens, positions, model.init_cache(2, 12))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    for a, b in zip(jax.tree.leaves(cache_got), jax.tree.leaves(cache_want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # and a one-token decode step on that cache
    nxt = jnp.argmax(want[:, -1], axis=-1)[:, None]
    pos = jnp.full((2, 1), 9)
    want1, _ = model.apply(params, nxt, pos, cache_want)
    got1, _ = model.apply(decode, nxt, pos, cache_got)
    np.testing.assert_allclose(got1, want1, rtol=1e-4, atol=1e-4)
    assert model.head_weight(decode).shape == (D, cfg.vocab_size)
    np.testing.assert_array_equal(model.head_weight(decode), model.head_weight(params))


@pytest.mark.parametrize("out_major", [False, True])
def test_fused_layouts_of_sharded_params(out_major):
    """RL hands the engine weights sharded over a (data, fsdp, tensor) mesh; the layout is made
    under jit (engine._layout_jit) and the cached forward runs on what it returns."""
    from jreason.model.transformer import param_axes
    from jreason.sharding import make_mesh, param_shardings

    cfg = load_config("tiny", ["qkv_bias=true", "tie_embeddings=false"])
    model, params = init_model(cfg, jax.random.key(6))
    tokens = jax.random.randint(jax.random.key(7), (4, 8), 1, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(8), tokens.shape)
    want, _ = model.apply(params, tokens, positions, model.init_cache(4, 8))

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = jax.device_put(params, param_shardings(param_axes(cfg), mesh, params))
    decode = jax.jit(lambda p: unstack_layers(p, out_major=out_major))(sharded)
    assert ("head_vd" in decode) == out_major
    got, _ = jax.jit(model.apply)(decode, tokens, positions, model.init_cache(4, 8))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


def test_cpu_default_is_output_major_from_out_major_min_d():
    """decode_params' default (shapes only): output-major from d_model OUT_MAJOR_MIN_D on CPU,
    the stored layout below it and on accelerators."""
    from jreason.model.transformer import OUT_MAJOR_MIN_D, abstract_model

    on_cpu = jax.default_backend() == "cpu"
    for d, want in ((OUT_MAJOR_MIN_D, on_cpu), (OUT_MAJOR_MIN_D // 2, False)):
        cfg = load_config("tiny", [f"d_model={d}", "n_layers=1", "n_heads=4"])
        model, shapes = abstract_model(cfg)
        decode = jax.eval_shape(model.decode_params, shapes)
        assert ("head_vd" in decode) == want, d
        assert (decode["layers"][0]["mlp"]["up_proj"].shape[0] == 0) == want, d
