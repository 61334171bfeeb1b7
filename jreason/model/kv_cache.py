"""The KV cache: an explicit pytree passed into the decoder and returned, never hidden state.

Layout: a list of L per-layer dicts `{"k": (B, S, K, H), "v": (B, S, K, H)}`. K and V are separate
buffers so both can be donated to a jitted step (two caches sharing one buffer cannot), and each
layer has its own buffers because the cached path runs the layers unrolled (transformer.py): on
XLA:CPU slicing layer l out of a stacked (L, ...) array inside the step copies it every token.

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
CACHE_AXES = ("batch", "cache_seq", "kv_heads", "head_dim")


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> list[dict]:
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    return [
        {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.n_layers)
    ]


def cache_len(cache: list[dict]) -> int:
    """S, the number of slots (positions) per row."""
    return cache[0]["k"].shape[1]


def cache_axes(cache: list[dict]) -> list[dict]:
    return [{name: CACHE_AXES for name in layer} for layer in cache]


def write(cache_bskh, new_btkh, positions_bt):
    """Scatters new entries at their positions; positions past the end are dropped."""
    B = new_btkh.shape[0]
    rows_b1 = jnp.arange(B)[:, None]
    return cache_bskh.at[rows_b1, positions_bt].set(new_btkh.astype(cache_bskh.dtype), mode="drop")
