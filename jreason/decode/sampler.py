"""A stateless batch sampler: prefill a batch of prompts, then decode in one `lax.while_loop`.

This is the simple path (gemma's `_sampler.py` shape): every row starts together and the whole
generation is one jitted call, which is what evaluation and benchmarks of a fixed batch want.
The continuous-batching engine (engine.py) is the path for serving and RL, where requests come
and go; both use the same model `apply` and `sampling.sample`.

Prompts are right-padded to a bucket (a multiple of `bucket`) so repeated calls with similar
lengths reuse one compilation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jreason.decode.sampling import SamplingArrays, sample


@functools.partial(jax.jit, static_argnums=(0, 5))
def _generate(model, params, tokens_bp, lengths_b, sampling, max_new_tokens, stop_ids, key):
    B, P = tokens_bp.shape
    params = model.decode_params(params)  # one copy per call, outside the loop (transformer.py)
    cache = model.init_cache(B, P + max_new_tokens)
    positions_bp = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    last_bv, cache = model.apply_at(params, tokens_bp, positions_bp, cache, lengths_b - 1)

    out_bn = jnp.zeros((B, max_new_tokens), jnp.int32)
    logp_bn = jnp.zeros((B, max_new_tokens), jnp.float32)
    done_b = jnp.zeros((B,), bool)
    n_b = jnp.zeros((B,), jnp.int32)

    def cond(carry):
        t, _, _, _, done_b, *_ = carry
        return (t < max_new_tokens) & ~jnp.all(done_b)

    def body(carry):
        t, logits_bv, out_bn, logp_bn, done_b, n_b, cache, key = carry

        def keys_b():  # made only if some row samples
            return jax.random.split(jax.random.fold_in(key, t), B)

        tok_b, lp_b = sample(logits_bv, keys_b, sampling)
        out_bn = out_bn.at[:, t].set(jnp.where(done_b, 0, tok_b))
        logp_bn = logp_bn.at[:, t].set(jnp.where(done_b, 0.0, lp_b))
        n_b = n_b + (~done_b).astype(jnp.int32)
        done_b = done_b | jnp.isin(tok_b, stop_ids)
        pos_b1 = (lengths_b + t)[:, None]
        logits_b1v, cache = model.apply(params, tok_b[:, None], pos_b1, cache)
        return t + 1, logits_b1v[:, 0], out_bn, logp_bn, done_b, n_b, cache, key

    carry = (0, last_bv, out_bn, logp_bn, done_b, n_b, cache, key)
    _, _, out_bn, logp_bn, _, n_b, cache, _ = jax.lax.while_loop(cond, body, carry)
    # a recurrent-depth model's cache records the core iterations each position ran
    return out_bn, logp_bn, n_b, cache.get("steps") if isinstance(cache, dict) else None


def generate(
    model,
    params,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    stop_ids=(),
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    pad_id: int = 0,
    bucket: int = 64,
) -> list[dict]:
    """Generates for each prompt; returns [{"tokens": [...], "logprobs": [...]}] (stop token kept),
    plus "mean_steps" (core iterations per generated token) for a recurrent-depth model."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    B = len(prompts)
    P = -(-max(len(p) for p in prompts) // bucket) * bucket
    tokens = np.full((B, P), pad_id, np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    sampling = SamplingArrays.fill(B, temperature, top_k, top_p)
    stop = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
    out, logp, n, steps = _generate(
        model,
        params,
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        sampling,
        max_new_tokens,
        stop,
        jax.random.key(seed),
    )
    out, logp, n = np.asarray(out), np.asarray(logp), np.asarray(n)
    rows = [
        {"tokens": out[b, : n[b]].tolist(), "logprobs": logp[b, : n[b]].tolist()} for b in range(B)
    ]
    if steps is not None:  # token i came from the logits at position len(prompt) - 1 + i
        steps = np.asarray(steps)
        for b, row in enumerate(rows):
            start = lengths[b] - 1
            row["mean_steps"] = float(steps[b, start : start + n[b]].mean())
    return rows
