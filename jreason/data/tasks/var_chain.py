"""Variable tracking: follow a chain of assignments `b=a; c=b; a=7` to the value of the last one.

The task that needs serial depth: the answer to "What is d?" is reached only by resolving
d -> c -> b -> a -> 7, one hop after another, and the assignments are shuffled so no position
gives the answer away. Distractor chains (other letters, other values) make "the only number in
the prompt" wrong. With `show_work: false` the reference trace is empty, so a model trained on it
must do every hop inside its forward pass; that is the recurrent-depth demonstration
(model/recurrent.py): more core iterations at test time resolve longer chains.

    Variables: e=4; c=b; b=a; f=e; a=7; d=c. What is d?        answer 7, hops 4

Hops are drawn uniformly from [min_hops, max_hops] per example. Variables are single letters
(the first `letters` of the alphabet, 26 at most, across the chain and the distractors); values
are digits. `spaced: true` writes `a = b ; c = 7 .` so a variable is one token wherever it appears.

Left out: branching graphs (ProsQA-style reachability is prosqa.py) and arithmetic on values.
"""

from __future__ import annotations

import dataclasses
import string

import numpy as np

from jreason.data.tasks.base import ANSWER_INSTRUCTION, Task, check_int, parse_int


@dataclasses.dataclass(frozen=True)
class VarChainConfig:
    min_hops: int = 1  # assignments between the asked variable and its number
    max_hops: int = 6
    distractors: int = 2  # other chains, each as long as the asked one
    show_work: bool = False  # reasoning lists the resolved chain; false = answer directly
    instructions: bool = True  # append the answer-format sentence (tiny models: false)
    # variables are drawn from the first `letters` letters of the alphabet (fewer = each name is
    # seen more often, which a tiny model from scratch learns faster)
    letters: int = 26
    # `a = b ; c = 7` rather than `a=b; c=7`: with whitespace around every symbol a trained BPE
    # gives a variable one token wherever it appears (left side, right side, question), so
    # following a chain is matching equal tokens rather than learning 26 left/right pairs
    spaced: bool = False

    def __post_init__(self):
        check_int(self, "min_hops", 1)
        check_int(self, "max_hops", self.min_hops)
        check_int(self, "distractors", 0)
        check_int(self, "letters", 1)
        if self.letters > len(string.ascii_lowercase):
            raise ValueError(f"VarChainConfig: letters must be <= 26, got {self.letters}")
        if (self.max_hops + 1) * (self.distractors + 1) > self.letters:
            raise ValueError(
                f"VarChainConfig: (max_hops + 1) * (distractors + 1) = "
                f"{(self.max_hops + 1) * (self.distractors + 1)} variables, more than the "
                f"{self.letters} letters; lower max_hops or distractors"
            )


class VarChainTask(Task):
    name = "var_chain"
    Config = VarChainConfig

    def sample(self, rng: np.random.Generator) -> tuple[str, str, str]:
        cfg = self.config
        hops = int(rng.integers(cfg.min_hops, cfg.max_hops + 1))
        letters = rng.permutation(list(string.ascii_lowercase[: cfg.letters]))
        values = rng.permutation(10)  # distinct values: a distractor's value is always wrong
        chains, statements = [], []
        for c in range(cfg.distractors + 1):
            names = [str(x) for x in letters[c * (hops + 1) : (c + 1) * (hops + 1)]]
            value = int(values[c])
            chain = [f"{names[0]}={value}"] + [
                f"{names[i]}={names[i - 1]}" for i in range(1, hops + 1)
            ]
            chains.append((names, value, chain))
            statements += chain
        order = rng.permutation(len(statements))
        names, value, chain = chains[0]
        if cfg.spaced:
            body = " ; ".join(statements[i].replace("=", " = ") for i in order)
            prompt = f"Variables: {body} . What is {names[-1]} ?"
        else:
            prompt = f"Variables: {'; '.join(statements[i] for i in order)}. What is {names[-1]}?"
        if cfg.instructions:
            prompt += " " + ANSWER_INSTRUCTION
        reasoning = ", ".join(reversed(chain)) if cfg.show_work else ""
        return prompt, reasoning, str(value)

    def check(self, pred: str, answer: str) -> bool:
        return parse_int(pred) == int(answer)
