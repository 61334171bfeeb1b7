"""The decode engine's device side: a fixed pool of B slots over one preallocated KV cache.

Pure, jitted pieces; the host scheduler in engine.py decides what to call when.

- `prefill`: R contexts, right-padded to one length bucket, through the model with a fresh
  R-row cache; returns those rows' cache and the logits of each one's first new token.
- `insert`: copies prefilled rows into slots of the big cache and sets those slots'
  per-request arrays, for every request admitted in a scheduler step in one call (the row and
  slot indices are traced arrays padded to a fixed length, so one compilation per (R, prefill
  bucket) serves any mix; the n samples of one prompt share its row).
- `extend`: feeds a few forced tokens (budget forcing's "Wait" or `</think>`) into a running
  slot's cache at its own positions, without re-prefilling the context.
- `think`: Coconut's continuous thoughts in a just-inserted slot: n hidden states fed back as
  input embeddings, then `<eot>`.
- `set_controls`: re-arms a slot that stopped for the scheduler (new token budget, stop ids).
- `generate`: one token (or k, multi-step) for every slot at once. Sample from each slot's pending logits, check
  stop ids and budgets, feed the token back through the model at the slot's own position, keep
  the new logits for the next step. The state (cache included) is donated. This is the whole
  per-token computation: the host only reads back (tokens, logprobs, done, was-active).
- `release`: marks a slot inactive (the host ended a request early, e.g. on a stop string).

Slots are cache rows. Because slot index == position (kv_cache.py), a new context in a slot
just restarts at position 0: the stale entries of the previous one are beyond the new positions,
invisible by causality, and overwritten before they could be seen.

Every shape is fixed by (max_slots, max_len, the prefill buckets, max_stop_ids, the attend
buckets and the block size k), and every per-request setting is an array, so nothing
recompiles in steady state.

Sampling is reproducible per request: the key of sampled token i of a request is
`fold_in(key(seed), i)`, so tokens do not depend on the slot a request lands in, on what else is
running, or on Markovian resets (the count carries across chunks).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jreason.decode.sampling import SamplingArrays, sample
from jreason.model.transformer import Model


@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Everything the device needs about the B slots; a pytree, donated to every step."""

    cache: list  # the model's cache pytree; slot b is index b of each array's batch axis
    logits_bv: jax.Array  # (B, V) float32: logits of the token each slot samples next
    pos_b: jax.Array  # (B,) int32: position the next sampled token is fed at
    n_b: jax.Array  # (B,) int32: tokens sampled so far (the PRNG token index)
    max_tokens_b: jax.Array  # (B,) int32: the segment ends when n_b reaches this
    seed_b: jax.Array  # (B,) uint32
    active_b: jax.Array  # (B,) bool
    stop_bz: jax.Array  # (B, Z) int32 stop ids, -1 padded
    sampling: SamplingArrays


jax.tree_util.register_dataclass(
    DecodeState,
    data_fields=[f.name for f in dataclasses.fields(DecodeState)],
    meta_fields=[],
)


def init_state(model: Model, max_slots: int, max_len: int, max_stop_ids: int = 8) -> DecodeState:
    B = max_slots
    return DecodeState(
        cache=model.init_cache(B, max_len),
        logits_bv=jnp.zeros((B, model.cfg.vocab_size), jnp.float32),
        pos_b=jnp.zeros((B,), jnp.int32),
        n_b=jnp.zeros((B,), jnp.int32),
        max_tokens_b=jnp.zeros((B,), jnp.int32),
        seed_b=jnp.zeros((B,), jnp.uint32),
        active_b=jnp.zeros((B,), bool),
        stop_bz=jnp.full((B, max_stop_ids), -1, jnp.int32),
        sampling=SamplingArrays.fill(B),
    )


def attend_buckets(max_len: int, min_bucket: int = 256) -> tuple[int, ...]:
    """Powers of two from min_bucket up to max_len / 2: the cache prefixes a decode step may
    read (`generate`'s attend_len; None is the whole cache). XLA:CPU copies a prefix out of
    each layer's K and V before reading it, so one over half the cache saves nothing (the
    serving bench's 352-slot cache with a 256 prefix: 0.56 -> 0.61 s)."""
    out, b = [], min_bucket
    while 0 < b <= max_len // 2:
        out.append(b)
        b *= 2
    return tuple(out)


