"""The policy-gradient loss on the shared train step, and the weights that make its means exact.

`ppo_clip_loss(model, params, mb) -> (loss_sum, aux)` has the contract of
`sft.cross_entropy_loss`: `loss_sum` is a numerator, `aux["n_tokens"]` a denominator, and the
step (step.py) sums both over gradient-accumulation microbatches and divides once. Per token:

    ratio   = exp(logp - old)                                (logp recomputed, fp32)
    pg      = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) * tis
    loss_bt = pg + kl_coef * KL(logp, ref) - entropy_coef * H

- PPO clipping with separate eps_low / eps_high: DAPO's clip-higher (eps_high 0.28 vs 0.2)
  lets unlikely tokens with A > 0 grow, against entropy collapse. Where the clip is active
  (ratio > 1 + eps_high with A > 0, ratio < 1 - eps_low with A < 0) the gradient is zero.
- tis (off unless `tis_cap`): truncated importance sampling (Yao et al. 2025, "Your Efficient
  RL Framework Secretly Brings You Off-Policy RL Training"; verl `tis_imp_ratio_cap`). The
  engine samples with its own kernels, so its log-probs differ from the trainer's; with
  `old_logprobs_bt` recomputed by the trainer, weight each token by
  min(exp(old - engine), cap), a constant (no gradient).
- KL to a frozen reference (off by default, `kl_coef=0`): `k3` = exp(ref - logp) - (ref - logp)
  - 1, the low-variance, always >= 0 estimator GRPO (DeepSeekMath) uses; `k1` = logp - ref.
  As a loss term k1's gradient is zero in expectation on on-policy samples; it is here for
  comparison. Dr. GRPO and DAPO drop the KL term.
- entropy bonus (off by default): -entropy_coef * H(pi(.|context)).

Aggregation, i.e. how token losses become one number, is the main way GRPO, Dr. GRPO, DAPO and
Delethink differ, and a mean of per-microbatch means would change it with the accumulation
count. So the host computes, over the whole step batch, two per-token arrays
(`aggregation_weights`), and the loss is always

    numerator = sum(loss_weights_bt * loss_bt),  denominator = sum(loss_denom_bt)

which are sums over rows, exact however rows are split into microbatches:

    name                     objective                            weights        denom
    token_mean (DAPO)        sum_all l / #tokens                  1              1
    seq_mean_token_mean      mean_i (1/|o_i|) sum_t l             1/|o_i|        1 per sequence
      (GRPO, DeepSeekMath)
    seq_mean_token_sum_norm  mean_i (1/L) sum_t l, L a constant   1/L            1 per sequence
      (Dr. GRPO, Liu et al.)   max length: no length bias
    delethink                mean_tau (1/l(tau)) sum over the     1/l(tau)       1 per trace
      (The Markovian Thinker)  trace's chunks sum_t l

("1 per sequence": 1.0 on the sequence's first loss token, so counts stay exact integers.)
Delethink is the GRPO mean with a trace, not a row, as the sequence: each chunk is a row
(its own context), l(tau) counts the sampled tokens of all the trace's chunks, and every chunk
row carries its trace's advantage. So `aux["n_tokens"]` counts tokens or sequences, depending
on the aggregation; `aux["token_count"]` always counts loss tokens and is the denominator of
the `token_*` metrics (clip fractions, ratio, entropy, KL, TIS weight), see step.py.

Batch fields, each (B, T) (the step sees (A, b, T)):
    inputs, targets, positions, segment_ids   as for SFT (segment 0 = padding)
    loss_mask          1 on sampled completion tokens; 0 on prompt, padding and forced tokens
                       (budget forcing, Markovian carryover: the policy did not sample them)
    old_logprobs_bt    log pi_old(target) at rollout time: the trainer's recomputation
                       (`token_logprobs`), or the engine's own if not recomputed. NaN means
                       "the current policy": the update runs at the rollout's weights (the
                       first minibatch of the first epoch), so pi_old = stop_gradient(logp) is
                       the trainer's recomputation without a second forward pass
    advantages_bt      the sequence's (trace's) advantage on each of its tokens
    loss_weights_bt, loss_denom_bt    from `aggregation_weights`
    engine_logprobs_bt (tis_cap only)   `Result.logprobs` / `Chunk.logprobs` from the engine
    ref_logprobs_bt    (optional)       reference-policy log-probs; KL is reported if present
Per-row values are spread over tokens on purpose: every leaf then has the (A, b, T) layout
`step.batch_sharding` gives, and token-level credit needs no new field later. Values under
loss_mask == 0 are ignored, NaN included (the engine writes NaN for forced tokens).

Left out: value functions (PPO/GAE), sequence-level ratios (GSPO), dual-clip.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

# exp of a larger log-ratio overflows float32; verl clamps at the same place
_MAX_LOG_RATIO = 20.0


def token_logprobs(model, params, inputs, positions, segment_ids, targets, temperature=1.0):
    """(logp_bt, entropy_bt) of `targets` under the model, fp32 log_softmax over the vocab
    (chunked over the sequence when the model's `logits_chunk` is set).

    `temperature` must be the one the engine sampled with: its logprobs are those of the
    temperature-scaled distribution (decode/sampling.py), which is the policy being trained.
    A float, or per-row temperatures of shape (B,) or (B, 1, 1).
    """
    stats = model.token_stats(
        params, inputs, positions, segment_ids, targets, temperature=temperature, entropy=True
    )
    return stats["logp"], stats["entropy"]


def _kl(logp_bt, ref_bt, estimator: str):
    if estimator == "k1":
        return logp_bt - ref_bt
    if estimator == "k3":
        log_r = ref_bt - logp_bt
        return jnp.exp(log_r) - log_r - 1.0
    raise ValueError(f"kl_estimator={estimator!r}; allowed: ['k1', 'k3']")


def ppo_clip_loss(
    model,
    params,
    mb,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    tis_cap: float | None = None,
    temperature: float = 1.0,
):
    """Clipped policy loss (module docstring); bind options with `make_loss`."""
    logp_bt, entropy_bt = token_logprobs(
        model, params, mb["inputs"], mb["positions"], mb["segment_ids"], mb["targets"], temperature
    )
    mask_bt = mb["loss_mask"].astype(jnp.float32)
    valid_bt = mask_bt > 0

    def field(name):  # masked-out entries may be NaN (forced tokens): never let them in
        return jnp.where(valid_bt, mb[name].astype(jnp.float32), 0.0)

    adv_bt = field("advantages_bt")
    # NaN old log-prob: the update runs at the rollout's own weights, pi_old is the current policy
    old_bt = mb["old_logprobs_bt"].astype(jnp.float32)
    old_bt = jnp.where(jnp.isnan(old_bt), jax.lax.stop_gradient(logp_bt), old_bt)
    old_bt = jnp.where(valid_bt, old_bt, 0.0)
    log_ratio_bt = jnp.clip(logp_bt - old_bt, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio_bt = jnp.exp(log_ratio_bt)
    clipped_bt = jnp.clip(ratio_bt, 1.0 - eps_low, 1.0 + eps_high)
    pg_bt = -jnp.minimum(ratio_bt * adv_bt, clipped_bt * adv_bt)

    def tok_sum(x_bt):
        return jnp.sum(jnp.where(valid_bt, x_bt, 0.0))

    aux = {
        "token_count": mask_bt.sum(),
        "token_clip_low": tok_sum((adv_bt < 0) & (ratio_bt < 1.0 - eps_low)),
        "token_clip_high": tok_sum((adv_bt > 0) & (ratio_bt > 1.0 + eps_high)),
        "token_ratio": tok_sum(ratio_bt),
        "token_entropy": tok_sum(entropy_bt),
    }
    if tis_cap is not None:
        if "engine_logprobs_bt" not in mb:
            raise KeyError("tis_cap is set but the batch has no engine_logprobs_bt")
        log_w_bt = jnp.clip(old_bt - field("engine_logprobs_bt"), None, _MAX_LOG_RATIO)
        tis_bt = jax.lax.stop_gradient(jnp.minimum(jnp.exp(log_w_bt), tis_cap))
        pg_bt = pg_bt * tis_bt
        aux["token_tis_weight"] = tok_sum(tis_bt)
        aux["token_engine_abs_diff"] = tok_sum(jnp.abs(old_bt - field("engine_logprobs_bt")))

    loss_bt = pg_bt
    if kl_coef or "ref_logprobs_bt" in mb:
        if "ref_logprobs_bt" not in mb:
            raise KeyError("kl_coef is set but the batch has no ref_logprobs_bt")
        kl_bt = _kl(logp_bt, field("ref_logprobs_bt"), kl_estimator)
        aux["token_kl"] = tok_sum(kl_bt)
        if kl_coef:
            loss_bt = loss_bt + kl_coef * kl_bt
    if entropy_coef:
        loss_bt = loss_bt - entropy_coef * entropy_bt

    w_bt = field("loss_weights_bt")
    aux["policy_loss"] = tok_sum(w_bt * pg_bt)  # divided by n_tokens, like the loss
    aux["n_tokens"] = jnp.sum(field("loss_denom_bt"))
    return tok_sum(w_bt * loss_bt), aux


LOSSES: dict[str, Callable] = {"ppo_clip": ppo_clip_loss}


def make_loss(name: str, **options) -> Callable:
    """`LOSSES[name]` with `options` bound: a `loss_fn(model, params, mb)` for make_train_step.

    Errors name an unknown loss or option and list the allowed ones.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; allowed: {sorted(LOSSES)}")
    fn = LOSSES[name]
    allowed = [
        p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY
    ]
    for key in options:
        if key not in allowed:
            raise ValueError(f"unknown option {key!r} for loss {name!r}; allowed: {allowed}")
    if not 0 <= options.get("eps_low", 0) < 1 or options.get("eps_high", 0) < 0:
        raise ValueError("eps_low must be in [0, 1) and eps_high >= 0")
    if options.get("kl_estimator", "k3") not in ("k1", "k3"):
        raise ValueError(f"kl_estimator={options['kl_estimator']!r}; allowed: ['k1', 'k3']")
    cap = options.get("tis_cap")
    if cap is not None and not cap > 0:
        raise ValueError(f"tis_cap={cap} must be > 0 (or None for no TIS)")
    return functools.partial(fn, **options)


# ---- aggregation weights (host side, numpy) -------------------------------------------------


def _sequences(loss_mask_bt: np.ndarray, seq_ids) -> tuple[np.ndarray, np.ndarray]:
    """(loss tokens of each token's sequence (B, T), 1.0 on each sequence's first loss token)."""
    B, T = loss_mask_bt.shape
    if seq_ids is None:
        ids_bt = np.broadcast_to(np.arange(B)[:, None], (B, T))
    else:
        ids = np.asarray(seq_ids)
        if ids.shape == (B,):
            ids_bt = np.broadcast_to(ids[:, None], (B, T))
        elif ids.shape == (B, T):
            ids_bt = ids
        else:
            raise ValueError(f"seq_ids must be ({B},) or ({B}, {T}), got {ids.shape}")
    valid = loss_mask_bt > 0
    flat = np.flatnonzero(valid)  # row-major: a row's tokens in order, rows in batch order
    _, first, inverse, counts = np.unique(
        ids_bt.reshape(-1)[flat], return_index=True, return_inverse=True, return_counts=True
    )
    length = np.zeros(B * T)
    length[flat] = counts[inverse.reshape(-1)]
    starts = np.zeros(B * T)
    starts[flat[first]] = 1.0
    return length.reshape(B, T), starts.reshape(B, T)


def token_mean(loss_mask_bt, seq_ids=None, max_len=None):
    mask = (np.asarray(loss_mask_bt) > 0).astype(np.float64)
    return mask, mask


def seq_mean_token_mean(loss_mask_bt, seq_ids=None, max_len=None):
    mask = (np.asarray(loss_mask_bt) > 0).astype(np.float64)
    length, starts = _sequences(mask, seq_ids)
    return np.divide(mask, length, out=np.zeros_like(mask), where=mask > 0), starts


def seq_mean_token_sum_norm(loss_mask_bt, seq_ids=None, max_len=None):
    if max_len is None or max_len < 1:
        raise ValueError("seq_mean_token_sum_norm needs max_len (the generation budget) >= 1")
    mask = (np.asarray(loss_mask_bt) > 0).astype(np.float64)
    _, starts = _sequences(mask, seq_ids)
    return mask / max_len, starts


def delethink(loss_mask_bt, seq_ids=None, max_len=None):
    if seq_ids is None:
        raise ValueError("delethink needs seq_ids: the trace id of every chunk row")
    return seq_mean_token_mean(loss_mask_bt, seq_ids)


AGGREGATIONS: dict[str, Callable] = {
    "token_mean": token_mean,
    "seq_mean_token_mean": seq_mean_token_mean,
    "seq_mean_token_sum_norm": seq_mean_token_sum_norm,
    "delethink": delethink,
}


def aggregation_weights(
    name: str, loss_mask_bt, seq_ids=None, max_len: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(loss_weights_bt, loss_denom_bt) float32 for the whole step batch (module docstring).

    `seq_ids`: which sequence each token belongs to, (B,) per row or (B, T) per token (packed
    rows); default one sequence per row. For `delethink`, the trace id of each chunk row.
    Compute over every row of a step *before* splitting it into microbatches, on each process
    for its own rows (a sequence's or trace's rows must not span processes).
    `max_len`: Dr. GRPO's constant, the generation budget (max new tokens).
    """
    if name not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {name!r}; allowed: {sorted(AGGREGATIONS)}")
    weights, denom = AGGREGATIONS[name](loss_mask_bt, seq_ids, max_len)
    return weights.astype(np.float32), denom.astype(np.float32)
