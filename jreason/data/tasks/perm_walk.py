"""Permutation walk: where does a token end up after a word of fixed moves? (state tracking)

A small set of `moves` (a, b, c, ...) are fixed permutations of the `states` digits, drawn once
from `table_seed` and the same for every problem, so a model learns them as it learns facts.
A problem is a start state and a word of moves; the answer is the state the walk ends on:

    Walk: 3 b a c c a .      answer 1    (3 -b-> 0 -a-> 4 -c-> 2 -c-> 1 -a-> 1)

Why this task for recurrent depth (model/recurrent.py): the answer is the composition of k
permutations, the group word problem. Permutations lose no information, so every move counts
(random maps would funnel every walk into a few states and make the last moves enough), and for
a non-solvable group such as the one random permutations of 5 or more states generate, no
fixed-depth shortcut is known (Merrill & Sabharwal, "The Illusion of State in State-Space
Models", 2024; Liu et al., "Transformers Learn Shortcuts to Automata", 2023). The natural
solution is serial: each move's position applies its permutation to the state at the position
before it, one move per layer, so a walk of k moves needs about k layers and more core
iterations at test time finish longer walks. Unlike `var_chain` (the lookup itself has to be
learned in context), each step here is a table of `states * moves` entries a tiny model learns
within a few hundred steps.

Steps are drawn uniformly from [min_steps, max_steps]. `show_work` writes the visited states
(`3 b 0 a 4 ...`). Left out: moves given in the prompt (that is var_chain's in-context lookup)
and non-permutation maps.
"""

from __future__ import annotations

import dataclasses
import functools
import string

import numpy as np

from jreason.data.tasks.base import ANSWER_INSTRUCTION, Task, check_int, parse_int


@dataclasses.dataclass(frozen=True)
class PermWalkConfig:
    states: int = 5  # the digits 0 .. states-1
    moves: int = 3  # fixed permutations named by the first `moves` letters
    min_steps: int = 1  # moves per problem, uniform in [min_steps, max_steps]
    max_steps: int = 8
    table_seed: int = 0  # which permutations the moves are (fixed across problems and seeds)
    show_work: bool = False  # reasoning lists the visited states; false = answer directly
    instructions: bool = True  # append the answer-format sentence (tiny models: false)

    def __post_init__(self):
        check_int(self, "states", 2, 10)
        check_int(self, "moves", 1, 26)
        check_int(self, "min_steps", 1)
        check_int(self, "max_steps", self.min_steps)
        check_int(self, "table_seed", 0)


@functools.cache
def move_table(states: int, moves: int, table_seed: int) -> np.ndarray:
    """(moves, states) int: row m is move m's permutation; none is the identity."""
    rng = np.random.default_rng([table_seed, states, moves])
    table = np.empty((moves, states), dtype=np.int64)
    for m in range(moves):
        perm = rng.permutation(states)
        while (perm == np.arange(states)).all():  # the identity would be a no-op move
            perm = rng.permutation(states)
        table[m] = perm
    table.setflags(write=False)
    return table


class PermWalkTask(Task):
    name = "perm_walk"
    Config = PermWalkConfig

    @property
    def table(self) -> np.ndarray:
        cfg = self.config
        return move_table(cfg.states, cfg.moves, cfg.table_seed)

    def walk(self, start: int, word: str) -> list[int]:
        """The states visited from `start` along `word` (move letters), start included."""
        visited = [start]
        for letter in word:
            visited.append(int(self.table[string.ascii_lowercase.index(letter), visited[-1]]))
        return visited

    def sample(self, rng: np.random.Generator) -> tuple[str, str, str]:
        cfg = self.config
        k = int(rng.integers(cfg.min_steps, cfg.max_steps + 1))
        start = int(rng.integers(cfg.states))
        word = "".join(string.ascii_lowercase[m] for m in rng.integers(cfg.moves, size=k))
        visited = self.walk(start, word)
        prompt = f"Walk: {start} {' '.join(word)} ."
        if cfg.instructions:
            prompt += " " + ANSWER_INSTRUCTION
        reasoning = ""
        if cfg.show_work:
            reasoning = " ".join([str(start)] + [f"{m} {s}" for m, s in zip(word, visited[1:])])
        return prompt, reasoning, str(visited[-1])

    def check(self, pred: str, answer: str) -> bool:
        return parse_int(pred) == int(answer)


def parse_walk(prompt: str) -> tuple[int, str]:
    """(start, word) of a perm_walk prompt."""
    body = prompt.split("Walk:", 1)[1].split(".", 1)[0].split()
    return int(body[0]), "".join(body[1:])
