"""ProsQA-style graph reasoning: is concept A a B or a C, given "Every X is a Y." facts?

ProsQA (Hao et al. 2024, the Coconut paper, section 4) asks a multi-hop "is-a" question over a
random DAG of made-up concept names. The answer needs search: the start concept has several
outgoing edges and only one branch reaches the right option, so a left-to-right chain of
thought must pick a branch before it can see where the branch ends. That is where the paper
finds continuous thoughts (model/latent.py) beat a written chain: a latent can keep several
frontier nodes alive at once (a breadth-first search), a token has to commit to one.

One problem, with hops = 3 and branching = 2:

    path        A -> p1 -> p2 -> B            the answer: B is reachable from A
    side        A -> s, p1 -> s', p2 -> s''   dead ends (1 .. side_len nodes) off every path node
    distractor  D -> q1 -> q2 -> C            C is not reachable from A; one edge may cross from
                                              the distractor chain into A's component, never back

The prompt lists every edge as a sentence `Every X is a Y.` in random order, then asks
`Question: Is A a B or a C?` with B and C in random order. The reasoning is the path's edges,
one `Every X is a Y.` line per hop (what Coconut's curriculum replaces one step at a time); the
answer is the name B, checked case-insensitively (`\\boxed{B}`, `Answer: B`, `B.`).

Names come from a fixed pool of 40 ProntoQA-style words ("wumpus", "yumpus", ...), so a
locally trained tokenizer learns each as one token; a problem uses at most
2 * (hops + 1) + hops * (branching - 1) * side_len of them (checked against the pool size).

Left out: ProsQA's "Tom is a ..." individuals and its exact graph sampler (we need a knob-sized,
seeded generator, not the released 17k problems), and any partial credit.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jreason.data.tasks.base import ANSWER_INSTRUCTION, Task, check_int

_NAMES_TEXT = """
wumpus yumpus zumpus dumpus rompus numpus tumpus vumpus impus jompus gorpus shumpus lempus sterpus
grimpus lorpus brimpus rempus yimpus bompus terpus gwompus kerpus scrompus storpus boompus felpus
hilpus quimpus zhorpus fimpus chorpus worpus lumpus timpus yerpus sempus dorpus bempus harpus
"""
NAMES = tuple(_NAMES_TEXT.split())


@dataclasses.dataclass(frozen=True)
class ProsQAConfig:
    min_hops: int = 3  # edges on the path from A to the answer (and on the distractor chain)
    max_hops: int = 5
    branching: int = 2  # out-edges of each path node: 1 onto the path, branching - 1 dead ends
    side_len: int = 2  # a dead-end branch has 1 .. side_len nodes
    cross_edge: bool = True  # one edge from the distractor chain into A's component
    instructions: bool = True  # False: facts and question only (for tiny models)
    # `- X Y` lines instead of `Every X is a Y.`: the next concept is the token right after the
    # current one's earlier occurrence, a plain induction-head lookup. The bullet keeps every name
    # after a space, so a name is one and the same token wherever it appears (a line-initial
    # `X` and a ` X` after a space are different tokens to a BPE without a dummy prefix, and then
    # the lookup is not an induction at all)
    terse: bool = False

    def __post_init__(self):
        check_int(self, "min_hops", 1)
        check_int(self, "max_hops", self.min_hops)
        check_int(self, "branching", 1)
        check_int(self, "side_len", 1)
        needed = 2 * (self.max_hops + 1) + self.max_hops * (self.branching - 1) * self.side_len
        if needed > len(NAMES):
            raise ValueError(
                f"ProsQAConfig: max_hops={self.max_hops}, branching={self.branching} and "
                f"side_len={self.side_len} need up to {needed} concept names; the pool has "
                f"{len(NAMES)}"
            )


def fact(u: str, v: str, terse: bool = False) -> str:
    return f"- {u} {v}" if terse else f"Every {u} is a {v}."


def reachable(edges: list[tuple[str, str]], start: str) -> set[str]:
    """Every concept reachable from `start` (itself included) along the edges."""
    children: dict[str, list[str]] = {}
    for u, v in edges:
        children.setdefault(u, []).append(v)
    seen, stack = {start}, [start]
    while stack:
        for v in children.get(stack.pop(), ()):
            if v not in seen:
                seen.add(v)
                stack.append(v)
    return seen


def parse_facts(prompt: str) -> list[tuple[str, str]]:
    """The (X, Y) edges of every `Every X is a Y.` (or terse `- X Y`) line of a prompt."""
    edges = []
    for line in prompt.splitlines():
        words = line.rstrip(".").split()
        if len(words) == 5 and words[0] == "Every" and words[2:4] == ["is", "a"]:
            edges.append((words[1], words[4]))
        elif len(words) == 3 and words[0] == "-" and all(w in NAMES for w in words[1:]):
            edges.append((words[1], words[2]))
    return edges


class ProsQATask(Task):
    name = "prosqa"
    Config = ProsQAConfig

    def sample(self, rng: np.random.Generator) -> tuple[str, str, str]:
        cfg = self.config
        hops = int(rng.integers(cfg.min_hops, cfg.max_hops + 1))
        names = iter(rng.permutation(NAMES).tolist())
        path = [next(names) for _ in range(hops + 1)]
        chain = [next(names) for _ in range(hops + 1)]
        edges = list(zip(path, path[1:]))
        edges += list(zip(chain, chain[1:]))
        for u in path[:-1]:
            for _ in range(cfg.branching - 1):
                side = [u] + [next(names) for _ in range(int(rng.integers(1, cfg.side_len + 1)))]
                edges += list(zip(side, side[1:]))
        if cfg.cross_edge:
            # distractor -> A's component keeps C unreachable from A (no edge ever leaves it)
            component = sorted(reachable(edges, path[0]) - {path[0]})
            u = chain[int(rng.integers(len(chain) - 1))]
            edges.append((u, component[int(rng.integers(len(component)))]))
        answer, other = path[-1], chain[-1]
        options = [answer, other] if rng.integers(2) else [other, answer]
        facts = [fact(u, v, cfg.terse) for u, v in (edges[i] for i in rng.permutation(len(edges)))]
        question = f"Question: Is {path[0]} a {options[0]} or a {options[1]}?"
        prompt = "\n".join(facts) + "\n" + question
        if cfg.instructions:
            prompt = (
                "Each line below is a fact about made-up concepts; `is a` carries along chains "
                "of facts.\n\n" + prompt + f"\n\n{ANSWER_INSTRUCTION}"
            )
        reasoning = "\n".join(fact(u, v, cfg.terse) for u, v in zip(path, path[1:]))
        return prompt, reasoning, answer

    def check(self, pred: str, answer: str) -> bool:
        return _normalize(pred) == _normalize(answer)


def _normalize(text: str) -> str:
    return text.strip().strip("$").strip().rstrip(".").strip().lower()
