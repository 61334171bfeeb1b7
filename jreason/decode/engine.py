"""The continuous-batching decode engine: requests in, results out, over the slots of slots.py.

`Engine` keeps a FIFO queue and a fixed pool of slots. Each `step()` admits queued requests
into free slots (prefill + insert), dispatches one jitted `generate` of k tokens for every slot
(multi-step scheduling while no request waits), and then handles the *previous* block's tokens
on the host while the device runs this one, so the host's bookkeeping overlaps device work
instead of adding to every token's latency. A request that
ends frees its slot for the next queued one at once: a long request never holds back short ones.

A request runs as one or more device *segments*. The device ends a segment on a stop id or on
the segment's token budget; between segments the scheduler applies the request's policies:
- thinking budgets (budget.py): an early `</think>` is replaced by "Wait" (`extend`), a spent
  thinking budget appends `</think>` + an answer prefix (`extend`), the answer gets its own
  budget (Elastic Reasoning);
- Markovian chunks (markovian.py): a full chunk resets the context to query + carryover in the
  same slot; the new context is prefilled like an admitted prompt, in one call with every row
  resetting or admitted in the same step (a context longer than every prefill bucket instead
  re-encodes only its carried tail with `extend`: the query's cache entries stay valid);
- otherwise the request finishes with reason "stop" or "length".
Stop strings are matched on the host (they need detokenization); the slot is then released.

Results carry the whole trace with per-token logprobs (NaN for forced tokens, which the policy
did not sample), the finish reason, per-chunk records (context, tokens, logprobs: what RL trains
on), thinking tokens and the peak context length the slot held.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import numpy as np

from jreason.decode import slots
from jreason.decode.budget import ThinkingBudget
from jreason.decode.latent import Thoughts
from jreason.decode.markovian import MarkovianConfig, chunk_room, reset_context
from jreason.decode.sampling import SamplingArrays
from jreason.model.transformer import Model

FINISH_REASONS = ("stop", "length", "cancelled")

# one compiled slice-and-fuse per weight layout: RL hands the engine new weights every step
_layout_jit = jax.jit(lambda model, params: model.decode_params(params), static_argnums=0)


def _decode_layout(model, params):
    """The model's decode layout of `params` (one jitted call; params already in it pass)."""
    return params if isinstance(params.get("layers"), list) else _layout_jit(model, params)


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request. temperature 0 is greedy; top_k 0, top_p 1, min_p 0 are off.

    `stop_ids` end generation on the device (the stop token is kept in the output);
    `stop_strings` are checked on the host with the engine's `detokenize` callback.
    `max_tokens` caps the whole trace (thinking, forced tokens and answer, over all chunks).
    `thoughts` (Coconut models): the prompt ends with `<bot>`; the slot thinks `thoughts.n`
    continuous thoughts and takes `<eot>` before the first sampled token (slots.think).
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
    thinking: ThinkingBudget | None = None
    markovian: MarkovianConfig | None = None
    thoughts: Thoughts | None = None


@dataclasses.dataclass
class Chunk:
    """One context the model generated from: RL recomputes logprobs of `tokens` given `context`."""

    context: list[int]
    tokens: list[int]
    logprobs: list[float]  # NaN where the token was forced, not sampled


@dataclasses.dataclass
class Result:
    tokens: list[int]
    logprobs: list[float]  # NaN for forced tokens
    finish_reason: str  # one of FINISH_REASONS
    prompt_len: int
    chunks: list[Chunk]
    thinking_tokens: int | None  # tokens before </think>; None if the engine cannot tell
    peak_context: int  # the most tokens the request's slot held at once


@dataclasses.dataclass
class _Running:
    rid: int
    request: Request
    trace: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    chunks: list[Chunk] = dataclasses.field(default_factory=list)
    n_sampled: int = 0
    thinking_tokens: int | None = None  # set when the thinking phase ends
    answer_start: int = 0
    pending: list[int] = dataclasses.field(default_factory=list)  # forced, not yet fed
    needs_prefill: bool = True
    finished: bool = False
    armed: int = 0  # n_sampled at which the device parks the slot (the max_tokens it was given)

    @property
    def chunk(self) -> Chunk:
        return self.chunks[-1]

    @property
    def pos(self) -> int:
        """Position of the next token the device will feed."""
        return len(self.chunk.context) + len(self.chunk.tokens) - len(self.pending)

    def append(self, tokens: Sequence[int], logprobs: Sequence[float]) -> None:
        self.trace += tokens
        self.logprobs += logprobs
        self.chunk.tokens += tokens
        self.chunk.logprobs += logprobs

    def pop(self) -> None:
        for seq in (self.trace, self.logprobs, self.chunk.tokens, self.chunk.logprobs):
            seq.pop()


