"""Markovian thinking (Delethink, "The Markovian Thinker"): reasoning in chunks of bounded context.

The model never sees more than the query plus C tokens of its own trace. The first chunk is the
query and up to C generated tokens. When a chunk fills without the trace ending, the context is
reset to the query + the first `keep_head` tokens of the trace + the last `keep_tail` tokens
(the carryover, m = keep_head + keep_tail, default C/2), the slot's KV cache is rebuilt for
that context, and generation continues for up to C - m tokens; at
most `max_chunks` chunks. So attention cost per token and the per-slot cache stay bounded by
query + C however long the model thinks, which is what lets a short-context model think far
past its window.

Rebuilding is cheap: the engine prefills the new contexts of every row that resets in the same
scheduler step in one batched call (engine.py); as the query and the kept head occupy the same
positions in every chunk, a context too long for a prefill bucket re-encodes only its carried
tail. This module holds the rule (pure functions on token lists); the engine's scheduler
applies it between device segments, and the same engine serves inference, the HTTP server and
RL rollouts (which train on each chunk's context, tokens and logprobs: `Result.chunks`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class MarkovianConfig:
    chunk_size: int  # C: trace tokens a context may hold
    keep_head: int = 0  # first tokens of the trace carried into every later chunk
    keep_tail: int | None = None  # last tokens carried over; default C/2 - keep_head
    max_chunks: int = 8  # I

    def __post_init__(self):
        if self.chunk_size < 2:
            raise ValueError(f"markovian chunk_size={self.chunk_size} must be >= 2")
        if self.keep_head < 0 or (self.keep_tail is not None and self.keep_tail < 0):
            raise ValueError("markovian keep_head and keep_tail must be >= 0")
        if self.carryover >= self.chunk_size:
            raise ValueError(
                f"markovian carryover keep_head + keep_tail = {self.carryover} must be smaller "
                f"than chunk_size={self.chunk_size} (a chunk must have room for new tokens)"
            )
        if self.max_chunks < 1:
            raise ValueError(f"markovian max_chunks={self.max_chunks} must be >= 1")

    @property
    def tail(self) -> int:
        if self.keep_tail is not None:
            return self.keep_tail
        return max(self.chunk_size // 2 - self.keep_head, 0)

    @property
    def carryover(self) -> int:
        """m: trace tokens a reset context starts with (fewer while the trace is short)."""
        return self.keep_head + self.tail

    def max_trace_tokens(self) -> int:
        """The longest trace max_chunks chunks can hold: C + (I - 1)(C - m)."""
        return self.chunk_size + (self.max_chunks - 1) * (self.chunk_size - self.carryover)


def carryover(trace: Sequence[int], cfg: MarkovianConfig) -> list[int]:
    """The trace tokens a reset context keeps: its first keep_head and last keep_tail tokens."""
    trace = list(trace)
    if len(trace) <= cfg.carryover:
        return trace
    tail = trace[len(trace) - cfg.tail :] if cfg.tail else []
    return trace[: cfg.keep_head] + tail


def reset_context(query: Sequence[int], trace: Sequence[int], cfg: MarkovianConfig) -> list[int]:
    """The context a new chunk starts from: the query + the carryover of the trace so far."""
    return [*query, *carryover(trace, cfg)]


def chunk_room(query_len: int, context_len: int, chunk_tokens: int, cfg: MarkovianConfig) -> int:
    """Tokens the current chunk may still add: contexts hold at most query + C tokens."""
    return query_len + cfg.chunk_size - context_len - chunk_tokens
