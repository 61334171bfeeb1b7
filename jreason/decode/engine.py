"""The continuous-batching decode engine: a fixed pool of slots over one preallocated KV cache.

Four pure, jitted pieces and a small host-side scheduler over them:

- `prefill`: one request's prompt, right-padded to a length bucket, through the model with a
  fresh single-row cache; returns that row's cache and the logits of the first new token.
- `insert`: writes the prefilled row into slot `b` of the big cache (the slot index is traced,
  so one compilation serves every slot) and sets that slot's per-request arrays.
- `generate`: one token for every slot at once. Sample from each slot's pending logits, check
  stop ids and budgets, feed the token back through the model at the slot's own position, keep
  the new logits for the next step. The state (cache included) is donated.
- `release`: marks a slot inactive (needed only when the host ends a request early, e.g. on a
  stop string; budgets and stop ids end slots inside `generate`).

Slots are cache rows. Because slot index == position (kv_cache.py), a new request in a slot just
restarts at position 0: the stale entries of the previous request are beyond the new request's
positions, invisible by causality, and overwritten before they could be seen.

Every shape is fixed by (max_slots, max_len, the prefill buckets, max_stop_ids), and every
per-request setting is an array, so nothing recompiles in steady state
(tests/decode/test_engine.py counts compilations).

Sampling is reproducible per request: the key of generated token i of a request is
`fold_in(key(seed), i)`, drawn per row, so the tokens do not depend on the slot a request lands
in or on what else is running.

Left out here (see issue 4): Markovian chunking (markovian.py), thinking budgets (budget.py),
sharding of the cache across devices, and overlapping the host step with the device step.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jreason.decode.sampling import SamplingArrays, sample
from jreason.model.kv_cache import init_cache
from jreason.model.transformer import Model

FINISH_REASONS = ("stop", "length")


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request. temperature 0 is greedy; top_k 0, top_p 1, min_p 0 are off.

    `stop_ids` end generation on the device (the stop token is kept in the output);
    `stop_strings` are checked on the host with the engine's `detokenize` callback.
    """

    prompt_ids: Sequence[int]
    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    stop_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()


@dataclasses.dataclass
class Result:
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str  # one of FINISH_REASONS
    prompt_len: int