def prefill_buckets(max_len: int, min_bucket: int = 16) -> tuple[int, ...]:
    """Powers of two from min_bucket, then multiples of 512, and max_len itself."""
    out, b = [], min_bucket
    while b < min(max_len, 512):
        out.append(b)
        b *= 2
    b = 512
    while b < max_len:
        out.append(b)
        b += 512
    return (*out, max_len)


@functools.partial(jax.jit, static_argnums=0)
def prefill(model: Model, params, tokens_rp, lengths_r):
    """(cache rows, logits of each row's first new token (R, V) float32) of R contexts.

    Padding tokens past a row's length land in its cache at positions >= length; the request's
    own tokens overwrite them before any query can see them.
    """
    R, P = tokens_rp.shape
    cache = model.init_cache(R, P)
    positions_rp = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (R, P))
    logits_rv, cache = model.apply_at(params, tokens_rp, positions_rp, cache, lengths_r - 1)
    return cache, logits_rv


def _set(a_b, slot, v):
    return a_b.at[slot].set(v, mode="drop")  # a slot index past the end is padding


def _put_row(model, cache, row, slot):
    """Writes a one-row cache (any length <= S) into row `slot` of the big cache."""
    return jax.tree.map(
        lambda big, r, axis: jax.lax.dynamic_update_slice_in_dim(big, r, slot, axis),
        cache,
        row,
        model.cache_batch_axes(cache),
    )


def _get_row(model, cache, slot):
    return jax.tree.map(
        lambda big, axis: jax.lax.dynamic_slice_in_dim(big, slot, 1, axis),
        cache,
        model.cache_batch_axes(cache),
    )


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def insert(
    model: Model,
    state: DecodeState,
    rows_cache,
    logits_rv,
    n,
    src_m,
    slot_m,
    length_m,
    n0_m,
    max_tokens_m,
    seed_m,
    stop_mz,
    sp_m: SamplingArrays,
):
    """Puts prefilled contexts into slots: entry i < n copies row src_m[i] of `rows_cache`
    into slot slot_m[i]. Every *_m array has the same fixed length M (the engine's max_slots);
    entries from n on are padding (slot index B, dropped).

    n0 is a request's sampled-token count so far (non-zero after a Markovian reset), so its
    PRNG stream continues; the segment ends when the count reaches max_tokens.
    """

    def copy_row(i, cache):  # n iterations (a traced bound), each writing one row in place
        row = _get_row(model, rows_cache, src_m[i])
        return _put_row(model, cache, row, slot_m[i])

    return DecodeState(
        cache=jax.lax.fori_loop(0, n, copy_row, state.cache),
        logits_bv=_set(state.logits_bv, slot_m, logits_rv[src_m]),
        pos_b=_set(state.pos_b, slot_m, length_m),
        n_b=_set(state.n_b, slot_m, n0_m),
        max_tokens_b=_set(state.max_tokens_b, slot_m, max_tokens_m),
        seed_b=_set(state.seed_b, slot_m, seed_m),
        active_b=_set(state.active_b, slot_m, True),
        stop_bz=_set(state.stop_bz, slot_m, stop_mz),
        sampling=jax.tree.map(lambda a, v: _set(a, slot_m, v), state.sampling, sp_m),
    )


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def extend(model: Model, params, state: DecodeState, slot, tokens_1t, start, n, max_tokens, stop_z):
    """Feeds n forced tokens (right-padded to a bucket T) into `slot` at positions start.. and
    re-arms the slot: its next token is sampled from the logits after the last forced one."""
    T = tokens_1t.shape[1]
    row = _get_row(model, state.cache, slot)
    positions_1t = start + jnp.arange(T, dtype=jnp.int32)[None]
    logits_1v, row = model.apply_at(params, tokens_1t, positions_1t, row, jnp.reshape(n - 1, (1,)))
    return dataclasses.replace(
        state,
        cache=_put_row(model, state.cache, row, slot),
        logits_bv=_set(state.logits_bv, slot, logits_1v[0]),
        pos_b=_set(state.pos_b, slot, start + n),
        max_tokens_b=_set(state.max_tokens_b, slot, max_tokens),
        active_b=_set(state.active_b, slot, True),
        stop_bz=_set(state.stop_bz, slot, stop_z),
    )


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def think(model: Model, params, state: DecodeState, slot, last_token, start, n, eot_id):
    """Coconut's latent phase for a just-inserted slot (decode/latent.py has the batch form):
    re-feed the prompt's last token (`<bot>`) at start - 1 for its final-norm'd hidden state
    (its cache entry is rewritten with the same values), feed that state back as the input
    embedding of positions start .. start + n - 1, then `<eot>` at start + n; its logits are
    the slot's next. n is traced: one compilation serves every number of thoughts."""
    row = _get_row(model, state.cache, slot)
    _, row, h_11d = model.apply(
        params, jnp.full((1, 1), last_token, jnp.int32), jnp.full((1, 1), start - 1), row,
        return_hidden=True,
    )  # fmt: skip
    unused_11 = jnp.zeros((1, 1), jnp.int32)  # ids are ignored when embeddings are given

    def latent(i, carry):
        h_11d, row = carry
        _, row, h_11d = model.apply(
            params, unused_11, jnp.full((1, 1), start + i), row, inputs_embeds_btd=h_11d,
            return_hidden=True,
        )  # fmt: skip
        return h_11d, row

    _, row = jax.lax.fori_loop(0, n, latent, (h_11d, row))
    logits_11v, row = model.apply(
        params, jnp.full((1, 1), eot_id, jnp.int32), jnp.full((1, 1), start + n), row
    )
    return dataclasses.replace(
        state,
        cache=_put_row(model, state.cache, row, slot),
        logits_bv=_set(state.logits_bv, slot, logits_11v[0, 0]),
        pos_b=_set(state.pos_b, slot, start + n + 1),
    )


