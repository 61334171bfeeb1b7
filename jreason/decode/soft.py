"""Soft Thinking: think in concept tokens (mixtures of token embeddings), answer in tokens.

Zhang et al. 2025, "Soft Thinking: Unlocking the Reasoning Potential of LLMs in Continuous
Concept Space" (arXiv 2505.15778), training-free. While a row is inside its thinking (after the
prompt, before `</think>`), no token is sampled: the next-token distribution is filtered into a
*concept token* and the next input is the probability-weighted mixture of the embeddings of its
tokens, fed through the KV cache as one position (`inputs_embeds_btd`). The concept of a step:

    p = softmax(logits / temperature) over V       (temperature 0: the argmax alone)
    keep the top_k tokens, renormalize             (k is the concept's support size)
    keep the shortest prefix of those whose mass reaches top_p (mass before a token < top_p),
    keep tokens with p >= min_p * p_max, renormalize
    x = sum_i p_i * embed[i]                       (BK,BKD->BD, in float32)

(the filter order of the paper's SGLang implementation: top-k renorm, then top-p renorm, then
min-p; note sampling.py's top-p measures mass on the unfiltered distribution instead). The
input embedding table `params["embed"]` is used whether or not the output head is tied to it:
the mixture lives in the model's input space. A mixture of one token is exactly that token's
embedding, so top_k=1 (or a tiny top_p) is plain greedy decoding.

The visible trace token of a soft step is the concept's most probable token (its argmax). The
text of the thinking is therefore a readable summary of the concepts, not what was fed.

Thinking ends, and `</think>` is fed as a real token, when before a step
- the row has made `max_thinking_tokens` soft steps (the budget), or
- Cold Stop: the last `cold_stop_steps` soft steps all had concept entropy (of the filtered,
  renormalized p, in nats) below `cold_stop_entropy` (the model is confident; the paper adds
  this because long runs of soft inputs, never seen in training, can make generation collapse),
or at a step whose concept's most probable token is `</think>` (the paper: end thinking when
the most likely token is the end of thinking). After that the row decodes discrete tokens with
the answer sampling parameters (`sampling.sample`: greedy by default) until a stop id or
`max_new_tokens`. A stop id that is the argmax of a concept also ends the row.

Like sampler.py this is the fixed-batch path: prefill, then one jitted `lax.while_loop` with
per-row state (phase, low-entropy run, soft steps). The knobs are (B,) arrays, so other values
(or different values per row) do not recompile; the only static shape is the concept width, the
largest top_k rounded up to a power of two.

Left out: the continuous-batching engine (engine.py) and with it serving, Markovian chunks and
s1's `min_thinking_tokens`; the Dirichlet / Gumbel-Softmax noise on concepts of later work;
logprobs.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jreason.decode.sampling import SamplingArrays, sample
from jreason.model.kv_cache import init_cache
from jreason.model.transformer import unstack_layers

# why thinking ended, per row (the `end_reason` of a result)
END_REASONS = (None, "think_end", "cold_stop", "budget")
_NEVER = np.iinfo(np.int32).max // 2  # "no limit" for the int thresholds, kept overflow-safe
MIN_WIDTH = 8  # the concept width bucket: top_k 1..8 share one compilation, then powers of two


@dataclasses.dataclass(frozen=True)
class SoftArrays:
    """Soft-thinking knobs, one value per row."""

    temperature: jax.Array  # (B,) float32; 0 = the concept is the argmax token alone
    top_k: jax.Array  # (B,) int32 >= 1: the concept's support size
    top_p: jax.Array  # (B,) float32; >= 1 is off
    min_p: jax.Array  # (B,) float32; 0 is off
    cold_entropy: jax.Array  # (B,) float32; Cold Stop when entropy < this; -1 = off
    cold_steps: jax.Array  # (B,) int32: consecutive low-entropy soft steps that stop thinking
    max_thinking: jax.Array  # (B,) int32: soft-step budget


jax.tree_util.register_dataclass(
    SoftArrays,
    data_fields=[f.name for f in dataclasses.fields(SoftArrays)],
    meta_fields=[],
)


def concept(logits_bv, embed_vd, soft: SoftArrays, width: int, dtype):
    """The concept token of each row: (input embedding (B, D) in `dtype`, its most probable
    token (B,), its entropy (B,) in nats). `width` (static) >= every row's top_k."""
    logits_bv = logits_bv.astype(jnp.float32)
    greedy_b = soft.temperature <= 0
    scaled_bv = logits_bv / jnp.where(greedy_b, 1.0, soft.temperature)[:, None]
    vals_bk, idx_bk = jax.lax.top_k(scaled_bv, width)  # sorted, most probable first
    rank_k = jnp.arange(width)
    keep_bk = rank_k[None] < jnp.where(greedy_b, 1, soft.top_k)[:, None]
    # top-k renormalized: a softmax over the kept logits (the V - k others drop out)
    p_bk = jax.nn.softmax(jnp.where(keep_bk, vals_bk, -jnp.inf), axis=-1)
    mass_before_bk = jnp.cumsum(p_bk, axis=-1) - p_bk
    keep_bk &= (mass_before_bk < soft.top_p[:, None]) | (soft.top_p[:, None] >= 1)
    keep_bk &= p_bk >= soft.min_p[:, None] * p_bk[:, :1]  # p_bk[:, 0] is p_max, always kept
    # renormalized = a softmax over the kept logits; a single kept token gets weight exactly 1
    p_bk = jax.nn.softmax(jnp.where(keep_bk, vals_bk, -jnp.inf), axis=-1)
    entropy_b = -jnp.sum(jnp.where(p_bk > 0, p_bk * jnp.log(p_bk), 0.0), axis=-1)
    rows_bkd = jnp.take(embed_vd, idx_bk, axis=0).astype(jnp.float32)  # (B, K, D)
    x_bd = jnp.einsum("BK,BKD->BD", p_bk, rows_bkd).astype(dtype)
    return x_bd, idx_bk[:, 0], entropy_b


