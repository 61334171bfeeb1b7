"""The KV cache: an explicit pytree passed into the decoder and returned, never hidden state.

Layout: a list of L per-layer dicts `{"k": (B, K, H, S), "v": (B, K, S, H)}`.
- K and V are separate buffers so both can be donated to a jitted step (two caches sharing one
  buffer cannot).
- Each layer has its own buffers because the cached path runs the layers unrolled
  (transformer.py): on XLA:CPU slicing layer l out of a stacked (L, ...) array inside the step
  copies it every token.
- K is stored transposed, (B, K, H, S), and V as (B, K, S, H), so the two attention products of
  a decode step are plain batched matmuls `q (B,K,G,H) @ k (B,K,H,S)` and `p (B,K,G,S) @ v`
  with no transpose of the cache: with the (B, S, K, H) layout XLA:CPU copied the whole K cache
  into matmul order in every layer of every step (2.5x the attention time at 192 slots).

Slot index == token position. Row b's token at position p is written to slot p and a query at
position q sees slots <= q. That single rule gives per-row lengths for free: rows of different
lengths share a batch, each row's next position is its own length, and stale entries beyond a
row's length are invisible (causality) until the row overwrites them. A Markovian context reset
is therefore `init_cache` (or just restarting positions at 0) plus a re-prefill.
"""

from __future__ import annotations

import jax.numpy as jnp

from jreason.model.config import ModelConfig

# Logical axes of each cache array, for jreason.sharding.
CACHE_AXES = {
    "k": ("batch", "kv_heads", "head_dim", "cache_seq"),
    "v": ("batch", "kv_heads", "cache_seq", "head_dim"),
}


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> list[dict]:
    dtype = jnp.dtype(dtype or cfg.dtype)
    B, K, H, S = batch, cfg.n_kv_heads, cfg.head_dim, max_len
    return [
        {"k": jnp.zeros((B, K, H, S), dtype), "v": jnp.zeros((B, K, S, H), dtype)}
        for _ in range(cfg.n_layers)
    ]


def cache_len(cache: list[dict]) -> int:
    """S, the number of slots (positions) per row."""
    return cache[0]["v"].shape[2]


def cache_axes(cache: list[dict]) -> list[dict]:
    return [{name: CACHE_AXES[name] for name in layer} for layer in cache]


def write(layer: dict, k_btkh, v_btkh, positions_bt) -> dict:
    """Scatters new K and V entries at their positions; positions past the end are dropped.

    A single entry (B = T = 1, a one-row decode step) is written twice, as two identical
    updates of the same slot: XLA rewrites a one-update scatter into a dynamic-update-slice,
    and XLA:CPU then fuses that with the reshape the attention matmul reads it through, which
    makes the update out of place. Inside the decode loop that cost four copies of every
    layer's K and V per token (the demo model's batch-1 step: 3.5k -> 4.9k tok/s without
    them; at a 4k-token cache the copies outweigh the weights). A two-update scatter stays a
    scatter, in place; the duplicate writes the same values, so the result is the same.
    """
    B = k_btkh.shape[0]
    if B * k_btkh.shape[1] == 1:
        k_btkh, v_btkh = (jnp.concatenate([x, x], axis=1) for x in (k_btkh, v_btkh))
        positions_bt = jnp.concatenate([positions_bt, positions_bt], axis=1)
    rows_b1 = jnp.arange(B)[:, None]
    # numpy advanced indexing: the (B, T) index dims lead, so both updates are (B, T, K, H)
    k = layer["k"].at[rows_b1, :, :, positions_bt].set(k_btkh.astype(layer["k"].dtype), mode="drop")
    v = layer["v"].at[rows_b1, :, positions_bt].set(v_btkh.astype(layer["v"].dtype), mode="drop")
    return {"k": k, "v": v}