def _context_key(run: _Running) -> tuple[int, ...]:
    """What admission prefills: the prompt (its thought positions aside), or after a Markovian
    reset the new chunk's context."""
    return tuple(run.request.prompt_ids if len(run.chunks) == 1 else run.chunk.context)


class Engine:
    """Slots + a FIFO queue. `submit` requests, then call `step()` in a loop (a server's engine
    thread does) or `run_until_idle()`; finished requests come back as `Result`s.

    `detokenize(token_ids) -> str` is needed only for requests with stop strings;
    `think_end_id` (the tokenizer's `</think>`) lets results report thinking tokens for
    requests without a thinking budget.
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
        think_end_id: int | None = None,
        steps_per_dispatch: int = 4,
        prefill_tokens: int = 4096,
        attend_min: int = 256,
    ):
        if steps_per_dispatch < 1:
            raise ValueError(f"steps_per_dispatch={steps_per_dispatch} must be >= 1")
        if prefill_tokens < 1:
            raise ValueError(f"prefill_tokens={prefill_tokens} must be >= 1")
        max_len = max_len or model.cfg.max_seq_len
        if max_len > model.cfg.max_seq_len:
            raise ValueError(
                f"max_len={max_len} exceeds the model's max_seq_len={model.cfg.max_seq_len}"
            )
        # per-layer weights: the layout the cached (unrolled) forward reads without copies
        self.model, self.params = model, _decode_layout(model, params)
        self.max_slots, self.max_len = max_slots, max_len
        self.buckets = tuple(sorted(buckets or slots.prefill_buckets(max_len)))
        if self.buckets[-1] > max_len:
            raise ValueError(f"buckets={self.buckets}: every bucket must be <= max_len={max_len}")
        self.max_stop_ids, self.pad_id, self.detokenize = max_stop_ids, pad_id, detokenize
        self.think_end_id = think_end_id
        self.steps_per_dispatch = steps_per_dispatch
        # a decode step's attention reads the smallest of these prefixes of the cache that
        # holds every running row (`_attend_len`), not all max_len slots: a server's cache is
        # sized for its longest request. Transformers only (a recurrent model reads it all).
        self.attend_buckets = (
            slots.attend_buckets(max_len, attend_min) if isinstance(model, Model) else ()
        )
        self.state = slots.init_state(model, max_slots, max_len, max_stop_ids)
        # placed (committed) where the weights are, as every later step's outputs will be: with
        # eager, uncommitted arrays the first `insert` compiled for them and again afterwards
        where = getattr(jax.tree.leaves(self.params)[0], "sharding", None)
        if isinstance(where, jax.sharding.SingleDeviceSharding):
            self.state = jax.device_put(self.state, where)
        self.queue: collections.deque[_Running] = collections.deque()
        self.slots: list[_Running | None] = [None] * max_slots
        # finished results until the caller pops them (run_until_idle returns this dict;
        # long-running callers such as the server pop each one as it finishes)
        self.results: dict[int, Result] = {}
        self._inflight = None  # (device outputs, slot snapshot, k) of the block not yet read back
        self._next_id = 0
        self.prefill_tokens = prefill_tokens
        # requests admitted this step, waiting for their prefill + insert (_insert_admitted)
        self._admitted: list[tuple] = []
        # the previous step's prefills, {context: ((cache rows, logits), row)}: n samples of
        # one prompt are queued back to back and share a row even when admitted over two steps
        self._last_rows: dict[tuple[int, ...], tuple] = {}

    def set_params(self, params) -> None:
        """New weights (e.g. after an RL update); running requests continue with them."""
        self.params = _decode_layout(self.model, params)
        self._last_rows = {}

    # ---- validation and submission ----------------------------------------------------------

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if n <= b:
                return b
        raise ValueError(f"context of {n} tokens is longer than the largest bucket {self.buckets}")

    def check(self, request: Request) -> None:
        """Raises ValueError naming what is wrong with a request this engine cannot run.

        Reads only the engine's fixed configuration, so any thread may call it."""
        n = len(request.prompt_ids)
        if n == 0:
            raise ValueError("prompt_ids is empty")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens={request.max_tokens} must be >= 1")
        mk = request.markovian
        if mk is not None:
            if n + mk.chunk_size > self.max_len:
                raise ValueError(
                    f"prompt of {n} tokens + markovian chunk_size={mk.chunk_size} exceeds the "
                    f"engine's max_len={self.max_len}"
                )
        elif n >= self.max_len:
            raise ValueError(
                f"prompt of {n} tokens leaves no room to generate (max_len={self.max_len}); "
                "use markovian mode or a shorter prompt"
            )
        self.bucket(n)
        if mk is not None:
            self.bucket(max(mk.tail, 1))  # the tokens a Markovian reset re-encodes
        tb = request.thinking
        if tb is not None:
            self.bucket(max(len(tb.continuation_ids), len(tb.forced_end())))  # `extend`s
        th = request.thoughts
        if th is not None:
            if mk is not None or tb is not None:
                raise ValueError("thoughts (Coconut) do not combine with markovian or thinking")
            if not isinstance(self.model, Model):
                raise ValueError("thoughts need a transformer model (input embeddings)")
            if request.prompt_ids[-1] != th.tokens.bot:
                raise ValueError(f"thoughts: the prompt must end with <bot> ({th.tokens.bot})")
            if th.tokens.vocab_size > self.model.cfg.vocab_size:
                raise ValueError(
                    f"thoughts: ids {th.tokens} need vocab_size >= {th.tokens.vocab_size}"
                )
            if n + th.n + 1 >= self.max_len:
                raise ValueError(
                    f"prompt of {n} tokens + {th.n} thoughts + <eot> leaves no room to "
                    f"generate (max_len={self.max_len})"
                )
        n_stop = len(request.stop_ids) + (request.thinking is not None)
        if n_stop > self.max_stop_ids:
            raise ValueError(f"{n_stop} stop ids (with </think>) exceed max_stop_ids")
        if request.stop_strings and self.detokenize is None:
            raise ValueError("stop_strings need an Engine(detokenize=...) callback")
        if request.temperature < 0 or not math.isfinite(request.temperature):
            raise ValueError(f"temperature={request.temperature} must be finite and >= 0")
        if not 0 < request.top_p <= 1:
            raise ValueError(f"top_p={request.top_p} must be in (0, 1]")
        if not 0 <= request.top_k < 2**31:
            raise ValueError(f"top_k={request.top_k} must be in [0, 2**31)")
        if not 0 <= request.min_p <= 1:
            raise ValueError(f"min_p={request.min_p} must be in [0, 1]")
        if any(not 0 <= t < self.model.cfg.vocab_size for t in request.prompt_ids):
            raise ValueError(f"prompt_ids must be in [0, vocab_size={self.model.cfg.vocab_size})")

    def submit(self, request: Request) -> int:
        try:
            self.check(request)
        except ValueError as e:
            raise ValueError(f"submit: {e}") from None
        rid, self._next_id = self._next_id, self._next_id + 1
        self.queue.append(_Running(rid, request))
        return rid

    def has_work(self) -> bool:
        return bool(self.queue) or any(s is not None for s in self.slots) or bool(self._inflight)

    def running(self) -> int:
        return sum(s is not None for s in self.slots)

    def trace(self, rid: int, logprobs: bool = False):
        """Tokens a queued or running request has so far (for streaming), None if not live;
        with logprobs=True, (tokens, logprobs) (NaN for forced tokens).

        Not thread-safe: call it from the thread that calls `step()` (between steps)."""
        for run in (*self.slots, *self.queue):
            if run is not None and run.rid == rid:
                return (list(run.trace), list(run.logprobs)) if logprobs else list(run.trace)
        return None

    def cancel(self, rid: int) -> Result | None:
        """Ends a queued or running request now (e.g. its client went away) and frees its slot
        for the next step; returns its partial Result (reason "cancelled"), None if not live."""
        for run in self.queue:
            if run.rid == rid:
                self.queue.remove(run)
                run.chunks.append(Chunk(list(run.request.prompt_ids), [], []))
                run.finished = True
                return self._result(run, "cancelled")
        for slot, run in enumerate(self.slots):
            if run is not None and run.rid == rid:
                self.state = slots.release(self.state, np.int32(slot))
                return self._finish(slot, run, "cancelled")[1]
        return None

    # ---- arming the device for a request's next segment --------------------------------------

    def _stop_z(self, run: _Running) -> np.ndarray:
        stop = list(run.request.stop_ids)
        if run.request.thinking is not None and run.thinking_tokens is None:
            stop.append(run.request.thinking.think_end_id)
        stop_z = np.full((self.max_stop_ids,), -1, np.int32)
        stop_z[: len(stop)] = stop
        return stop_z

    def _budget(self, run: _Running) -> tuple[int, str | None]:
        """(tokens the next segment may sample, or <= 0 with the limit that is spent)."""
        req, tb, mk = run.request, run.request.thinking, run.request.markovian
        rooms = {"max_tokens": req.max_tokens - len(run.trace)}
        if tb is not None and run.thinking_tokens is None:
            rooms["thinking"] = tb.thinking_room(len(run.trace))
        elif tb is not None:
            rooms["answer"] = tb.answer_room(len(run.trace) - run.answer_start)
        if mk is not None:
            query = len(req.prompt_ids)
            rooms["chunk"] = chunk_room(query, len(run.chunk.context), len(run.chunk.tokens), mk)
        else:
            rooms["cache"] = self.max_len - len(run.chunk.context) - len(run.chunk.tokens)
        rooms = {k: v for k, v in rooms.items() if v is not None}
        limit = min(rooms, key=rooms.get)
        return rooms[limit], (limit if rooms[limit] <= 0 else None)

    def _force(self, run: _Running, tokens: list[int]) -> None:
        run.append(tokens, [math.nan] * len(tokens))
        run.pending += tokens

    def _reset(self, run: _Running) -> None:
        """Markovian reset: a new chunk whose context is the query + the trace's carryover.

        The new context is prefilled like an admitted prompt, batched with every other row that
        resets or is admitted in the same scheduler step (in lockstep decoding all of them):
        one `prefill` + `insert` per bucket instead of one call per row (+33% -> +7.8% per-token
        cost from C to 8C in tools/bench/markovian.py). A context longer than every prefill
        bucket falls back to re-encoding only the tail in the slot (`extend`): the query and the
        kept head sit at the same positions as before, so their cache entries are still right;
        if nothing moved, the last kept token is re-fed to get fresh logits.
        """
        mk = run.request.markovian
        context = reset_context(run.request.prompt_ids, run.trace, mk)
        run.chunks.append(Chunk(context, [], []))
        if len(context) <= self.buckets[-1]:
            run.pending, run.needs_prefill = [], True
            return
        # head tokens were fed at these positions in chunk 1 (whose record holds what was fed)
        unmoved = len(run.request.prompt_ids) + min(mk.keep_head, len(run.chunks[0].tokens))
        run.pending = context[min(unmoved, len(context) - 1) :]
        run.needs_prefill = False

    def _advance(self, slot: int, run: _Running) -> str | None:
        """Applies the policies until the request can run another segment (then arms the slot
        and returns None) or is finished (returns the finish reason)."""
        req, tb, mk = run.request, run.request.thinking, run.request.markovian
        while True:
            room, spent = self._budget(run)
            if spent == "chunk" and run.pending:
                # forced tokens that overflow the chunk were never in its context: they go
                # into the next context instead (or nowhere, if the request ends here)
                del run.chunk.tokens[-len(run.pending) :]
                del run.chunk.logprobs[-len(run.pending) :]
                run.pending = []
            if len(run.trace) >= req.max_tokens:
                return "length"  # max_tokens caps everything, forced tokens included
            if spent == "thinking":
                run.thinking_tokens = len(run.trace)
                self._force(run, tb.forced_end()[: req.max_tokens - len(run.trace)])
                run.answer_start = len(run.trace)
                continue
            if spent == "chunk":
                if len(run.chunks) >= mk.max_chunks:
                    return "length"
                self._reset(run)
                continue
            if spent is not None:
                return "length"
            break
        stop_z = self._stop_z(run)
        max_tokens = np.int32(run.n_sampled + room)
        run.armed = int(max_tokens)
        if run.needs_prefill:  # admission: prefilled and inserted with the step's others
            self._admitted.append((slot, run, max_tokens, stop_z))
            run.needs_prefill = False
        elif run.pending:
            n = len(run.pending)
            tokens = np.full((1, self.bucket(n)), self.pad_id, np.int32)
            tokens[0, :n] = run.pending
            start = run.pos
            self.state = slots.extend(
                self.model,
                self.params,
                self.state,
                np.int32(slot),
                tokens,
                np.int32(start),
                np.int32(n),
                max_tokens,
                stop_z,
            )
        else:
            self.state = slots.set_controls(self.state, np.int32(slot), max_tokens, stop_z)
        run.pending = []
        return None

    def _insert_admitted(self) -> None:
        """Prefills the contexts admitted this step and inserts them, in one `prefill` and one
        `insert` call per prefill bucket (split so a call holds at most `prefill_tokens`
        tokens). The n samples of one prompt (RL groups, `n` in the API) share one row, also
        across steps when the previous step prefilled it (`_last_rows`)."""
        admitted, self._admitted = self._admitted, []
        by_bucket: dict[int, dict[tuple[int, ...], list]] = {}
        for entry in admitted:
            key = _context_key(entry[1])
            by_bucket.setdefault(self.bucket(len(key)), {}).setdefault(key, []).append(entry)
        last, self._last_rows = self._last_rows, {}
        for P, contexts in by_bucket.items():
            # rows the previous step prefilled, grouped by the call that made them
            reuse: dict[int, list] = {}
            fresh = []
            for key in contexts:
                if key in last:
                    reuse.setdefault(id(last[key][0]), []).append(key)
                else:
                    fresh.append(key)
            calls = [(last[keys[0]][0], {k: last[k][1] for k in keys}) for keys in reuse.values()]
            per_call = max(1, min(self.max_slots, self.prefill_tokens // P))
            for i in range(0, len(fresh), per_call):
                keys = fresh[i : i + per_call]
                calls.append((self._prefill(keys, P), {k: j for j, k in enumerate(keys)}))
            for rows, index in calls:
                self._last_rows.update({k: (rows, j) for k, j in index.items()})
                self._insert(rows, [(index[k], e) for k in index for e in contexts[k]])

    def warmup(self) -> int:
        """Compiles `prefill` and `insert` for every (rows, bucket) shape admission can use
        (rows: powers of two up to what one call holds), running each once on padding, and
        the decode step (`warmup_decode`), so a server's first requests wait for no
        compilation. Returns how many shapes it ran."""
        shapes = 0
        for P in self.buckets:
            per_call = max(1, min(self.max_slots, self.prefill_tokens // P))
            for i in range((per_call - 1).bit_length() + 1):
                self._insert(self._prefill([(self.pad_id,)] * (1 << i), P), [])  # n = 0
                shapes += 1
        return shapes + self.warmup_decode()

    def warmup_decode(self) -> int:
        """Runs `generate` once for every attend bucket and block size k a step can pick, so
        no row's growth past a bucket compiles mid-traffic. Only on an engine with no slot
        occupied, where the steps change nothing (every row is inactive); returns how many
        shapes it ran (0 otherwise)."""
        if any(run is not None for run in self.slots):
            return 0
        shapes = 0
        for attend_len in (*self.attend_buckets, None):
            for k in sorted({1, self.steps_per_dispatch}):
                self.state, *_ = slots.generate(self.model, self.params, self.state, k, attend_len)
                shapes += 1
        return shapes

    def _attend_len(self) -> int | None:
        """The smallest attend bucket above every running row's position through the block in
        flight and the one about to be dispatched (up to steps_per_dispatch tokens each);
        None (the whole cache) if no bucket is."""
        # `pending` is fed by `extend` before any dispatch (_advance), so `pos` is the device's
        # position but for the block in flight
        top = max(r.pos for r in self.slots if r is not None) + 2 * self.steps_per_dispatch
        return next((b for b in self.attend_buckets if b > top), None)

    def _prefill(self, contexts: list[tuple[int, ...]], P: int):
        """(cache rows, first logits) of contexts padded to bucket P, R rows (a power of two,
        padded with one-token rows) so that few shapes compile."""
        R = 1 << (len(contexts) - 1).bit_length()
        tokens = np.full((R, P), self.pad_id, np.int32)
        lengths = np.ones((R,), np.int32)
        for j, context in enumerate(contexts):
            tokens[j, : len(context)] = context
            lengths[j] = len(context)
        return slots.prefill(self.model, self.params, tokens, lengths)

    def _insert(self, rows, entries: list) -> None:
        """One `insert` of entries [(row index, (slot, run, max_tokens, stop_z))]."""
        M, n = self.max_slots, len(entries)
        a = {
            "src": np.zeros(M, np.int32),
            "slot": np.full(M, M, np.int32),  # padding: slot index B, dropped
            "length": np.zeros(M, np.int32),
            "n0": np.zeros(M, np.int32),
            "max_tokens": np.zeros(M, np.int32),
            "seed": np.zeros(M, np.uint32),
            "stop": np.full((M, self.max_stop_ids), -1, np.int32),
            "temperature": np.zeros(M, np.float32),
            "top_k": np.zeros(M, np.int32),
            "top_p": np.ones(M, np.float32),
            "min_p": np.zeros(M, np.float32),
        }
        for i, (j, (slot, run, max_tokens, stop_z)) in enumerate(entries):
            req = run.request
            a["src"][i], a["slot"][i], a["length"][i] = j, slot, len(_context_key(run))
            a["n0"][i], a["max_tokens"][i], a["stop"][i] = run.n_sampled, max_tokens, stop_z
            a["seed"][i] = req.seed % 2**32
            a["temperature"][i], a["top_k"][i] = req.temperature, req.top_k
            a["top_p"][i], a["min_p"][i] = req.top_p, req.min_p
        sp = SamplingArrays(a["temperature"], a["top_k"], a["top_p"], a["min_p"])
        cache_rows, logits_rv = rows
        self.state = slots.insert(
            self.model, self.state, cache_rows, logits_rv, np.int32(n), a["src"], a["slot"],
            a["length"], a["n0"], a["max_tokens"], a["seed"], a["stop"], sp,
        )  # fmt: skip
        for _, (slot, run, _, _) in entries:
            th, prompt = run.request.thoughts, run.request.prompt_ids
            if th is not None and len(run.chunks) == 1:
                self.state = slots.think(
                    self.model, self.params, self.state, np.int32(slot), np.int32(prompt[-1]),
                    np.int32(len(prompt)), np.int32(th.n), np.int32(th.tokens.eot),
                )  # fmt: skip

    # ---- the scheduler ----------------------------------------------------------------------

    def _admit(self) -> list[tuple[int, Result]]:
        finished = []
        for slot in range(self.max_slots):
            while self.queue and self.slots[slot] is None:
                run = self.queue.popleft()
                th = run.request.thoughts
                context = [*run.request.prompt_ids, *(th.placeholders() if th else [])]
                run.chunks.append(Chunk(context, [], []))
                self.slots[slot] = run
                reason = self._advance(slot, run)
                if reason is not None:  # nothing to run (cannot happen for a checked request)
                    finished.append(self._finish(slot, run, reason))
        if self._admitted:
            self._insert_admitted()
        return finished

    def _finish(self, slot: int, run: _Running, reason: str) -> tuple[int, Result]:
        run.finished = True
        self.slots[slot] = None
        return run.rid, self._result(run, reason)

    def _result(self, run: _Running, reason: str) -> Result:
        thinking = run.thinking_tokens
        if thinking is None and self._think_end(run) is not None:
            thinking = len(run.trace)
        result = Result(
            tokens=run.trace,
            logprobs=run.logprobs,
            finish_reason=reason,
            prompt_len=len(run.request.prompt_ids),
            chunks=run.chunks,
            thinking_tokens=thinking,
            peak_context=max(len(c.context) + len(c.tokens) for c in run.chunks),
        )
        self.results[run.rid] = result
        return result

    def _think_end(self, run: _Running) -> int | None:
        tb = run.request.thinking
        return tb.think_end_id if tb is not None else self.think_end_id

    def _hit_stop_string(self, run: _Running) -> bool:
        stops = run.request.stop_strings
        if not stops:
            return False
        # a stop string of c characters spans at most c tokens (each token decodes to >= 1
        # character, byte-fallback pieces aside), plus one for a piece it may start inside
        window = max(len(s) for s in stops) + 1
        text = self.detokenize(run.trace[-window:])
        return any(s in text for s in stops)

    def _on_token(self, slot: int, run: _Running, tok: int, lp: float, done: bool):
        """Handles one sampled token; returns a finish reason or None."""
        req, tb = run.request, run.request.thinking
        run.n_sampled += 1
        run.append([tok], [lp])
        if run.thinking_tokens is None and tok == self._think_end(run):
            keep_thinking = tb.on_think_end(len(run.trace) - 1) if tb is not None else None
            if keep_thinking is not None and len(run.trace) < req.max_tokens:
                # s1: replace the early </think> with "Wait" (as much as max_tokens allows)
                run.pop()
                self._force(run, keep_thinking[: req.max_tokens - len(run.trace)])
            else:
                run.thinking_tokens = len(run.trace) - 1
                run.answer_start = len(run.trace)
        if done and tok in req.stop_ids:
            return "stop"
        if self._hit_stop_string(run):
            if not done:
                self.state = slots.release(self.state, np.int32(slot))
            return "stop"
        if done:
            return self._advance(slot, run)
        return None

    def _all_park_in_flight(self) -> bool:
        """True when every running slot is in the block in flight and its budget (a Markovian
        chunk, thinking, max_tokens) runs out within it: a block dispatched now would only idle
        them, so the host reads back first and re-arms them (e.g. resets every chunk) before
        the next dispatch. In lockstep Markovian decoding this saves a block per reset."""
        if self._inflight is None or self.queue:
            return False
        snapshot, k = self._inflight[1], self._inflight[2]
        return all(
            run is None or (snapshot[slot] is run and run.armed - run.n_sampled <= k)
            for slot, run in enumerate(self.slots)
        )

    def _read_back(self, outputs, snapshot) -> list[tuple[int, Result]]:
        tok_kb, lp_kb, done_kb, was_kb = jax.device_get(outputs)  # the one transfer per block
        finished = []
        for j in range(tok_kb.shape[0]):
            for slot, run in enumerate(snapshot):
                if run is None or run.finished or not was_kb[j, slot]:
                    continue  # empty, ended by the host after dispatch, or parked
                reason = self._on_token(
                    slot, run, int(tok_kb[j, slot]), float(lp_kb[j, slot]), done_kb[j, slot]
                )
                if reason is not None:
                    finished.append(self._finish(slot, run, reason))
        return finished

    def step(self) -> list[tuple[int, Result]]:
        """Admits queued requests, dispatches one device block of k steps for every slot, and
        reads back the previous block's tokens meanwhile; returns the (request id, Result) of
        each request that finished in the block read back.

        k is `steps_per_dispatch` while nothing waits in the queue, else 1: a slot that frees up
        mid-block idles until the host sees it (up to 2k steps, as the block after it is already
        dispatched), which costs nothing when no request is waiting for it.
        """
        finished = self._admit()
        dispatched = None
        if any(run is not None for run in self.slots) and not self._all_park_in_flight():
            k = 1 if self.queue else self.steps_per_dispatch
            attend_len = self._attend_len()
            self.state, *outputs = slots.generate(
                self.model, self.params, self.state, k, attend_len
            )
            dispatched = (outputs, list(self.slots), k)
        if self._inflight:
            finished += self._read_back(*self._inflight[:2])
        self._inflight = dispatched
        return finished

    def run_until_idle(self) -> dict[int, Result]:
        """Steps until the queue, every slot and the pipeline are empty; {request id: Result}."""
        while self.has_work():
            self.step()
        return self.results
