"""ProsQA-style task: answers and reasoning checked by an independent search over the facts
read back from the prompt text; the verifier; knobs that name themselves."""

import re
from collections import deque

import pytest

from jreason.data.tasks import get_task
from jreason.data.tasks.prosqa import parse_facts


def _bfs(edges, start):
    seen, queue = {start}, deque([start])
    while queue:
        u = queue.popleft()
        for a, b in edges:
            if a == u and b not in seen:
                seen.add(b)
                queue.append(b)
    return seen


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        {"min_hops": 1, "max_hops": 2},
        {"max_hops": 4, "branching": 3, "side_len": 3, "cross_edge": False},
    ],
)
def test_answer_is_the_only_reachable_option_and_reasoning_is_a_path(knobs):
    task = get_task("prosqa", **knobs)
    cfg = task.config
    for ex in task.generate(seed=3, n=50):
        facts = re.findall(r"^Every (\w+) is a (\w+)\.$", ex.prompt, re.MULTILINE)
        a, b, c = re.search(r"Question: Is (\w+) a (\w+) or a (\w+)\?", ex.prompt).groups()
        reach = _bfs(facts, a)
        assert ex.answer in (b, c) and b != c
        other = c if ex.answer == b else b
        assert ex.answer in reach and other not in reach
        lines = ex.reasoning.splitlines()
        assert cfg.min_hops <= len(lines) <= cfg.max_hops
        path = [re.fullmatch(r"Every (\w+) is a (\w+)\.", line).groups() for line in lines]
        assert all(edge in facts for edge in path)  # every step is a stated fact
        assert path[0][0] == a and path[-1][1] == ex.answer
        assert all(p[1] == q[0] for p, q in zip(path, path[1:]))  # consecutive
        # the search is not trivial: the start concept has a dead-end branch too
        if cfg.branching > 1:
            assert sum(u == a for u, _ in facts) == cfg.branching
        assert len(set(facts)) == len(facts)
    assert "Think step by step" in ex.prompt  # instructions by default


def test_verifier():
    task = get_task("prosqa", instructions=False)
    ex = next(task.generate(seed=0, n=1))
    assert "Think" not in ex.prompt
    name = ex.answer
    assert task.score(task.reference_completion(ex), ex.answer) == 1.0
    for good in (f"Answer: {name}", f"\\boxed{{{name.upper()}}}", f"Answer: {name}."):
        assert task.score(good, ex.answer) == 1.0
    other = re.search(r"Question: Is \w+ a (\w+) or a (\w+)\?", ex.prompt).groups()
    wrong = other[0] if other[1] == name else other[1]
    for bad in (f"Answer: {wrong}", f"Answer: {name}s", "Answer:", f"<think>{name}", "", "}{"):
        assert task.score(bad, ex.answer) == 0.0


@pytest.mark.parametrize(
    "knobs,key",
    [
        ({"min_hops": 0}, "min_hops"),
        ({"min_hops": 4, "max_hops": 3}, "max_hops"),
        ({"branching": 0}, "branching"),
        ({"max_hops": 9, "branching": 3, "side_len": 3}, "max_hops=9"),
        ({"cross_edge": "no"}, "cross_edge"),
    ],
)
def test_bad_knobs_name_themselves(knobs, key):
    with pytest.raises(ValueError, match=key):
        get_task("prosqa", **knobs)


def test_terse_states_the_same_graph_and_path_as_sentences():
    """`terse`: every fact and step is `- X Y` instead of `Every X is a Y.`; the same seed draws the
    same problem, so reading the terse lines back gives the sentence form's edges, path and
    answer."""
    knobs = {"min_hops": 2, "max_hops": 3, "branching": 2, "instructions": False}
    sentences = get_task("prosqa", **knobs).generate(seed=4, n=30)
    terse = get_task("prosqa", terse=True, **knobs).generate(seed=4, n=30)
    for ex, short in zip(sentences, terse):
        facts = re.findall(r"^Every (\w+) is a (\w+)\.$", ex.prompt, re.MULTILINE)
        assert re.findall(r"^- (\w+) (\w+)$", short.prompt, re.MULTILINE) == facts
        assert "Every" not in short.prompt + short.reasoning
        assert short.prompt.splitlines()[-1] == ex.prompt.splitlines()[-1]  # the question
        steps = [tuple(line.split()[1:]) for line in short.reasoning.splitlines()]
        assert all(line.startswith("- ") for line in short.reasoning.splitlines())
        assert parse_facts(short.prompt) == parse_facts(ex.prompt)
        assert steps == [
            re.fullmatch(r"Every (\w+) is a (\w+)\.", line).groups()
            for line in ex.reasoning.splitlines()
        ]
        assert short.answer == ex.answer