@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Everything the device needs about the B slots; a pytree, donated to every step."""

    cache: dict  # {"k", "v"}: (L, B, S, K, H)
    logits_bv: jax.Array  # (B, V) float32: logits of the token each slot samples next
    pos_b: jax.Array  # (B,) int32: position the next sampled token is fed at
    n_b: jax.Array  # (B,) int32: tokens generated so far (the PRNG token index)
    max_tokens_b: jax.Array  # (B,) int32
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
        cache=init_cache(model.cfg, B, max_len),
        logits_bv=jnp.zeros((B, model.cfg.vocab_size), jnp.float32),
        pos_b=jnp.zeros((B,), jnp.int32),
        n_b=jnp.zeros((B,), jnp.int32),
        max_tokens_b=jnp.zeros((B,), jnp.int32),
        seed_b=jnp.zeros((B,), jnp.uint32),
        active_b=jnp.zeros((B,), bool),
        stop_bz=jnp.full((B, max_stop_ids), -1, jnp.int32),
        sampling=SamplingArrays.fill(B),
    )


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
def prefill(model: Model, params, tokens_1p, length):
    """(cache row {"k","v"}: (L, 1, P, K, H), logits of the first new token (V,) float32).

    Padding tokens past `length` land in the cache at positions >= length; the request's own
    tokens overwrite them before any query can see them.
    """
    P = tokens_1p.shape[1]
    cache = init_cache(model.cfg, 1, P)
    positions_1p = jnp.arange(P, dtype=jnp.int32)[None]
    logits_1pv, cache = model.apply(params, tokens_1p, positions_1p, cache)
    return cache, logits_1pv[0, length - 1]


@functools.partial(jax.jit, donate_argnums=0)
def insert(state: DecodeState, row_cache, logits_v, slot, length, max_tokens, seed, stop_z, sp):
    """Puts a prefilled request into `slot` (traced: one compilation per prefill bucket)."""

    def put_row(big_lbskh, row_l1pkh):
        return jax.lax.dynamic_update_slice(big_lbskh, row_l1pkh, (0, slot, 0, 0, 0))

    def set_b(a_b, v):
        return a_b.at[slot].set(v)

    return DecodeState(
        cache=jax.tree.map(put_row, state.cache, row_cache),
        logits_bv=set_b(state.logits_bv, logits_v),
        pos_b=set_b(state.pos_b, length),
        n_b=set_b(state.n_b, 0),
        max_tokens_b=set_b(state.max_tokens_b, max_tokens),
        seed_b=set_b(state.seed_b, seed),
        active_b=set_b(state.active_b, True),
        stop_bz=set_b(state.stop_bz, stop_z),
        sampling=jax.tree.map(set_b, state.sampling, sp),
    )


@functools.partial(jax.jit, donate_argnums=0)
def release(state: DecodeState, slot) -> DecodeState:
    return dataclasses.replace(state, active_b=state.active_b.at[slot].set(False))


def _sample_rows(logits_bv, keys_b, sp: SamplingArrays):
    """`sample` row by row, each row with its own key."""

    def one(logits_v, key, sp_row):
        tok_1, lp_1 = sample(logits_v[None], key, jax.tree.map(lambda a: a[None], sp_row))
        return tok_1[0], lp_1[0]

    return jax.vmap(one)(logits_bv, keys_b, sp)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def generate(model: Model, params, state: DecodeState):
    """One token for every active slot: (state, tokens (B,), logprobs (B,), done (B,)).

    `done` is set on the step that produced a request's last token (stop id, max_tokens, or the
    cache is full); inactive slots compute garbage that is never read and never moves them.
    """
    max_len = state.cache["k"].shape[2]
    keys_b = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(
        state.seed_b, state.n_b
    )
    tok_b, lp_b = _sample_rows(state.logits_bv, keys_b, state.sampling)
    active_b = state.active_b

    # feed the new token at its position; inactive slots feed at their frozen position
    logits_b1v, cache = model.apply(params, tok_b[:, None], state.pos_b[:, None], state.cache)
    n_b = state.n_b + active_b
    pos_b = state.pos_b + active_b
    stop_b = jnp.any(tok_b[:, None] == state.stop_bz, axis=-1)
    # pos_b == max_len: the next token would have no cache slot to be fed at
    done_b = active_b & (stop_b | (n_b >= state.max_tokens_b) | (pos_b >= max_len))
    state = dataclasses.replace(
        state,
        cache=cache,
        logits_bv=logits_b1v[:, 0],
        pos_b=pos_b,
        n_b=n_b,
        active_b=active_b & ~done_b,
    )
    return state, tok_b, lp_b, done_b


@dataclasses.dataclass
class _Running:
    rid: int
    request: Request
    tokens: list[int]
    logprobs: list[float]


class Engine:
    """Slots + a FIFO queue. `submit` requests, then call `step()` in a loop (a server's engine
    thread does) or `run_until_idle()`; finished requests come back as `Result`s.

    `detokenize(token_ids) -> str` is needed only for requests with stop strings.
    """

    def __init__(
        self,
        model: Model,
        params,
        *,
        max_slots: int = 8,
        max_len: int | None = None,
        buckets: Sequence[int] | None = None,
        max_stop_ids: int = 8,
        pad_id: int = 0,
        detokenize: Callable[[list[int]], str] | None = None,
    ):
        max_len = max_len or model.cfg.max_seq_len
        if max_len > model.cfg.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len")
        self.model, self.params = model, params
        self.max_slots, self.max_len = max_slots, max_len
        self.buckets = tuple(sorted(buckets or prefill_buckets(max_len)))
        if self.buckets[-1] > max_len:
            raise ValueError(f"buckets={self.buckets}: every bucket must be <= max_len={max_len}")
        self.max_stop_ids, self.pad_id, self.detokenize = max_stop_ids, pad_id, detokenize
        self.state = init_state(model, max_slots, max_len, max_stop_ids)
        self.queue: collections.deque[tuple[int, Request]] = collections.deque()
        self.slots: list[_Running | None] = [None] * max_slots
        self.results: dict[int, Result] = {}
        self._next_id = 0

    # ---- the device pieces, on this engine's state ----------------------------------------

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if n <= b:
                return b
        raise ValueError(f"prompt of {n} tokens is longer than the largest bucket {self.buckets}")

    def prefill(self, request: Request):
        prompt = list(request.prompt_ids)
        tokens = np.full((1, self.bucket(len(prompt))), self.pad_id, np.int32)
        tokens[0, : len(prompt)] = prompt
        return prefill(self.model, self.params, tokens, np.int32(len(prompt)))

    def insert(self, slot: int, request: Request, row_cache, logits_v) -> None:
        stop_z = np.full((self.max_stop_ids,), -1, np.int32)
        stop_z[: len(request.stop_ids)] = list(request.stop_ids)
        sp = SamplingArrays(
            temperature=np.float32(request.temperature),
            top_k=np.int32(request.top_k),
            top_p=np.float32(request.top_p),
            min_p=np.float32(request.min_p),
        )
        self.state = insert(
            self.state,
            row_cache,
            logits_v,
            np.int32(slot),
            np.int32(len(request.prompt_ids)),
            np.int32(request.max_tokens),
            np.uint32(request.seed % 2**32),
            stop_z,
            sp,
        )

    def generate(self):
        self.state, tok_b, lp_b, done_b = generate(self.model, self.params, self.state)
        return tok_b, lp_b, done_b

    def release(self, slot: int) -> None:
        self.state = release(self.state, np.int32(slot))
        self.slots[slot] = None

    # ---- the scheduler ----------------------------------------------------------------------

    def submit(self, request: Request) -> int:
        n = len(request.prompt_ids)
        if n == 0:
            raise ValueError("submit: prompt_ids is empty")
        if n >= self.max_len:
            raise ValueError(
                f"submit: prompt of {n} tokens leaves no room (max_len={self.max_len})"
            )
        self.bucket(n)  # raises if too long for every bucket
        if request.max_tokens < 1:
            raise ValueError(f"submit: max_tokens={request.max_tokens} must be >= 1")
        if len(request.stop_ids) > self.max_stop_ids:
            raise ValueError(f"submit: more than max_stop_ids={self.max_stop_ids} stop ids")
        if request.stop_strings and self.detokenize is None:
            raise ValueError("submit: stop_strings need an Engine(detokenize=...) callback")
        rid, self._next_id = self._next_id, self._next_id + 1
        self.queue.append((rid, request))
        return rid

    def has_work(self) -> bool:
        return bool(self.queue) or any(s is not None for s in self.slots)

    def _admit(self) -> None:
        for slot in range(self.max_slots):
            if not self.queue:
                return
            if self.slots[slot] is None:
                rid, request = self.queue.popleft()
                self.insert(slot, request, *self.prefill(request))
                self.slots[slot] = _Running(rid, request, [], [])

    def _finish(self, slot: int, reason: str) -> tuple[int, Result]:
        run = self.slots[slot]
        self.slots[slot] = None
        result = Result(run.tokens, run.logprobs, reason, len(run.request.prompt_ids))
        self.results[run.rid] = result
        return run.rid, result

    def _hit_stop_string(self, run: _Running) -> bool:
        stops = run.request.stop_strings
        if not stops:
            return False
        # a stop string of c characters spans at most c tokens (each token decodes to >= 1
        # character, byte-fallback pieces aside), plus one for a piece it may start inside
        window = max(len(s) for s in stops) + 1
        text = self.detokenize(run.tokens[-window:])
        return any(s in text for s in stops)

    def step(self) -> list[tuple[int, Result]]:
        """Admits queued requests into free slots, advances every slot one token, and returns
        the (request id, Result) of each request that finished on this step."""
        self._admit()
        if not any(s is not None for s in self.slots):
            return []
        tok_b, lp_b, done_b = jax.device_get(self.generate())  # the one host transfer per step
        finished = []
        for slot, run in enumerate(self.slots):
            if run is None:
                continue
            tok = int(tok_b[slot])
            run.tokens.append(tok)
            run.logprobs.append(float(lp_b[slot]))
            if done_b[slot]:
                reason = "stop" if tok in run.request.stop_ids else "length"
                finished.append(self._finish(slot, reason))
            elif self._hit_stop_string(run):
                finished.append(self._finish(slot, "stop"))
                self.release(slot)  # the device still thinks the slot is running
        return finished

    def run_until_idle(self) -> dict[int, Result]:
        """Steps until the queue and every slot are empty; returns {request id: Result}."""
        while self.has_work():
            self.step()
        return self.results
