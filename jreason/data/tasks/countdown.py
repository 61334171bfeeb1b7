"""Countdown: reach a target number from given numbers with + - * / (the TinyZero RL task).

Generation builds the target from the numbers, so every instance is solvable: repeatedly pick
two values from the pool, combine them with a random operation, and put the result back (the
way a person plays). Intermediate values stay positive integers (`-` only when the result is
positive, `/` only when exact), as in the TV game. Any intermediate result inside the target
range can be the target; we play up to 8 random games per draw of numbers and take the result
built from the most numbers. With the defaults ~80% of instances need all four numbers; the
rest use a subset, which the rules ("each number at most once") allow. Intermediate values
of the reference are integers, but the verifier accepts fractional ones (`8 / (3 - 8 / 3)`).

The reasoning is that derivation, one `a op b = c` line per step, ending with a line
`<expression> = <target>`; that expression is what a correct model puts in `\\boxed{}`.

The answer string is JSON, `{"numbers": [3, 7, 25, 50], "target": 82}`, because the verifier
needs both: it parses the model's expression with `ast` (only integer literals, + - * /,
parentheses; `×`, `÷`, `\\times`, `\\cdot`, `\\div` are read as * and /; a trailing `= ...` is
ignored), evaluates it exactly with `Fraction`, checks the literals are a sub-multiset of the
numbers, and compares with the target. Nothing is ever passed to `eval`.

Left out: unary minus, exponentiation, concatenating digits (not in the rules).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import warnings
from collections import Counter
from fractions import Fraction

import numpy as np

from jreason.data.tasks.base import ANSWER_INSTRUCTION, Example, Task, check_int

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
# An expression over at most a handful of numbers is short; the cap keeps ast.parse cheap and
# out of deep recursion on adversarial input like "((((((...".
_MAX_EXPR_CHARS = 200
_MAX_TRIES = 1000
_REDUCTIONS = 8
_LATEX_OPS = (
    ("\\times", "*"),
    ("\\cdot", "*"),
    ("\\div", "/"),
    ("×", "*"),
    ("÷", "/"),
    ("\\left", ""),
    ("\\right", ""),
)


@dataclasses.dataclass(frozen=True)
class CountdownConfig:
    num_numbers: int = 4  # how many numbers are given
    max_number: int = 50  # numbers are drawn from [1, max_number]
    min_target: int = 10  # the target lies in [min_target, max_target]
    max_target: int = 100

    def __post_init__(self):
        check_int(self, "num_numbers", 2, 8)
        check_int(self, "max_number", 2)
        check_int(self, "min_target", 1)
        check_int(self, "max_target", self.min_target)


@dataclasses.dataclass
class _Node:
    value: int
    expr: str  # minimal-parenthesis expression over the numbers used
    prec: int  # precedence of the top operator (3 for a literal)
    steps: list[str]  # derivation lines, in order
    used: int  # how many given numbers it uses


def _combine(a: _Node, op: str, b: _Node) -> _Node:
    p = _PREC[op]
    left = a.expr if a.prec >= p else f"({a.expr})"
    # The right operand of - and / needs parentheses even at equal precedence.
    right = b.expr if b.prec > p or (b.prec == p and op in "+*") else f"({b.expr})"
    value = {"+": a.value + b.value, "-": a.value - b.value, "*": a.value * b.value}.get(op)
    if value is None:
        value = a.value // b.value
    line = f"{a.value} {op} {b.value} = {value}"
    return _Node(value, f"{left} {op} {right}", p, a.steps + b.steps + [line], a.used + b.used)


def _legal_ops(a: int, b: int) -> list[str]:
    ops = ["+", "*"]
    if a > b:
        ops.append("-")
    if b > 1 and a % b == 0:
        ops.append("/")
    return ops


def _reduce(numbers: list[int], cfg: CountdownConfig, rng: np.random.Generator) -> list[_Node]:
    """One random game: combine pool pairs until one value is left; returns in-range results."""
    pool = [_Node(x, str(x), 3, [], 1) for x in numbers]
    found = []
    while len(pool) > 1:
        i, j = (int(k) for k in rng.choice(len(pool), 2, replace=False))
        ops = _legal_ops(pool[i].value, pool[j].value)
        node = _combine(pool[i], ops[int(rng.integers(len(ops)))], pool[j])
        pool = [n for k, n in enumerate(pool) if k not in (i, j)] + [node]
        # Only combined values count: a bare given number would be a trivial "solution".
        if cfg.min_target <= node.value <= cfg.max_target:
            found.append(node)
    return found


class CountdownTask(Task):
    name = "countdown"
    Config = CountdownConfig

    def sample(self, rng: np.random.Generator) -> tuple[str, str, str]:
        cfg = self.config
        for _ in range(_MAX_TRIES):  # rejection loop; a few tries suffice for sensible knobs
            numbers = [int(x) for x in rng.integers(1, cfg.max_number + 1, cfg.num_numbers)]
            candidates = []
            # Several random reductions of the same numbers, so most instances need all of
            # them rather than the first lucky pair.
            for _ in range(_REDUCTIONS):
                candidates += _reduce(numbers, cfg, rng)
                if any(n.used == len(numbers) for n in candidates):
                    break
            if candidates:
                best = max(candidates, key=lambda n: n.used)  # first of the largest: stable
                break
        else:
            raise ValueError(
                f"countdown: no target in [min_target, max_target] = [{cfg.min_target}, "
                f"{cfg.max_target}] after {_MAX_TRIES} tries; widen the range or raise max_number"
            )
        target = best.value
        nums = " ".join(map(str, numbers))
        prompt = (
            f"Using the numbers {nums}, make {target}. You may use +, -, * and / and "
            "parentheses, and each number at most once. Write the expression in the box, "
            f"e.g. \\boxed{{(1 + 2) * 3}}.\n\n{ANSWER_INSTRUCTION}"
        )
        final = f"{best.expr} = {target}"
        # With two numbers the single step already is the final line; do not repeat it.
        steps = best.steps if best.steps[-1] == final else [*best.steps, final]
        reasoning = "\n".join(steps)
        answer = json.dumps({"numbers": numbers, "target": target})
        return prompt, reasoning, answer

    def final_answer(self, example: Example) -> str:
        return example.reasoning.rsplit("\n", 1)[-1].rsplit(" = ", 1)[0]

    def check(self, pred: str, answer: str) -> bool:
        spec = json.loads(answer)
        result = evaluate(pred)
        if result is None:
            return False
        value, used = result
        return value == spec["target"] and not (Counter(used) - Counter(spec["numbers"]))


def evaluate(text: str) -> tuple[Fraction, list[int]] | None:
    """Exact value and integer literals of an arithmetic expression, or None if not allowed.

    Only non-negative integer literals, binary + - * /, and parentheses are accepted; anything
    else (names, calls, attributes, `**`, floats, unary minus) and division by zero give None.
    """
    expr = text.strip().strip("$").split("=", 1)[0]
    for latex, py in _LATEX_OPS:
        expr = expr.replace(latex, py)
    expr = expr.replace("{", "(").replace("}", ")").strip()
    if not expr or len(expr) > _MAX_EXPR_CHARS:
        return None
    try:
        with warnings.catch_warnings():  # model output: "1x" warns (SyntaxWarning) on 3.12+
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    used: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
            a, b = walk(node.left), walk(node.right)
            op = _AST_OPS[type(node.op)]
            if op == "+":
                return a + b
            if op == "-":
                return a - b
            if op == "*":
                return a * b
            return a / b  # ZeroDivisionError is caught below
        if (
            isinstance(node, ast.Constant)
            and type(node.value) is int  # not bool, float or str
            and node.value >= 0
        ):
            used.append(node.value)
            return Fraction(node.value)
        raise ValueError(f"disallowed syntax: {type(node).__name__}")

    try:
        return walk(tree.body), used
    except (ValueError, ZeroDivisionError, RecursionError):
        return None
