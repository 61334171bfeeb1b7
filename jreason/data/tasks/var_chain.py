"""Variable tracking: follow a chain of assignments `b=a; c=b; a=7` to the value of the last one.

The task that needs serial depth: the answer to "What is d?" is reached only by resolving
d -> c -> b -> a -> 7, one hop after another, and the assignments are shuffled so no position
gives the answer away. Distractor chains (other letters, other values) make "the only number in
the prompt" wrong. With `show_work: false` the reference trace is empty, so a model trained on it
must do every hop inside its forward pass; that is the recurrent-depth demonstration
(model/recurrent.py): more core iterations at test time resolve longer chains.

    Variables: e=4; c=b; b=a; f=e; a=7; d=c. What is d?        answer 7, hops 4

Hops are drawn uniformly from [min_hops, max_hops] per example. `queries: k > 1` asks for the last
variable of k chains at once, each chain with its own hop count (0 = assigned its number
directly), and the answer is one `name=value` pair per asked chain in the asked order ("What is
d, g?" -> `d=7; g=4`): k supervised values per problem instead of one. `ask_all` asks every
variable ("What is each?", answered in alphabetical order), so each problem supervises every hop
count from 0 to its chains' lengths. Variables are single letters
(the first `letters` of the alphabet, 26 at most, across the chain and the distractors); values
are digits. `spaced: true` writes `a = b ; c = 7 .` so a variable is one token wherever it appears.

Left out: branching graphs (ProsQA-style reachability is prosqa.py) and arithmetic on values.
"""

from __future__ import annotations

import dataclasses
import re
import string

import numpy as np

from jreason.data.tasks.base import ANSWER_INSTRUCTION, Task, check_int, parse_int


@dataclasses.dataclass(frozen=True)
class VarChainConfig:
    min_hops: int = 1  # assignments between the asked variable and its number (0: direct)
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
    # chains whose last variable is asked (answer: `name=value` pairs in the asked order); with
    # more than one, every chain, distractors included, draws its own hops
    queries: int = 1
    # ask every variable, chain members and distractors alike, answered in alphabetical order:
    # one supervised lookup per variable (hop counts 0..max_hops in every problem) instead of
    # `queries` -- the dense signal a tiny model needs to learn the lookup at all
    ask_all: bool = False

    @property
    def one_number(self) -> bool:
        """One asked chain, answered with its bare number (not `name=value` pairs)."""
        return self.queries == 1 and not self.ask_all

    def __post_init__(self):
        check_int(self, "min_hops", 0)
        check_int(self, "max_hops", self.min_hops)
        check_int(self, "distractors", 0)
        check_int(self, "letters", 1)
        check_int(self, "queries", 1)
        if self.letters > len(string.ascii_lowercase):
            raise ValueError(f"VarChainConfig: letters must be <= 26, got {self.letters}")
        chains = self.queries + self.distractors
        if chains > 10:
            raise ValueError(
                f"VarChainConfig: queries + distractors = {chains} chains, but every chain needs "
                "its own digit value (at most 10)"
            )
        if (self.max_hops + 1) * chains > self.letters:
            raise ValueError(
                f"VarChainConfig: (max_hops + 1) * (queries + distractors) = "
                f"{(self.max_hops + 1) * chains} variables, more than the "
                f"{self.letters} letters; lower max_hops, queries or distractors"
            )


class VarChainTask(Task):
    name = "var_chain"
    Config = VarChainConfig

    def sample(self, rng: np.random.Generator) -> tuple[str, str, str]:
        cfg = self.config
        n_chains = cfg.queries + cfg.distractors
        if cfg.one_number:  # the distractors are as long, so length tells nothing
            hops = [int(rng.integers(cfg.min_hops, cfg.max_hops + 1))] * n_chains
        else:
            hops = [int(h) for h in rng.integers(cfg.min_hops, cfg.max_hops + 1, size=n_chains)]
        letters = [str(x) for x in rng.permutation(list(string.ascii_lowercase[: cfg.letters]))]
        values = rng.permutation(10)  # distinct values: a distractor's value is always wrong
        chains, statements = [], []
        for c in range(n_chains):
            start = sum(h + 1 for h in hops[:c])
            names = letters[start : start + hops[c] + 1]
            value = int(values[c])
            chain = [f"{names[0]}={value}"] + [
                f"{names[i]}={names[i - 1]}" for i in range(1, hops[c] + 1)
            ]
            chains.append((names, value, chain))
            statements += chain
        order = rng.permutation(len(statements))
        asked = chains[: cfg.queries]
        if cfg.ask_all:  # every variable as the end of its own (sub)chain, alphabetically
            asked = sorted(
                ((names[: i + 1], value, chain[: i + 1]) for names, value, chain in chains
                 for i in range(len(names))),
                key=lambda a: a[0][-1],
            )  # fmt: skip
        if cfg.spaced:
            body = " ; ".join(statements[i].replace("=", " = ") for i in order)
            names = "each" if cfg.ask_all else " , ".join(names[-1] for names, _, _ in asked)
            prompt = f"Variables: {body} . What is {names} ?"
        else:
            body = "; ".join(statements[i] for i in order)
            names = "each" if cfg.ask_all else ", ".join(n[-1] for n, _, _ in asked)
            prompt = f"Variables: {body}. What is {names}?"
        if cfg.instructions:
            prompt += " " + ANSWER_INSTRUCTION
        reasoning = "; ".join(", ".join(reversed(c)) for _, _, c in asked) if cfg.show_work else ""
        if cfg.one_number:
            return prompt, reasoning, str(asked[0][1])
        # one `name=value` per asked chain, in the statements' own syntax: the token before each
        # value names the variable it resolves, so no position has to count which query is next
        pairs = [f"{names[-1]}={value}" for names, value, _ in asked]
        if cfg.spaced:  # spaces at both ends too: `{ d = 7 ; g = 4 .}` keeps `d` and `4` whole
            return prompt, reasoning, " " + " ; ".join(p.replace("=", " = ") for p in pairs) + " ."
        return prompt, reasoning, "; ".join(pairs)

    def check(self, pred: str, answer: str) -> bool:
        if self.config.one_number:
            return parse_int(pred) == int(answer)
        return answer_pairs(pred) == answer_pairs(answer)


def answer_pairs(text: str) -> list[tuple[str, str]]:
    """[(variable, value)] of a `queries > 1` answer, either format ("d = 7 ; g = 4", "d=7; g=4")."""
    return re.findall(r"([a-z]) ?= ?(\d)", text)
