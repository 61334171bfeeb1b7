"""Batched generation with continuous thoughts (Coconut, model/latent.py) against a KV cache.

sampler.py's shape with a latent phase between prefill and text:

    prefill   question + <bot>                       one cached forward of the padded prompts
    latents   n steps: the last hidden state goes back in as the next position's input
              embedding (`inputs_embeds_btd`, one position per row through the cache)
    <eot>     one cached forward of the real token: its logits start the text
    text      sampled or greedy tokens in a `lax.while_loop` until a stop id or the budget

The fed-back state is the final-norm'd hidden state, as in training (model/latent.py), so this
reproduces `latent_forward` on the finished sequence exactly (a test checks it). Every row
thinks the same static `n_latent` steps (one compilation per n); rows of different prompt
lengths each write at their own positions (kv_cache.py: slot index == position), so a pad slot
a row wrote during prefill is overwritten by its latents before any query of that row sees it.

Returned per row: the text tokens (stop token kept) and their log-probs; the latents are not
tokens and are counted apart (`n_latent`). The continuous-batching engine runs the same phases
per request (`Request(prompt + [<bot>], thoughts=Thoughts(tokens, n))`, slots.think), so each
request can think its own number of steps next to token-only requests.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jreason.decode.sampling import SamplingArrays, sample
from jreason.model.kv_cache import init_cache
from jreason.model.latent import LatentTokens
from jreason.model.transformer import unstack_layers


@dataclasses.dataclass(frozen=True)
class Thoughts:
    """An engine request's latent phase: its prompt ends with `<bot>`; then `n` continuous
    thoughts and `<eot>` (placed in the cache, not in the trace), then text."""

    tokens: LatentTokens
    n: int

    def __post_init__(self):
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 0:
            raise ValueError(f"thoughts: n must be an integer >= 0, got {self.n!r}")

    def placeholders(self) -> list[int]:
        """The ids the context records for the latent positions and `<eot>`."""
        return [self.tokens.latent] * self.n + [self.tokens.eot]


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7))
def _generate(
    model, params, tokens_bp, lengths_b, sampling, n_latent, max_new_tokens, eot_id, stop_ids, key
):
    B, P = tokens_bp.shape
    params = unstack_layers(params)  # the decode layout, once per call (transformer.py)
    cache = init_cache(model.cfg, B, P + n_latent + 1 + max_new_tokens)
    positions_bp = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    _, cache, h_bpd = model.apply(params, tokens_bp, positions_bp, cache, return_hidden=True)
    h_bd = jnp.take_along_axis(h_bpd, (lengths_b - 1)[:, None, None], axis=1)[:, 0]  # <bot>'s

    unused_b1 = jnp.zeros((B, 1), jnp.int32)  # ids are ignored when embeddings are given

    def think(i, carry):
        h_bd, cache = carry
        pos_b1 = (lengths_b + i)[:, None]
        _, cache, h_b1d = model.apply(
            params, unused_b1, pos_b1, cache, inputs_embeds_btd=h_bd[:, None], return_hidden=True
        )
        return h_b1d[:, 0], cache

    _, cache = jax.lax.fori_loop(0, n_latent, think, (h_bd, cache))
    start_b = lengths_b + n_latent + 1  # position of the first text token
    eot_b1 = jnp.full((B, 1), eot_id, jnp.int32)
    logits_b1v, cache = model.apply(params, eot_b1, (start_b - 1)[:, None], cache)

    def cond(carry):
        t, _, _, _, done_b, *_ = carry
        return (t < max_new_tokens) & ~jnp.all(done_b)

    def body(carry):
        t, logits_bv, out_bn, logp_bn, done_b, n_b, cache = carry

        def keys_b():  # made only if some row samples
            return jax.random.split(jax.random.fold_in(key, t), B)

        tok_b, lp_b = sample(logits_bv, keys_b, sampling)
        out_bn = out_bn.at[:, t].set(jnp.where(done_b, 0, tok_b))
        logp_bn = logp_bn.at[:, t].set(jnp.where(done_b, 0.0, lp_b))
        n_b = n_b + (~done_b).astype(jnp.int32)
        done_b = done_b | jnp.isin(tok_b, stop_ids)
        logits_b1v, cache = model.apply(params, tok_b[:, None], (start_b + t)[:, None], cache)
        return t + 1, logits_b1v[:, 0], out_bn, logp_bn, done_b, n_b, cache

    out_bn = jnp.zeros((B, max_new_tokens), jnp.int32)
    logp_bn = jnp.zeros((B, max_new_tokens), jnp.float32)
    zeros_b = jnp.zeros((B,), jnp.int32)
    carry = (0, logits_b1v[:, 0], out_bn, logp_bn, zeros_b.astype(bool), zeros_b, cache)
    _, _, out_bn, logp_bn, _, n_b, _ = jax.lax.while_loop(cond, body, carry)
    return out_bn, logp_bn, n_b


def generate_latent(
    model,
    params,
    questions: list[list[int]],
    *,
    tokens: LatentTokens,
    n_latent: int,
    max_new_tokens: int,
    stop_ids=(),
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    pad_id: int = 0,
    bucket: int = 64,
) -> list[dict]:
    """For each question (ids, without `<bot>`): n_latent thoughts, `<eot>`, then text.

    Returns [{"tokens", "logprobs", "n_latent"}]; tokens are the text after `<eot>`.
    """
    if not questions or any(len(q) == 0 for q in questions):
        raise ValueError("generate_latent: questions: every question needs at least one token")
    if isinstance(n_latent, bool) or not isinstance(n_latent, int) or n_latent < 0:
        raise ValueError(f"generate_latent: n_latent must be an integer >= 0, got {n_latent!r}")
    if max_new_tokens < 1:
        raise ValueError(f"generate_latent: max_new_tokens must be >= 1, got {max_new_tokens}")
    if tokens.vocab_size > model.cfg.vocab_size:
        raise ValueError(
            f"generate_latent: tokens: ids {tokens} need vocab_size >= {tokens.vocab_size}; "
            f"the model has {model.cfg.vocab_size}"
        )
    prompts = [[*q, tokens.bot] for q in questions]
    B = len(prompts)
    P = -(-max(len(p) for p in prompts) // bucket) * bucket
    tokens_bp = np.full((B, P), pad_id, np.int32)
    for b, p in enumerate(prompts):
        tokens_bp[b, : len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    out, logp, n = _generate(
        model,
        params,
        jnp.asarray(tokens_bp),
        jnp.asarray(lengths),
        SamplingArrays.fill(B, temperature, top_k, top_p),
        n_latent,
        max_new_tokens,
        tokens.eot,
        jnp.asarray(list(stop_ids) or [-1], jnp.int32),
        jax.random.key(seed),
    )
    out, logp, n = np.asarray(out), np.asarray(logp), np.asarray(n)
    return [
        {
            "tokens": out[b, : n[b]].tolist(),
            "logprobs": logp[b, : n[b]].tolist(),
            "n_latent": n_latent,
        }
        for b in range(B)
    ]