@functools.partial(jax.jit, static_argnums=(0, 8, 9))
def _generate(
    model,
    params,
    tokens_bp,
    lengths_b,
    thinking_b,
    soft: SoftArrays,
    answer: SamplingArrays,
    stop_ids,
    max_new: int,
    width: int,
    think_end,
    seeds_b,
):
    cfg = model.cfg
    B, P = tokens_bp.shape
    params = unstack_layers(params)  # one copy per call, outside the loop (transformer.py)
    embed_vd = params["embed"]
    cache = init_cache(cfg, B, P + max_new)
    positions_bp = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    last_bv, cache = model.apply_at(params, tokens_bp, positions_bp, cache, lengths_b - 1)
    keys_b = jax.vmap(jax.random.key)(seeds_b)
    D = embed_vd.shape[1]

    state = {
        "out": jnp.zeros((B, max_new), jnp.int32),
        "entropy": jnp.zeros((B, max_new), jnp.float32),  # of each soft step's concept
        "n": jnp.zeros((B,), jnp.int32),
        "done": jnp.zeros((B,), bool),
        "thinking": thinking_b,
        "low_run": jnp.zeros((B,), jnp.int32),  # consecutive soft steps below cold_entropy
        "soft_steps": jnp.zeros((B,), jnp.int32),
        "reason": jnp.zeros((B,), jnp.int32),  # index into END_REASONS
    }

    def cond(carry):
        t, _, st, _ = carry
        return (t < max_new) & ~jnp.all(st["done"])

    def body(carry):
        t, logits_bv, st, cache = carry
        live_b = ~st["done"]
        think_b = st["thinking"] & live_b
        # checked before the step: the budget is spent, or Cold Stop's run is complete
        budget_b = think_b & (st["soft_steps"] >= soft.max_thinking)
        cold_b = think_b & ~budget_b & (st["low_run"] >= soft.cold_steps)
        x_bd, top_b, ent_b = jax.lax.cond(
            jnp.any(think_b),
            lambda: concept(logits_bv, embed_vd, soft, width, cfg.dtype),
            lambda: (
                jnp.zeros((B, D), cfg.dtype),
                jnp.zeros((B,), jnp.int32),
                jnp.zeros((B,), jnp.float32),
            ),
        )
        natural_b = think_b & ~budget_b & ~cold_b & (top_b == think_end)
        end_b = budget_b | cold_b | natural_b
        soft_b = think_b & ~end_b
        step_keys_b = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_b, t)
        sampled_b, _ = sample(logits_bv, step_keys_b, answer)
        tok_b = jnp.where(soft_b, top_b, jnp.where(end_b, think_end, sampled_b))
        low_b = ent_b < soft.cold_entropy
        reason_b = jnp.where(budget_b, 3, jnp.where(cold_b, 2, jnp.where(natural_b, 1, 0)))
        st = {
            "out": st["out"].at[:, t].set(jnp.where(live_b, tok_b, 0)),
            "entropy": st["entropy"].at[:, t].set(jnp.where(soft_b, ent_b, 0.0)),
            "n": st["n"] + live_b.astype(jnp.int32),
            "done": st["done"] | jnp.isin(tok_b, stop_ids),
            "thinking": st["thinking"] & ~end_b,
            "low_run": jnp.where(soft_b, jnp.where(low_b, st["low_run"] + 1, 0), st["low_run"]),
            "soft_steps": st["soft_steps"] + soft_b.astype(jnp.int32),
            "reason": jnp.where(end_b, reason_b, st["reason"]),
        }
        # soft rows feed their concept; every other row the embedding of its token
        tok_bd = jnp.take(embed_vd, tok_b, axis=0).astype(cfg.dtype)
        x_b1d = jnp.where(soft_b[:, None], x_bd, tok_bd)[:, None]
        pos_b1 = (lengths_b + t)[:, None]
        logits_b1v, cache = model.apply(
            params, tok_b[:, None], pos_b1, cache, inputs_embeds_btd=x_b1d
        )
        return t + 1, logits_b1v[:, 0], st, cache

    _, _, state, _ = jax.lax.while_loop(cond, body, (0, last_bv, state, cache))
    return state


