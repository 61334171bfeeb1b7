"""Per-row sampling with parameters as arrays, so mixing settings in a batch never recompiles.

`sample(logits_bv, key, params)` applies temperature, top-k, top-p and min-p per row and returns
the chosen tokens and their log-probabilities. A row with temperature 0 is greedy. Log-probs are
those of the temperature-scaled distribution *before* top-k/top-p/min-p filtering: that is the
policy an RL trainer recomputes, and filtering only decides which tokens may be drawn.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingArrays:
    """One value per row; top_k <= 0, top_p >= 1 and min_p <= 0 disable those filters."""

    temperature: jax.Array  # (B,) float32
    top_k: jax.Array  # (B,) int32
    top_p: jax.Array  # (B,) float32
    min_p: jax.Array  # (B,) float32

    @staticmethod
    def fill(batch: int, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0) -> SamplingArrays:
        return SamplingArrays(
            temperature=jnp.full((batch,), temperature, jnp.float32),
            top_k=jnp.full((batch,), top_k, jnp.int32),
            top_p=jnp.full((batch,), top_p, jnp.float32),
            min_p=jnp.full((batch,), min_p, jnp.float32),
        )


jax.tree_util.register_dataclass(
    SamplingArrays, data_fields=["temperature", "top_k", "top_p", "min_p"], meta_fields=[]
)


def sample(logits_bv, key, params: SamplingArrays):
    """Returns (tokens (B,) int32, logprobs (B,) float32)."""
    logits_bv = logits_bv.astype(jnp.float32)
    B, V = logits_bv.shape
    greedy = params.temperature <= 0
    temp_b1 = jnp.where(greedy, 1.0, params.temperature)[:, None]
    scaled_bv = logits_bv / temp_b1
    logprobs_bv = jax.nn.log_softmax(scaled_bv, axis=-1)

    # Filters work on the sorted distribution: keep a token iff its scaled logit >= a per-row
    # threshold, so ties at the threshold are kept (as in vLLM / HF).
    sorted_bv = jnp.sort(scaled_bv, axis=-1)[:, ::-1]
    k_b = jnp.where(params.top_k > 0, jnp.minimum(params.top_k, V), V)
    kth_b = jnp.take_along_axis(sorted_bv, (k_b - 1)[:, None], axis=-1)[:, 0]
    probs_sorted_bv = jax.nn.softmax(sorted_bv, axis=-1)
    # top-p: the smallest prefix whose mass reaches p; a token is in if the mass before it < p
    mass_before_bv = jnp.cumsum(probs_sorted_bv, axis=-1) - probs_sorted_bv
    n_keep_b = jnp.maximum(jnp.sum(mass_before_bv < params.top_p[:, None], axis=-1), 1)
    pth_b = jnp.take_along_axis(sorted_bv, (n_keep_b - 1)[:, None], axis=-1)[:, 0]
    # min-p: p >= min_p * p_max  <=>  logit >= logit_max + log(min_p)
    minp_b = jnp.where(
        params.min_p > 0, sorted_bv[:, 0] + jnp.log(jnp.maximum(params.min_p, 1e-30)), -jnp.inf
    )
    threshold_b = jnp.maximum(jnp.maximum(kth_b, pth_b), minp_b)
    filtered_bv = jnp.where(scaled_bv >= threshold_b[:, None], scaled_bv, -jnp.inf)

    sampled_b = jax.random.categorical(key, filtered_bv, axis=-1)
    tokens_b = jnp.where(greedy, jnp.argmax(logits_bv, axis=-1), sampled_b).astype(jnp.int32)
    logprob_b = jnp.take_along_axis(logprobs_bv, tokens_b[:, None], axis=-1)[:, 0]
    return tokens_b, logprob_b
