"""Thinking budgets: s1 budget forcing and Elastic Reasoning's separate solution budget.

A reasoning model writes its thinking, then `</think>`, then the answer. Two controls from the
papers, both enforced by the engine's scheduler on the host between device segments (the device
stops a segment on `</think>` or on the segment's token budget; see engine.py):

- s1 ("simple test-time scaling"): `min_thinking_tokens` replaces an early `</think>` with a
  continuation such as "Wait" so the model keeps thinking; `max_thinking_tokens` forces
  `</think>` (optionally followed by an answer prefix such as "Final answer:") once the thinking
  reaches the budget, and the answer follows.
- Elastic Reasoning: `max_answer_tokens` budgets the solution after `</think>` separately, so a
  truncated thinking phase still leaves room for an answer.

Thinking tokens are counted over the trace before `</think>`, forced continuation words
included, across Markovian chunks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class ThinkingBudget:
    think_end_id: int  # the single token id of "</think>"
    min_thinking_tokens: int = 0
    max_thinking_tokens: int | None = None
    continuation_ids: Sequence[int] = ()  # replaces an early </think>, e.g. tokens of "Wait"
    answer_prefix_ids: Sequence[int] = ()  # follows a forced </think>, e.g. "Final answer:"
    max_answer_tokens: int | None = None  # Elastic Reasoning's solution budget

    def __post_init__(self):
        if self.min_thinking_tokens < 0:
            raise ValueError(f"min_thinking_tokens={self.min_thinking_tokens} must be >= 0")
        if self.max_thinking_tokens is not None and self.max_thinking_tokens < 1:
            raise ValueError(f"max_thinking_tokens={self.max_thinking_tokens} must be >= 1")
        if (
            self.max_thinking_tokens is not None
            and self.min_thinking_tokens > self.max_thinking_tokens
        ):
            raise ValueError(
                f"min_thinking_tokens={self.min_thinking_tokens} exceeds "
                f"max_thinking_tokens={self.max_thinking_tokens}"
            )
        if self.min_thinking_tokens > 0 and not self.continuation_ids:
            raise ValueError(
                "min_thinking_tokens needs continuation_ids (the tokens of e.g. 'Wait') to "
                "replace an early </think> with"
            )
        if self.max_answer_tokens is not None and self.max_answer_tokens < 1:
            raise ValueError(f"max_answer_tokens={self.max_answer_tokens} must be >= 1")
        if self.think_end_id in self.continuation_ids:
            raise ValueError("continuation_ids must not contain think_end_id")

    def thinking_room(self, thinking: int) -> int | None:
        """Tokens the thinking phase may still add (None: unlimited)."""
        if self.max_thinking_tokens is None:
            return None
        return self.max_thinking_tokens - thinking

    def answer_room(self, answer: int) -> int | None:
        if self.max_answer_tokens is None:
            return None
        return self.max_answer_tokens - answer

    def on_think_end(self, thinking: int) -> list[int] | None:
        """The model wrote </think> after `thinking` tokens: the tokens that replace it to keep
        it thinking (s1's "Wait"), or None to accept it and move on to the answer."""
        if thinking < self.min_thinking_tokens:
            return list(self.continuation_ids)
        return None

    def forced_end(self) -> list[int]:
        """What is appended when the thinking budget runs out."""
        return [self.think_end_id, *self.answer_prefix_ids]
