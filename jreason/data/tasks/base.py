"""The `Example` record and the `Task` base class shared by all procedural reasoning tasks.

A task is a seeded generator of (prompt, worked reasoning, answer) triples plus a verifier that
scores a model completion against the answer. Procedural tasks give us unlimited, contamination
free RL prompts whose difficulty is a knob (operands, numbers, steps), and a reference trace
for SFT warm-up or for checking a decoder end to end.

Answer format (the same for every task, and what every prompt asks for): the model thinks
inside `<think> ... </think>` and then writes its final answer as `\\boxed{...}`. The scorer
also accepts an `Answer: ...` line, and reads only the text after the last `</think>`; an
unclosed `<think>` scores 0 (see `jreason.data.verify.extract_answer`).

Determinism: example i of seed s is drawn from `numpy.random.default_rng([s, i])`, so it is the
same whatever `n` or `start` a caller asks for, and data can be sharded or resumed by index.

Left out: tokenisation, chat templates and batching (pipelines do that), and partial credit
(every verifier returns 0.0 or 1.0; the signature allows more later).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np

from jreason.data.verify import extract_answer

# Appended to every prompt so the answer format is stated exactly once.
ANSWER_INSTRUCTION = "Think step by step, then give your final answer as \\boxed{...}."


@dataclasses.dataclass(frozen=True)
class Example:
    """One problem. `answer` is what `Task.score` checks against, not necessarily model text."""

    id: str
    prompt: str
    reasoning: str
    answer: str

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def check_int(config: Any, name: str, lo: int, hi: int | None = None) -> None:
    """Validates integer knob `name` of a config dataclass; the error names the knob."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{type(config).__name__}.{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        allowed = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{type(config).__name__}.{name} must be {allowed}, got {value}")


def check_choices(config: Any, name: str, allowed: tuple[str, ...]) -> None:
    """Validates a non-empty tuple-of-choices knob (e.g. `ops`); the error names the knob."""
    value = getattr(config, name)
    if not isinstance(value, tuple) or not value or any(v not in allowed for v in value):
        raise ValueError(
            f"{type(config).__name__}.{name} must be a non-empty tuple of {list(allowed)}, "
            f"got {value!r}"
        )


class Task(abc.ABC):
    """A procedural task: `generate` examples, `score` completions. Subclasses set the ClassVars.

    Subclasses implement `sample(rng)` and `check(pred, answer)`; everything else is shared.
    """

    name: ClassVar[str]
    Config: ClassVar[type]  # a frozen dataclass of difficulty knobs, validated in __post_init__

    def __init__(self, config: Any = None):
        self.config = self.Config() if config is None else config
        if not isinstance(self.config, self.Config):
            raise TypeError(f"{self.name}: config must be a {self.Config.__name__}")

    @classmethod
    def knobs(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls.Config)]

    def generate(self, seed: int, n: int, start: int = 0) -> Iterator[Example]:
        """Examples `start .. start+n-1` for `seed`; example i depends only on (seed, i)."""
        if seed < 0 or n < 0 or start < 0:
            raise ValueError(f"seed, n and start must be >= 0, got {seed}, {n}, {start}")
        for i in range(start, start + n):
            rng = np.random.default_rng([seed, i])
            prompt, reasoning, answer = self.sample(rng)
            yield Example(f"{self.name}-{seed}-{i}", prompt, reasoning, answer)

    @abc.abstractmethod
    def sample(self, rng: np.random.Generator) -> tuple[str, str, str]:
        """One (prompt, reasoning, answer) triple drawn with `rng`."""

    @abc.abstractmethod
    def check(self, pred: str, answer: str) -> bool:
        """Is the extracted final answer `pred` correct? Must not raise on any `pred`."""

    def score(self, completion: str, answer: str) -> float:
        """1.0 if the completion's final answer (see module docstring) is correct, else 0.0."""
        pred = extract_answer(completion)
        if pred is None:
            return 0.0
        return 1.0 if self.check(pred, answer) else 0.0

    def final_answer(self, example: Example) -> str:
        """The text a correct model puts in the box (the answer, unless a task overrides it)."""
        return example.answer

    def reference_completion(self, example: Example) -> str:
        """The reference solution formatted as a model should output it; it scores 1.0."""
        return f"<think>\n{example.reasoning}\n</think>\n\\boxed{{{self.final_answer(example)}}}"


def parse_int(pred: str) -> int | None:
    """An integer answer from extracted text (`-1,234`, `42.`, `$7$`), or None."""
    s = pred.strip().strip("$").strip().rstrip(".").replace(",", "").replace(" ", "")
    sign = s[:1] if s[:1] in "+-" else ""
    digits = s[len(sign) :]
    # Length cap: int() of a 100k-digit string is slow and no answer here is that long.
    if not digits.isascii() or not digits.isdigit() or len(digits) > 100:
        return None
    return int(sign + digits)