def _per_row(name: str, value, batch: int, ok, allowed: str) -> list:
    """A scalar broadcast to every row, or one value per row; each checked with `ok` (bools are
    refused unless `ok` accepts them: True is not a top_k)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    values = list(value) if isinstance(value, Sequence) else [value] * batch
    if len(values) != batch:
        raise ValueError(f"soft.generate: {name} has {len(values)} values for {batch} prompts")
    for v in values:
        if not ok(v):
            raise ValueError(f"soft.generate: {name} must be {allowed}, got {v!r}")
    return values


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_num(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and np.isfinite(v)


def generate(
    model,
    params,
    prompts: list[list[int]],
    *,
    think_end_id: int,
    max_new_tokens: int,
    top_k: int | Sequence[int] = 15,
    top_p: float | Sequence[float] = 0.95,
    min_p: float | Sequence[float] = 0.0,
    temperature: float | Sequence[float] = 0.6,
    cold_stop_entropy: float | Sequence[float] | None = None,
    cold_stop_steps: int | Sequence[int] = 256,
    max_thinking_tokens: int | Sequence[int] | None = None,
    thinking: bool | Sequence[bool] = True,
    stop_ids: Sequence[int] = (),
    answer_temperature: float = 0.0,
    answer_top_k: int = 0,
    answer_top_p: float = 1.0,
    answer_min_p: float = 0.0,
    seed: int | Sequence[int] = 0,
    pad_id: int = 0,
    bucket: int = 64,
) -> list[dict]:
    """Soft Thinking for a batch of prompts (see the module docstring).

    `top_k`, `top_p`, `min_p`, `temperature` shape the concept tokens; `answer_*` sample the
    discrete answer after `</think>` (temperature 0 = greedy). `cold_stop_entropy` None turns
    Cold Stop off; `max_thinking_tokens` None is no budget. `thinking` says whether each prompt
    leaves the model inside its thinking (ends in `<think>`); a row with False answers at once.
    Soft knobs and `seed` take one value, or one per prompt.

    Returns one dict per prompt:
      tokens           the trace: each soft step's argmax token, `</think>`, the answer (a stop
                       token is kept, as in sampler.py)
      thinking_tokens  tokens before `</think>` (every one a soft step); None for a row that
                       started outside its thinking
      soft_steps       steps fed a concept instead of a token (== thinking_tokens, or 0)
      entropies        the concept entropy (nats) of each soft step
      end_reason       why thinking ended: "think_end" (the model's argmax), "cold_stop",
                       "budget", or None (it did not end, or never started)
      cold_stop        end_reason == "cold_stop"
      finish_reason    "stop" (a stop id) or "length" (max_new_tokens)
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("soft.generate: prompts must be a non-empty list of non-empty prompts")
    V = model.cfg.vocab_size
    for p in prompts:
        if any(not _is_int(t) or not 0 <= t < V for t in p):
            raise ValueError(f"soft.generate: prompt token ids must be in [0, vocab_size={V})")
    if not _is_int(think_end_id) or not 0 <= think_end_id < V:
        raise ValueError(f"soft.generate: think_end_id must be in [0, {V}), got {think_end_id!r}")
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"soft.generate: max_new_tokens must be >= 1, got {max_new_tokens!r}")
    stop_ids = list(stop_ids)
    if any(not _is_int(s) or not 0 <= s < V for s in stop_ids):
        raise ValueError(f"soft.generate: stop_ids must be in [0, {V}), got {stop_ids}")
    if think_end_id in stop_ids:
        raise ValueError("soft.generate: stop_ids must not contain think_end_id")
    for name, v, ok, allowed in (
        ("answer_temperature", answer_temperature, lambda v: v >= 0, ">= 0"),
        ("answer_top_k", answer_top_k, lambda v: _is_int(v) and v >= 0, "an int >= 0"),
        ("answer_top_p", answer_top_p, lambda v: 0 < v <= 1, "in (0, 1]"),
        ("answer_min_p", answer_min_p, lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("bucket", bucket, lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    ):
        if not _is_num(v) or not ok(v):
            raise ValueError(f"soft.generate: {name} must be {allowed}, got {v!r}")
    B = len(prompts)
    ks = _per_row("top_k", top_k, B, lambda v: _is_int(v) and 1 <= v <= V, f"an int in [1, {V}]")
    tps = _per_row("top_p", top_p, B, lambda v: _is_num(v) and 0 < v <= 1, "in (0, 1]")
    mps = _per_row("min_p", min_p, B, lambda v: _is_num(v) and 0 <= v <= 1, "in [0, 1]")
    temps = _per_row("temperature", temperature, B, lambda v: _is_num(v) and v >= 0, ">= 0")
    colds = _per_row(
        "cold_stop_entropy",
        cold_stop_entropy,
        B,
        lambda v: v is None or (_is_num(v) and v >= 0),
        "None (off) or >= 0",
    )
    csteps = _per_row(
        "cold_stop_steps", cold_stop_steps, B, lambda v: _is_int(v) and v >= 1, "an int >= 1"
    )
    budgets = _per_row(
        "max_thinking_tokens",
        max_thinking_tokens,
        B,
        lambda v: v is None or (_is_int(v) and v >= 1),
        "None (no budget) or an int >= 1",
    )
    thinks = _per_row("thinking", thinking, B, lambda v: isinstance(v, (bool, np.bool_)), "a bool")
    seeds = _per_row("seed", seed, B, _is_int, "an int")

    P = -(-max(len(p) for p in prompts) // bucket) * bucket
    tokens = np.full((B, P), pad_id, np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    soft = SoftArrays(
        temperature=jnp.asarray(temps, jnp.float32),
        top_k=jnp.asarray(ks, jnp.int32),
        top_p=jnp.asarray(tps, jnp.float32),
        min_p=jnp.asarray(mps, jnp.float32),
        cold_entropy=jnp.asarray([-1.0 if c is None else c for c in colds], jnp.float32),
        cold_steps=jnp.asarray([_NEVER if c is None else s for c, s in zip(colds, csteps)]),
        max_thinking=jnp.asarray([_NEVER if m is None else m for m in budgets], jnp.int32),
    )
    width = min(V, max(MIN_WIDTH, 1 << (max(ks) - 1).bit_length()))
    answer = SamplingArrays.fill(B, answer_temperature, answer_top_k, answer_top_p, answer_min_p)
    state = _generate(
        model,
        params,
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        jnp.asarray(thinks, bool),
        soft,
        answer,
        jnp.asarray(stop_ids or [-1], jnp.int32),
        max_new_tokens,
        width,
        jnp.int32(think_end_id),
        jnp.asarray([s & 0xFFFFFFFF for s in seeds], jnp.uint32),
    )
    st = jax.tree.map(np.asarray, state)
    results = []
    for b in range(B):
        n, steps = int(st["n"][b]), int(st["soft_steps"][b])
        toks = st["out"][b, :n].tolist()
        reason = END_REASONS[int(st["reason"][b])]
        results.append(
            {
                "tokens": toks,
                "thinking_tokens": steps if thinks[b] else None,
                "soft_steps": steps,
                "entropies": st["entropy"][b, :steps].tolist(),
                "end_reason": reason,
                "cold_stop": reason == "cold_stop",
                "finish_reason": "stop" if toks and toks[-1] in stop_ids else "length",
            }
        )
    return results
