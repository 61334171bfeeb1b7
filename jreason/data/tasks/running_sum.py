"""Long-horizon state tracking: apply a long list of `+k` / `-k` / `*k` operations modulo M.

This is the task for Markovian thinking (Delethink-style chunked reasoning with a carried-over
tail): the worked trace is one short line per step, so its length grows linearly with
`num_steps` (thousands of steps give traces far longer than any chunk), yet the whole state at
any point is on the last line. A line reads

    17: 42+63 -> 5

meaning "step 17 applied +63 to 42, giving 5 (mod M)". From that line alone a reader knows
the next step (18) and the current value (5), so a decoder that keeps only the last line(s) of
the trace plus the prompt loses nothing; `parse_state` reads it back. Line 0 states the start
value. Operations in the prompt are numbered the same way so the model can find step k+1
without counting thousands of items.

The answer is the final value, an integer in [0, M).

Left out: operations that need more state than one number (stacks, registers); those belong
in a separate task if we need them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

import numpy as np

from jreason.data.tasks.base import ANSWER_INSTRUCTION, Task, check_choices, check_int, parse_int

Op = Literal["+", "-", "*"]
_OPS = ("+", "-", "*")
_STATE_LINE = re.compile(r"^\s*(\d+):\s*(?:\d+\s*[-+*]\s*\d+\s*->\s*)?(\d+)\s*$")


@dataclasses.dataclass(frozen=True)
class RunningSumConfig:
    num_steps: int = 32  # trace length in lines (plus the start line); no upper bound
    modulus: int = 100  # values stay in [0, modulus); 100 keeps them to two digits
    max_operand: int = 9  # operands are drawn from [1, max_operand]; one digit = few tokens
    ops: tuple[Op, ...] = ("+", "-")  # add "*" for a harder, non-commutative mix

    def __post_init__(self):
        check_int(self, "num_steps", 1)
        check_int(self, "modulus", 2)
        check_int(self, "max_operand", 1)
        check_choices(self, "ops", _OPS)


def parse_state(trace: str) -> tuple[int, int] | None:
    """(step, value) from the last non-empty line of a trace (or a tail of one), or None."""
    lines = [line for line in trace.splitlines() if line.strip()]
    if not lines:
        return None
    m = _STATE_LINE.match(lines[-1])
    return (int(m.group(1)), int(m.group(2))) if m else None


class RunningSumTask(Task):
    name = "running_sum"
    Config = RunningSumConfig

    def sample(self, rng: np.random.Generator) -> tuple[str, str, str]:
        cfg = self.config
        m = cfg.modulus
        start = value = int(rng.integers(m))
        # Drawn as arrays, not per step: generating 10k-step examples stays fast.
        op_idx = rng.integers(len(cfg.ops), size=cfg.num_steps)
        args = rng.integers(1, cfg.max_operand + 1, size=cfg.num_steps)
        ops_text = []
        trace = [f"0: {value}"]
        for i, (k, a) in enumerate(zip(op_idx.tolist(), args.tolist()), start=1):
            op = cfg.ops[k]
            new = (value + a if op == "+" else value - a if op == "-" else value * a) % m
            ops_text.append(f"{i}: {op}{a}")
            trace.append(f"{i}: {value}{op}{a} -> {new}")
            value = new
        prompt = (
            f"Start with x = {start}. Apply the {cfg.num_steps} operations "
            f"below in order, taking the result modulo {m} after each one (so x stays in "
            f"[0, {m - 1}]). What is x at the end?\n\n" + "\n".join(ops_text) + "\n\n"
            f"Track x with one line per step, like `5: 42+7 -> 49`. {ANSWER_INSTRUCTION}"
        )
        return prompt, "\n".join(trace), str(value)

    def check(self, pred: str, answer: str) -> bool:
        value = parse_int(pred)
        return value is not None and value == int(answer)
