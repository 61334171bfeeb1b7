"""Chunked output statistics (model/vocab_head.py) against full-logit references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jreason.model import vocab_head
from jreason.model.config import ModelConfig
from jreason.model.transformer import init_model
from jreason.train.rl.losses import token_logprobs
from jreason.train.sft import cross_entropy_loss


def _reference(h, w, targets, temperature):
    """numpy float64 log-softmax, entropy and argmax over the full logits."""
    logits = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
    logits = logits / np.asarray(temperature, np.float64).reshape(-1, 1, 1)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    logp_all = logits - lse[..., None]
    logp = np.take_along_axis(logp_all, targets[..., None], -1)[..., 0]
    entropy = -(np.exp(logp_all) * logp_all).sum(-1)
    return logp, entropy, logits.argmax(-1) == targets


@pytest.mark.parametrize("chunk", [0, 1, 4, 5, 13, 64])
def test_token_stats_match_full_logits(chunk):
    """Every chunk size, including ones that do not divide T (padding) and >= T, equals the
    float64 full-logit computation."""
    B, T, D, V = 3, 13, 16, 50
    kh, kw, kt = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(kh, (B, T, D))
    w = jax.random.normal(kw, (D, V)) * 0.5
    targets = jax.random.randint(kt, (B, T), 0, V)
    temperature = np.array([1.0, 0.7, 1.3], np.float32)
    out = vocab_head.token_stats(h, w, targets, chunk=chunk, temperature=temperature, entropy=True)
    logp, entropy, correct = _reference(h, w, np.asarray(targets), temperature)
    np.testing.assert_allclose(out["logp"], logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["entropy"], entropy, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["correct"], correct)


def test_negative_chunk_is_refused():
    h, w, t = jnp.zeros((1, 2, 4)), jnp.zeros((4, 8)), jnp.zeros((1, 2), jnp.int32)
    with pytest.raises(ValueError, match="logits_chunk"):
        vocab_head.token_stats(h, w, t, chunk=-1)


def _batch(cfg, B=2, T=24, seed=1):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    mask = np.ones((B, T), np.float32)
    mask[0, :5] = 0  # a prompt
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
        "segment_ids": np.ones((B, T), np.int32),
        "loss_mask": mask,
    }


@pytest.mark.parametrize("tie", [True, False])
def test_sft_loss_and_gradient_do_not_depend_on_the_chunk(tie):
    """cross_entropy_loss with logits_chunk = 7 gives the loss, accuracy and gradients of the
    full-logit loss, which is checked against optax on the model's own logits."""
    import optax

    cfg = ModelConfig(
        vocab_size=97,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=64,
        tie_embeddings=tie,
    )
    model, params = init_model(cfg, jax.random.key(0))
    chunked, _ = init_model(cfg.replace(logits_chunk=7), jax.random.key(0))
    mb = _batch(cfg)

    def loss(m):
        return jax.value_and_grad(lambda p: cross_entropy_loss(m, p, mb), has_aux=True)(params)

    (l_full, aux_full), g_full = loss(model)
    (l_chunk, aux_chunk), g_chunk = loss(chunked)
    logits, _ = model.apply(params, mb["inputs"], mb["positions"], None, mb["segment_ids"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, mb["targets"])
    np.testing.assert_allclose(l_full, (ce * mb["loss_mask"]).sum(), rtol=1e-6)
    np.testing.assert_allclose(l_chunk, l_full, rtol=1e-6)
    assert aux_chunk["accuracy"] == aux_full["accuracy"]
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g_chunk, g_full
    )


def test_rl_token_logprobs_do_not_depend_on_the_chunk():
    cfg = ModelConfig(vocab_size=61, d_model=32, n_layers=1, n_heads=4, n_kv_heads=4, d_ff=64)
    model, params = init_model(cfg, jax.random.key(3))
    chunked, _ = init_model(cfg.replace(logits_chunk=5), jax.random.key(3))
    mb = _batch(cfg, T=17)
    args = (mb["inputs"], mb["positions"], mb["segment_ids"], mb["targets"], 0.8)
    logp, ent = token_logprobs(model, params, *args)
    logp_c, ent_c = token_logprobs(chunked, params, *args)
    np.testing.assert_allclose(logp_c, logp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ent_c, ent, rtol=1e-5, atol=1e-6)


def test_chunked_loss_gradient_never_holds_the_full_logits():
    """XLA's own buffer assignment: the gradient of the plain loss needs more temporary memory
    than one (B, T, V) fp32 logits array; with logits_chunk = 32 it needs less than half of one."""
    cfg = ModelConfig(vocab_size=8192, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64)
    B, T = 2, 256
    mb = _batch(cfg, B=B, T=T)
    logits_bytes = B * T * cfg.vocab_size * 4
    temp = {}
    for chunk in (0, 32):
        model, params = init_model(cfg.replace(logits_chunk=chunk), jax.random.key(0))
        grad = jax.jit(jax.grad(lambda p, m=model: cross_entropy_loss(m, p, mb)[0]))
        temp[chunk] = grad.lower(params).compile().memory_analysis().temp_size_in_bytes
    assert temp[0] > logits_bytes
    assert temp[32] < logits_bytes / 2, (temp, logits_bytes)
