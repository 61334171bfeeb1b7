"""Multi-step integer arithmetic with a one-operation-per-line worked trace.

Prompt: an expression such as `12 + 7 * 3 - 40 / 5` over positive integers, no parentheses, so
the difficulty is precedence plus carrying intermediate values. The trace rewrites the
expression one operation at a time, `*` and `/` first, then `+` and `-`, left to right:

    7 * 3 = 21 -> 12 + 21 - 40 / 5
    40 / 5 = 8 -> 12 + 21 - 8
    12 + 21 = 33 -> 33 - 8
    33 - 8 = 25 -> 25

Division is exact: the divisor is drawn from the divisors of the running product it divides,
so every intermediate value is an integer and Python's own `eval` of the prompt expression
agrees with the answer. The answer is the integer value.

Left out: parentheses, exponents, negative operands (all add difficulty we do not need yet).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from jreason.data.tasks.base import ANSWER_INSTRUCTION, Task, check_choices, check_int, parse_int

Op = Literal["+", "-", "*", "/"]
_OPS = ("+", "-", "*", "/")


@dataclasses.dataclass(frozen=True)
class ArithmeticConfig:
    num_operands: int = 4  # >= 2; the trace has num_operands - 1 steps
    max_value: int = 100  # operands are drawn from [1, max_value]
    ops: tuple[Op, ...] = ("+", "-", "*")  # "/" gives exact integer division only
    # False: the prompt is the bare expression plus the answer format. A tiny model has no use
    # for the English rules, and they would be most of its training tokens.
    instructions: bool = True

    def __post_init__(self):
        check_int(self, "num_operands", 2)
        check_int(self, "max_value", 1)
        check_choices(self, "ops", _OPS)


def _apply(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a // b  # exact by construction


def _join(tokens: list) -> str:
    return " ".join(str(t) for t in tokens)


def solve_steps(tokens: list) -> list[str]:
    """Trace lines for `[n0, op0, n1, op1, ...]`, one operation each, respecting precedence."""
    tokens = list(tokens)
    lines = []
    while len(tokens) > 1:
        ops = tokens[1::2]
        # First * or / if any (higher precedence), else the first + or - (left to right).
        k = next((i for i, op in enumerate(ops) if op in "*/"), 0)
        a, op, b = tokens[2 * k : 2 * k + 3]
        r = _apply(a, op, b)
        tokens[2 * k : 2 * k + 3] = [r]
        lines.append(f"{a} {op} {b} = {r} -> {_join(tokens)}")
    return lines


class ArithmeticTask(Task):
    name = "arithmetic"
    Config = ArithmeticConfig

    def sample(self, rng: np.random.Generator) -> tuple[str, str, str]:
        cfg = self.config
        first = int(rng.integers(1, cfg.max_value + 1))
        tokens: list = [first]
        term = first  # value of the current * / run, so "/" can pick an exact divisor
        for _ in range(cfg.num_operands - 1):
            op = cfg.ops[int(rng.integers(len(cfg.ops)))]
            if op == "/":
                divisors = [d for d in range(1, min(term, cfg.max_value) + 1) if term % d == 0]
                # Prefer a real division; dividing by 1 is a wasted step.
                nontrivial = [d for d in divisors if d > 1] or divisors
                b = int(nontrivial[int(rng.integers(len(nontrivial)))])
                term //= b
            else:
                b = int(rng.integers(1, cfg.max_value + 1))
                term = term * b if op == "*" else b
            tokens += [op, b]
        expr = _join(tokens)
        steps = solve_steps(tokens)
        answer = steps[-1].rsplit("-> ", 1)[1]
        prompt = (
            "Evaluate the expression below. Use the usual precedence: * and / before + and -, "
            "otherwise left to right. Every division is exact.\n\n"
            f"{expr}\n\n{ANSWER_INSTRUCTION}"
            if cfg.instructions
            else f"{expr}\n\\boxed{{...}}"
        )
        reasoning = "\n".join([expr, *steps])
        return prompt, reasoning, answer

    def check(self, pred: str, answer: str) -> bool:
        value = parse_int(pred)
        return value is not None and value == int(answer)
