"""Per-token statistics of the output distribution without the full (B, T, V) fp32 logits.

A training loss only needs, per position, the log-probability of the target token (and for RL
the entropy, for SFT whether the argmax was right). Materializing the logits for that costs
B * T * V * 4 bytes forward and again for their gradient: at a 151k vocabulary, 8 x 4096 tokens
are 20 GB, more than the rest of a 1.5B model's activations. Here the sequence is cut into chunks
of `chunk` positions and a `lax.map` computes each chunk's logits, reduces them to the per-token
statistics and drops them; `jax.checkpoint` on the chunk body makes the backward pass recompute
a chunk's logits instead of keeping them, so peak memory holds one chunk's (B, chunk, V) logits
(MaxText's `num_vocab_tiling`, levanter's blockwise cross-entropy). Costs one extra lm_head
matmul in the backward pass (~2% of a 1B step).

`chunk = 0` computes the plain way; both give the same numbers (tests/model/test_vocab_head.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jreason.model.layers import dense, dense_t


def logit_stats(logits_btv, targets_bt, temperature=1.0, entropy: bool = False) -> dict:
    """`token_stats` from logits already computed (one chunk, or a model without a head weight)."""
    temp = jnp.asarray(temperature, jnp.float32)
    if temp.ndim:  # per-row (B,) or (B, 1, 1)
        temp = temp.reshape(-1, 1, 1)
    logits_btv = logits_btv.astype(jnp.float32) / temp
    lse_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    out = {
        "logp": target_bt - lse_bt,
        "correct": jnp.argmax(logits_btv, axis=-1) == targets_bt,  # first index wins ties
    }
    if entropy:
        p_btv = jnp.exp(logits_btv - lse_bt[..., None])
        out["entropy"] = lse_bt - jnp.sum(p_btv * logits_btv, axis=-1)
    return out


def logits(h_btd, w_dv):
    """Final-norm'd hidden states (..., D) @ the head (D, V) -> float32 logits (..., V): the one
    head matmul every forward, prefill and loss uses (the weight cast to the activations' dtype,
    accumulated in float32)."""
    return dense(h_btd, w_dv.astype(h_btd.dtype), preferred_element_type=jnp.float32)


def logits_t(h_btd, w_vd):
    """`logits` from the head stored output-major (V, D): the embedding itself when tied. What
    decode uses on CPU (layers.dense_t has why)."""
    return dense_t(h_btd, w_vd.astype(h_btd.dtype), preferred_element_type=jnp.float32)


def _stats(h_btd, w_dv, targets_bt, temperature, entropy: bool):
    return logit_stats(logits(h_btd, w_dv), targets_bt, temperature, entropy)


def token_stats(
    h_btd, w_dv, targets_bt, *, chunk: int = 0, temperature=1.0, entropy: bool = False
) -> dict:
    """{"logp": log p(target), "correct": argmax == target, ["entropy"]}, each (B, T).

    `h_btd` are final-norm'd hidden states, `w_dv` the output projection (Model.head_weight).
    `temperature` is a float or per-row temperatures of shape (B,) or (B, 1, 1).
    """
    if chunk < 0:
        raise ValueError(f"logits_chunk: must be >= 0, got {chunk}")
    B, T, _ = h_btd.shape
    temp = jnp.asarray(temperature, jnp.float32)
    temp = jnp.broadcast_to(temp.reshape(-1, 1, 1), (B, 1, 1)) if temp.ndim else temp
    if not chunk or chunk >= T:
        return _stats(h_btd, w_dv, targets_bt, temp, entropy)
    n = -(-T // chunk)
    pad = n * chunk - T
    h_btd = jnp.pad(h_btd, ((0, 0), (0, pad), (0, 0)))
    targets_bt = jnp.pad(targets_bt, ((0, 0), (0, pad)))

    def to_chunks(x):  # (B, n*c, ...) -> (n, B, c, ...)
        return jnp.moveaxis(x.reshape(B, n, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint  # the backward pass recomputes a chunk's logits instead of storing them
    def body(args):
        h_bcd, targets_bc = args
        return _stats(h_bcd, w_dv, targets_bc, temp, entropy)

    out = jax.lax.map(body, (to_chunks(h_btd), to_chunks(targets_bt)))
    return {k: jnp.moveaxis(v, 0, 1).reshape(B, n * chunk)[:, :T] for k, v in out.items()}
