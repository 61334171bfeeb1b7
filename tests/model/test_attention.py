"""The two attention implementations agree, on masks that exercise GQA, packing and windows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jreason.model.attention import attention, make_mask


def _inputs(B=2, T=9, N=6, K=2, H=16, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(k1, (B, T, N, H))
    k = jax.random.normal(k2, (B, T, K, H))
    v = jax.random.normal(k3, (B, T, K, H))
    return q, k, v


def _naive(q, k, v, mask):
    """Per-head loop in numpy: an independent, obviously correct definition."""
    q, k, v, mask = map(np.asarray, (q, k, v, mask))
    B, T, N, H = q.shape
    G = N // k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for n in range(N):
            s = q[b, :, n] @ k[b, :, n // G].T / np.sqrt(H)
            s = np.where(mask[b], s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[b, :, n] = p @ v[b, :, n // G]
    return out


@pytest.mark.parametrize("window", [None, 3])
def test_impls_equal_naive_on_packed_causal_mask(window):
    q, k, v = _inputs()
    seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 1, 1, 1]])
    pos = jnp.array([[0, 1, 2, 3, 0, 1, 2, 3, 4], list(range(9))])
    mask = make_mask(pos, pos, q_segment_ids_bt=seg, kv_segment_ids_bs=seg, sliding_window=window)
    expected = _naive(q, k, v, mask)
    for impl in ("reference", "xla"):
        np.testing.assert_allclose(attention(q, k, v, mask, impl=impl), expected, atol=1e-5)


def test_packed_documents_do_not_see_each_other():
    q, k, v = _inputs(B=1, T=6)
    seg = jnp.array([[1, 1, 1, 2, 2, 2]])
    pos = jnp.array([[0, 1, 2, 0, 1, 2]])
    mask = make_mask(pos, pos, q_segment_ids_bt=seg, kv_segment_ids_bs=seg)
    out = attention(q, k, v, mask, impl="reference")
    # the second document alone gives the same output as inside the packed row
    alone = attention(q[:, 3:], k[:, 3:], v[:, 3:], make_mask(pos[:, 3:], pos[:, 3:]), impl="xla")
    np.testing.assert_allclose(out[:, 3:], alone, atol=1e-5)


def test_unknown_impl_is_named():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="unknown 'flash'"):
        attention(q, k, v, jnp.ones((2, 9, 9), bool), impl="flash")