@functools.partial(jax.jit, donate_argnums=0)
def set_controls(state: DecodeState, slot, max_tokens, stop_z) -> DecodeState:
    """Re-arms a stopped slot where it stands (its pending logits are kept by `generate`)."""
    return dataclasses.replace(
        state,
        max_tokens_b=_set(state.max_tokens_b, slot, max_tokens),
        active_b=_set(state.active_b, slot, True),
        stop_bz=_set(state.stop_bz, slot, stop_z),
    )


@functools.partial(jax.jit, donate_argnums=0)
def release(state: DecodeState, slot) -> DecodeState:
    return dataclasses.replace(state, active_b=_set(state.active_b, slot, False))


def _generate_one(model: Model, params, state: DecodeState, attend_len: int | None = None):
    """One token per slot: (state, tokens (B,), logprobs (B,), done (B,), was_active (B,))."""
    max_len = model.cache_len(state.cache)

    def keys_b():  # made only if some row samples
        return jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(
            state.seed_b, state.n_b
        )

    tok_b, lp_b = sample(state.logits_bv, keys_b, state.sampling)
    active_b = state.active_b

    # feed the new token at its position; inactive rows feed at their frozen position, where
    # the row's next real token overwrites the entry before anything can attend to it
    kw = {} if attend_len is None else {"attend_len": attend_len}
    logits_b1v, cache = model.apply(params, tok_b[:, None], state.pos_b[:, None], state.cache, **kw)
    n_b = state.n_b + active_b
    pos_b = state.pos_b + active_b
    stop_b = jnp.any(tok_b[:, None] == state.stop_bz, axis=-1)
    # pos_b == max_len: the next token would have no cache slot to be fed at
    done_b = active_b & (stop_b | (n_b >= state.max_tokens_b) | (pos_b >= max_len))
    state = dataclasses.replace(
        state,
        cache=cache,
        logits_bv=jnp.where(active_b[:, None], logits_b1v[:, 0], state.logits_bv),
        pos_b=pos_b,
        n_b=n_b,
        active_b=active_b & ~done_b,
    )
    return state, (tok_b, lp_b, done_b, active_b)


@functools.partial(jax.jit, static_argnums=(0, 3, 4), donate_argnums=2)
def generate(
    model: Model, params, state: DecodeState, n_steps: int = 1, attend_len: int | None = None
):
    """n_steps tokens per slot: (state, tokens (k, B), logprobs (k, B), done (k, B),
    was_active (k, B)) with k = n_steps.

    Outputs of rows that were not active are garbage the host skips. `done` is set on the step
    that ends a row's segment (stop id, token budget, or the cache is full); the row is inactive
    for the rest of the k steps and keeps its pending logits so the scheduler can re-arm it
    where it stands. k > 1 is multi-step scheduling (as in vLLM): the host dispatches and reads
    back once per k tokens, which is most of a small model's step time on CPU.

    `attend_len` (static, transformer models): attention reads only the cache's first
    attend_len slots. Every active row must stay below it for all k steps: the caller picks it
    from the rows' positions (Engine._attend_len); inactive rows' outputs are discarded anyway.
    """
    state, outputs = jax.lax.scan(
        lambda st, _: _generate_one(model, params, st, attend_len), state, None, length=n_steps
    )
    return (state, *outputs)
