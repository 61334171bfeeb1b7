"""Rewards: score one completion, registered by name and combined with weights from config.

Every reward is `fn(completion, n_tokens, example, **params) -> float`:
  completion  the generated text (for a Markovian trace, the whole trace's text)
  n_tokens    its length in generated tokens (all chunks of a trace)
  example     a mapping (or an object with attributes, e.g. a task `Example`) with
                answer      the reference final answer (required by the correctness rewards)
                task        optional: a task name from `jreason.data.tasks.TASKS`, or a Task;
                            its verifier decides correctness. Without one, math equivalence
                            (`jreason.data.verify.score_math`, math_verify) does.
                target_len  the length asked for in the prompt (L1 rewards only)

Registered:
- `correct`: 1.0 / 0.0 from the task's verifier or math equivalence. Both read only the text
  after `</think>`, so an unfinished thought earns nothing (see verify.py).
- `format`: 1.0 if the completion is `[<think>] ... </think>` then a final answer
  (`\\boxed{}` or `Answer:`), else 0.0. The opening tag is optional because the chat template's
  generation prompt already ends in `<think>` (tokenizer.py); `require_open=True` insists on it.
- `l1_exact`, `l1_max` (Aggarwal & Welleck 2025, "L1: Controlling How Long A Reasoning Model
  Thinks", LCPO): with n the completion length and n_target the prompt's `target_len`,
      exact: 1[correct] - alpha * |n_target - n|
      max:   1[correct] * clip(alpha * (n_target - n) + delta, 0, 1)
  Exact asks for the length; max treats it as a budget and pays for finishing early.
- `overlong` (DAPO, Yu et al. 2025, soft overlong punishment): 0 up to L_max - L_buf tokens,
  then falls linearly, (L_max - L_buf - n) / L_buf, to -1 at L_max, and is -1 beyond it (the
  paper's piecewise form; with max_tokens = L_max nothing is longer). A length penalty that
  ramps up instead of a cliff when the generation budget truncates the answer.

`combine({"correct": 1.0, "format": 0.2, "overlong": {"weight": 1.0, "max_len": 4096,
"buffer": 512}})` checks names and params once (errors list what is allowed) and returns a
`Reward`: `reward(completion, n_tokens, example)` is the weighted sum, `reward.parts(...)` the
unweighted terms by name (for logging).

Left out: model-based (learned) rewards and code execution.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from jreason.data.tasks import Task, get_task
from jreason.data.verify import extract_answer, score_math
from jreason.tokenizer import THINK_CLOSE, THINK_OPEN


def _get(example: Any, name: str, default: Any = None) -> Any:
    if isinstance(example, Mapping):
        return example.get(name, default)
    return getattr(example, name, default)


def _need(example: Any, name: str, reward: str) -> Any:
    value = _get(example, name)
    if value is None:
        raise ValueError(f"reward {reward!r} needs the example field {name!r}")
    return value


def correct(completion: str, n_tokens: int, example: Any) -> float:
    answer = str(_need(example, "answer", "correct"))
    task = _get(example, "task")
    if task is None:
        return score_math(completion, answer)
    if not isinstance(task, Task):
        task = get_task(task)  # verifiers read no difficulty knobs: defaults are fine
    return task.score(completion, answer)


def format_reward(completion: str, n_tokens: int, example: Any, require_open: bool = False):
    think, close, answer = completion.partition(THINK_CLOSE)
    if not close or THINK_CLOSE in answer or THINK_OPEN in answer:
        return 0.0  # no, or more than one, thinking block
    head, opened, body = think.partition(THINK_OPEN)
    if opened and (head.strip() or THINK_OPEN in body):
        return 0.0  # text before <think>, or a nested <think>
    if require_open and not opened:
        return 0.0
    return 1.0 if extract_answer(completion) is not None else 0.0


def l1_exact(completion: str, n_tokens: int, example: Any, alpha: float = 0.0003) -> float:
    target = int(_need(example, "target_len", "l1_exact"))
    return correct(completion, n_tokens, example) - alpha * abs(target - n_tokens)


def l1_max(
    completion: str, n_tokens: int, example: Any, alpha: float = 0.01, delta: float = 0.5
) -> float:
    target = int(_need(example, "target_len", "l1_max"))
    if not correct(completion, n_tokens, example):
        return 0.0
    return min(max(alpha * (target - n_tokens) + delta, 0.0), 1.0)


def overlong(completion: str, n_tokens: int, example: Any, max_len: int = 0, buffer: int = 0):
    if max_len < 1 or not 0 < buffer <= max_len:
        raise ValueError(
            f"overlong needs max_len >= 1 and 0 < buffer <= max_len, got {max_len}, {buffer}"
        )
    start = max_len - buffer
    if n_tokens <= start:
        return 0.0
    return max((start - n_tokens) / buffer, -1.0)


REWARDS: dict[str, Callable[..., float]] = {
    "correct": correct,
    "format": format_reward,
    "l1_exact": l1_exact,
    "l1_max": l1_max,
    "overlong": overlong,
}


def _params(name: str) -> list[str]:
    return list(inspect.signature(REWARDS[name]).parameters)[3:]


@dataclasses.dataclass(frozen=True)
class Reward:
    """A weighted sum of registered rewards; build it with `combine`."""

    terms: tuple[tuple[str, float, dict], ...]  # (name, weight, params)

    def parts(self, completion: str, n_tokens: int, example: Any) -> dict[str, float]:
        return {
            name: float(REWARDS[name](completion, n_tokens, example, **params))
            for name, _, params in self.terms
        }

    def __call__(self, completion: str, n_tokens: int, example: Any) -> float:
        parts = self.parts(completion, n_tokens, example)
        return sum(weight * parts[name] for name, weight, _ in self.terms)


def combine(spec: Mapping[str, float | Mapping[str, Any]]) -> Reward:
    """{name: weight} or {name: {"weight": w, **params}} -> a `Reward` (module docstring)."""
    if not spec:
        raise ValueError(f"an empty reward; allowed rewards: {sorted(REWARDS)}")
    terms = []
    for name, value in spec.items():
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r}; allowed rewards: {sorted(REWARDS)}")
        params = dict(value) if isinstance(value, Mapping) else {"weight": value}
        weight = params.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ValueError(f"reward {name!r}: weight must be a number, got {weight!r}")
        for key in params:
            if key not in _params(name):
                raise ValueError(
                    f"unknown param {key!r} for reward {name!r}; allowed: "
                    f"{['weight', *_params(name)]}"
                )
        if name == "overlong":  # fail at config time, not on the first rollout
            overlong("", 0, None, **params)
        terms.append((name, float(weight), params))
    return Reward(tuple(terms))
