"""Grouped-query attention through one function with interchangeable implementations.

`reference` is the readable einsum + mask version: the definition the others are tested
against. `xla` and `cudnn` go through `jax.nn.dot_product_attention`, which on GPU can use
cuDNN's fused flash attention and elsewhere lowers to XLA. All take the same boolean mask, so
the decoder builds the mask once (causal, packed segments, cache validity, sliding window).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def make_mask(
    q_positions_bt,
    kv_positions_bs,
    *,
    q_segment_ids_bt=None,
    kv_segment_ids_bs=None,
    sliding_window: int | None = None,
):
    """Boolean (B, T, S) mask: key s is visible to query t.

    Causality is by position: a key is visible if its position is <= the query's. In a packed
    training row positions restart at 0 per document, so segments (not positions) keep
    documents apart; segment id 0 marks padding, which sees nothing but itself.
    """
    mask_bts = kv_positions_bs[:, None, :] <= q_positions_bt[:, :, None]
    if sliding_window is not None:
        mask_bts &= kv_positions_bs[:, None, :] > q_positions_bt[:, :, None] - sliding_window
    if q_segment_ids_bt is not None:
        mask_bts &= q_segment_ids_bt[:, :, None] == kv_segment_ids_bs[:, None, :]
    return mask_bts


def attention(q_btnh, k_bskh, v_bskh, mask_bts, *, impl: str = "xla", scale: float | None = None):
    """softmax(q k^T * scale + mask) v for N query heads sharing K kv heads. Returns (B, T, N, H)."""
    *_, N, H = q_btnh.shape
    K = k_bskh.shape[2]
    if N % K:
        raise ValueError(f"query heads ({N}) must be a multiple of kv heads ({K})")
    scale = H**-0.5 if scale is None else scale
    if impl == "reference":
        return _reference(q_btnh, k_bskh, v_bskh, mask_bts, scale)
    if impl in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(
            q_btnh,
            k_bskh,
            v_bskh,
            mask=mask_bts[:, None, :, :],
            scale=scale,
            implementation=impl,
        )
    raise ValueError(f"attention_impl: unknown {impl!r}; allowed: reference, xla, cudnn")


def _reference(q_btnh, k_bskh, v_bskh, mask_bts, scale):
    B, T, N, H = q_btnh.shape
    K = k_bskh.shape[2]
    G = N // K
    q_btkgh = q_btnh.reshape(B, T, K, G, H)
    logits_bkgts = jnp.einsum(
        "BTKGH,BSKH->BKGTS", q_btkgh, k_bskh, preferred_element_type=jnp.float32
    )
    logits_bkgts = logits_bkgts * scale
    # finfo.min rather than -inf: a fully masked row (a padding query) gives a uniform softmax
    # instead of NaNs that would poison gradients.
    big_neg = jnp.finfo(jnp.float32).min
    logits_bkgts = jnp.where(mask_bts[:, None, None, :, :], logits_bkgts, big_neg)
    probs_bkgts = jax.nn.softmax(logits_bkgts, axis=-1).astype(v_bskh.dtype)
    out_btkgh = jnp.einsum("BKGTS,BSKH->BTKGH", probs_bkgts, v_bskh)
    return out_btkgh.reshape(B, T, N, H)


def cached_attention(q_btnh, k_bkhs, v_bksh, mask_bts, *, scale: float | None = None):
    """Attention of T new queries over a KV cache in kv_cache.py's layout. Returns (B, T, N, H).

    The G query heads of each kv head are folded with T into the rows of one batched matmul per
    (B, K), against K stored as (H, S) and V as (S, H), so neither product transposes the cache.
    """
    B, T, N, H = q_btnh.shape
    K = k_bkhs.shape[1]
    if N % K:
        raise ValueError(f"query heads ({N}) must be a multiple of kv heads ({K})")
    G, S = N // K, k_bkhs.shape[-1]
    scale = H**-0.5 if scale is None else scale
    q_bkrh = (
        (q_btnh * scale).reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    )
    logits_bkgts = jnp.matmul(q_bkrh, k_bkhs, preferred_element_type=jnp.float32)
    logits_bkgts = logits_bkgts.reshape(B, K, G, T, S)
    big_neg = jnp.finfo(jnp.float32).min  # as in _reference: no NaNs for fully masked rows
    logits_bkgts = jnp.where(mask_bts[:, None, None, :, :], logits_bkgts, big_neg)
    probs_bkrs = jax.nn.softmax(logits_bkgts, axis=-1).astype(v_bksh.dtype).reshape(B, K, G * T, S)
    out_bkgth = jnp.matmul(probs_bkrs, v_bksh).reshape(B, K, G, T, H)
    return out_bkgth.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
