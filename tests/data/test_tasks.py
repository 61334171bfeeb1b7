"""Procedural tasks: answers and traces checked against independent recomputation."""

import ast
import json
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jreason.data.tasks import TASKS, Example, get_task
from jreason.data.tasks.countdown import evaluate
from jreason.data.tasks.running_sum import parse_state

# --- registry and knobs ---------------------------------------------------------------------


def test_registry_names():
    assert set(TASKS) >= {"arithmetic", "countdown", "running_sum"}
    for name, cls in TASKS.items():
        assert get_task(name).name == name
        assert isinstance(get_task(name), cls)


def test_unknown_task_names_it_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"'nope'.*arithmetic.*countdown.*running_sum"):
        get_task("nope")


def test_unknown_knob_names_it_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"'bogus'.*num_operands.*max_value.*ops"):
        get_task("arithmetic", bogus=3)


@pytest.mark.parametrize(
    "name,knobs,bad",
    [
        ("arithmetic", {"num_operands": "4"}, "num_operands"),
        ("arithmetic", {"ops": ["+", "^"]}, "ops"),
        ("arithmetic", {"ops": "+-"}, "ops"),
        ("countdown", {"max_number": 2.5}, "max_number"),
        ("running_sum", {"num_steps": True}, "num_steps"),
    ],
)
def test_ill_typed_knob_names_it_and_the_allowed_ones(name, knobs, bad):
    with pytest.raises(ValueError, match=rf"{bad}.*allowed knobs.*\[") as e:
        get_task(name, **knobs)
    for knob in TASKS[name].knobs():
        assert knob in str(e.value)


@pytest.mark.parametrize(
    "name,knobs,bad",
    [
        ("arithmetic", {"num_operands": 1}, "num_operands"),
        ("countdown", {"min_target": 50, "max_target": 10}, "max_target"),
        ("running_sum", {"modulus": 1}, "modulus"),
        ("perm_walk", {"states": 11}, "states"),
        ("perm_walk", {"min_steps": 4, "max_steps": 2}, "max_steps"),
    ],
)
def test_out_of_range_knob_names_it(name, knobs, bad):
    with pytest.raises(ValueError, match=bad):
        get_task(name, **knobs)


def test_list_knobs_from_yaml_become_tuples():
    assert get_task("arithmetic", ops=["+", "*"]).config.ops == ("+", "*")


# --- determinism ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generate_is_deterministic_and_example_i_independent_of_n(name):
    task = get_task(name)
    five = list(task.generate(seed=7, n=5))
    assert five == list(task.generate(seed=7, n=5))
    assert five == list(task.generate(seed=7, n=12))[:5]
    assert five[2:] == list(task.generate(seed=7, n=3, start=2))
    assert five != list(task.generate(seed=8, n=5))
    assert len({ex.id for ex in five}) == 5
    assert set(five[0].to_dict()) == {"id", "prompt", "reasoning", "answer"}
    assert Example(**five[0].to_dict()) == five[0]


# --- scoring shared by all tasks ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TASKS))
def test_reference_scores_one_and_wrong_or_malformed_scores_zero(name):
    task = get_task(name)
    for ex in task.generate(seed=1, n=30):
        ref = task.reference_completion(ex)
        assert ref.startswith("<think>\n") and "</think>" in ref
        assert task.score(ref, ex.answer) == 1.0
        final = task.final_answer(ex)
        assert task.score(f"<think>x</think>\nAnswer: {final}", ex.answer) == 1.0
        assert task.score(f"**Final Answer:** {final}", ex.answer) == 1.0
        # Truncated: the thinking never closed, so the box inside it is not an answer.
        assert task.score(f"<think>\n{ex.reasoning}\n\\boxed{{{final}}}", ex.answer) == 0.0
        # A box inside the thinking does not count; only text after </think> does.
        assert task.score(f"<think>\\boxed{{{final}}}</think> no idea", ex.answer) == 0.0
        assert task.score("", ex.answer) == 0.0
        assert task.score("\\boxed{", ex.answer) == 0.0
        assert task.score("\\boxed{__import__('os')}", ex.answer) == 0.0


def test_integer_tasks_reject_wrong_values():
    for name in ("arithmetic", "running_sum"):
        task = get_task(name)
        for ex in task.generate(seed=2, n=10):
            wrong = int(ex.answer) + 1
            assert task.score(f"\\boxed{{{wrong}}}", ex.answer) == 0.0
            assert task.score(f"\\boxed{{{ex.answer}.5}}", ex.answer) == 0.0
            assert task.score(f"\\boxed{{{ex.answer}}}.", ex.answer) == 1.0


# --- arithmetic -----------------------------------------------------------------------------

_ARITH_EXPR = re.compile(r"^\d+(?: [-+*/] \d+)+$", re.M)


def _prompt_expression(prompt: str) -> str:
    (expr,) = _ARITH_EXPR.findall(prompt)
    return expr


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        {"num_operands": 2, "max_value": 9},
        {"num_operands": 7, "max_value": 50, "ops": ("+", "-", "*", "/")},
        {"num_operands": 5, "max_value": 30, "ops": ("*", "/")},
    ],
)
def test_arithmetic_answer_equals_python_eval_of_prompt(knobs):
    task = get_task("arithmetic", **knobs)
    n_ops = task.config.num_operands
    for ex in task.generate(seed=3, n=50):
        expr = _prompt_expression(ex.prompt)
        value = eval(expr)  # the prompt is digits and operators only (checked by the regex)
        assert value == int(ex.answer)
        lines = ex.reasoning.splitlines()
        assert lines[0] == expr
        assert len(lines) == n_ops  # the expression, then one line per operation
        prev = expr
        for line in lines[1:]:
            m = re.fullmatch(r"(-?\d+) ([-+*/]) (\d+) = (-?\d+) -> (.+)", line)
            assert m, line
            a, op, b, r, rest = m.groups()
            assert Fraction(eval(f"{a} {op} {b}")) == int(r)  # one correct operation...
            assert eval(rest) == eval(prev)  # ...that keeps the expression's value
            assert len(rest.split()) == len(prev.split()) - 2
            prev = rest
        assert prev == ex.answer


def test_arithmetic_respects_precedence_in_trace():
    # Every step before the last multiplication/division must be a * or /.
    task = get_task("arithmetic", num_operands=6)
    for ex in task.generate(seed=4, n=30):
        ops = [line.split()[1] for line in ex.reasoning.splitlines()[1:]]
        muls = [i for i, op in enumerate(ops) if op in "*/"]
        assert muls == list(range(len(muls)))


# --- countdown ------------------------------------------------------------------------------


def _fraction_eval(expr: str) -> tuple[Fraction, list[int]]:
    """Independent of the task's evaluator: substitute Fraction literals, then eval."""
    assert re.fullmatch(r"[\d\s()+\-*/]+", expr), expr
    numbers = [int(x) for x in re.findall(r"\d+", expr)]
    return eval(re.sub(r"(\d+)", r"Fraction(\1)", expr), {"Fraction": Fraction}), numbers


@pytest.mark.parametrize(
    "knobs",
    [{}, {"num_numbers": 3, "max_number": 20}, {"num_numbers": 6, "max_number": 100}],
)
def test_countdown_reasoning_is_a_valid_derivation(knobs):
    task = get_task("countdown", **knobs)
    cfg = task.config
    for ex in task.generate(seed=5, n=60):
        spec = json.loads(ex.answer)
        numbers, target = spec["numbers"], spec["target"]
        assert len(numbers) == cfg.num_numbers
        assert all(1 <= x <= cfg.max_number for x in numbers)
        assert cfg.min_target <= target <= cfg.max_target
        assert f"make {target}" in ex.prompt and " ".join(map(str, numbers)) in ex.prompt
        *steps, last = ex.reasoning.splitlines()
        expr, rhs = last.rsplit(" = ", 1)
        assert int(rhs) == target
        value, used = _fraction_eval(expr)
        assert value == target
        assert not Counter(used) - Counter(numbers)
        assert len(used) >= 2
        for step in steps:  # each step is correct integer arithmetic on positive values
            a, op, b, _, r = step.split()
            assert Fraction(eval(f"Fraction({a}) {op} Fraction({b})")) == int(r) > 0


def _countdown(numbers, target):
    return get_task("countdown"), json.dumps({"numbers": numbers, "target": target})


@pytest.mark.parametrize(
    "expr,score",
    [
        ("8 / (3 - 8 / 3)", 1.0),  # needs exact fractions: 8 / (1/3)
        ("8 \\div (3 - 8 \\div 3)", 1.0),
        ("(8 / (3 - 8 / 3)) = 24", 1.0),
        ("$8/(3-8/3)$", 1.0),
        ("8 * 3", 1.0),  # a subset of the numbers is fine
        ("8 \\times 3", 1.0),
        ("3 * 8 * 1", 0.0),  # 1 is not a given number
        ("8 * 3 * 3 / 3", 0.0),  # 3 used three times, given twice
        ("8 * 3 + 8 - 8", 0.0),  # 8 reused
        ("24", 0.0),
        ("8 / (3 - 3) + 24", 0.0),  # division by zero
        ("8 // 3 * 9", 0.0),
        ("2 ** 3 * 3", 0.0),
        ("-8 * -3", 0.0),
        ("8.0 * 3", 0.0),
        ("__import__('os')", 0.0),
        ("__import__('os').system('echo pwned')", 0.0),
        ("(lambda: 24)()", 0.0),
        ("(8).__class__", 0.0),
        ("[8, 3]", 0.0),
        ("8 * 3; import os", 0.0),
        ("(" * 5000 + "8" + ")" * 5000, 0.0),
        ("8 * 3 +", 0.0),
    ],
)
def test_countdown_verifier(expr, score):
    task, answer = _countdown([8, 3, 8, 3], 24)
    assert task.score(f"<think>...</think>\n\\boxed{{{expr}}}", answer) == score


def test_countdown_evaluate_directly():
    assert evaluate("1 / (2 - 2)") is None
    assert evaluate("__import__('os')") is None
    assert evaluate("(1 + 2) * 3") == (Fraction(9), [1, 2, 3])
    assert evaluate("7 / 2") == (Fraction(7, 2), [7, 2])


# --- running_sum ----------------------------------------------------------------------------


def _recompute(prompt: str) -> tuple[int, list[int]]:
    """The final value and all states, from the prompt text alone."""
    x = int(re.search(r"Start with x = (\d+)\.", prompt).group(1))
    m = int(re.search(r"modulo (\d+)", prompt).group(1))
    states = [x]
    for op, k in re.findall(r"^\d+: ([-+*])(\d+)$", prompt, re.M):
        k = int(k)
        if op == "+":
            x = (x + k) % m
        elif op == "-":
            x = (x - k) % m
        else:
            x = (x * k) % m
        states.append(x)
    return x, states


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        {"num_steps": 1},
        {"num_steps": 50, "ops": ("+", "-", "*"), "modulus": 97},
        {"num_steps": 3000, "modulus": 1000, "max_operand": 99},
    ],
)
def test_running_sum_answer_and_trace_match_independent_loop(knobs):
    task = get_task("running_sum", **knobs)
    n = task.config.num_steps
    for ex in task.generate(seed=6, n=3):
        final, states = _recompute(ex.prompt)
        assert len(states) == n + 1  # every operation was found in the prompt
        assert final == int(ex.answer)
        lines = ex.reasoning.splitlines()
        assert len(lines) == n + 1  # trace length is proportional to num_steps
        assert max(len(line) for line in lines) <= 24  # a few tokens per line
        for i, line in enumerate(lines):
            # The state after step i is on line i, read with an independent regex.
            step, value = re.fullmatch(r"(\d+): (?:\d+[-+*]\d+ -> )?(\d+)", line).groups()
            assert (int(step), int(value)) == (i, states[i])
        assert int(lines[-1].rsplit(" ", 1)[1]) == final


def test_running_sum_state_recoverable_from_any_tail():
    task = get_task("running_sum", num_steps=200)
    ex = next(task.generate(seed=9, n=1))
    _, states = _recompute(ex.prompt)
    lines = ex.reasoning.splitlines()
    for cut in (1, 2, 57, 133, len(lines)):
        # A Markovian chunk that kept only the last two lines of the trace so far.
        tail = "\n".join(lines[max(0, cut - 2) : cut])
        assert parse_state(tail) == (cut - 1, states[cut - 1])
    assert parse_state("") is None
    assert parse_state("garbage") is None


def test_long_traces_are_cheap():
    task = get_task("running_sum", num_steps=20_000)
    ex = next(task.generate(seed=0, n=1))
    assert len(ex.reasoning.splitlines()) == 20_001
    assert task.score(task.reference_completion(ex), ex.answer) == 1.0


def test_ast_module_is_what_countdown_uses():
    # Guard against someone "simplifying" the verifier to eval(): the module must not call it.
    import jreason.data.tasks.countdown as cd

    tree = ast.parse(Path(cd.__file__).read_text())
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and hasattr(n.func, "id")}
    assert "eval" not in calls and "exec" not in calls


_ALPHABET = "0123456789+-*/() .=_'abcdefghijklmnopqrstuvwxyz[]{}\\$:<>\n"


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(alphabet=_ALPHABET, max_size=80))
def test_verifiers_never_raise_on_garbage(text):
    answers = {
        "arithmetic": "12",
        "countdown": json.dumps({"numbers": [1, 2, 3], "target": 6}),
        "running_sum": "5",
    }
    for name, answer in answers.items():
        for completion in (text, f"\\boxed{{{text}}}", f"Answer: {text}"):
            assert get_task(name).score(completion, answer) in (0.0, 1.0)


# --- var_chain ------------------------------------------------------------------------------


def _resolve(prompt: str) -> tuple[int, int]:
    """(value, hops) of the asked variable, by following the assignments one at a time."""
    body, question = prompt.split(". What is ")
    table = dict(s.split("=") for s in body.removeprefix("Variables: ").split("; "))
    name, hops = re.match(r"(\w)\?", question).group(1), 0
    while not table[name].isdigit():
        name, hops = table[name], hops + 1
    return int(table[name]), hops


@pytest.mark.parametrize(
    "knobs",
    [{}, {"min_hops": 3, "max_hops": 3, "distractors": 0}, {"max_hops": 8, "distractors": 1}],
)
def test_var_chain_answer_follows_the_assignments(knobs):
    task = get_task("var_chain", **knobs)
    cfg = task.config
    hops_seen = set()
    for ex in task.generate(seed=3, n=60):
        value, hops = _resolve(ex.prompt)
        assert str(value) == ex.answer
        assert cfg.min_hops <= hops <= cfg.max_hops
        hops_seen.add(hops)
        # every chain has its own value: the distractors' numbers are all different
        numbers = re.findall(r"=(\d)", ex.prompt)
        assert len(numbers) == cfg.distractors + 1 == len(set(numbers))
        assert ex.reasoning == ""  # show_work false: the answer needs the hops done silently
    assert hops_seen == set(range(cfg.min_hops, cfg.max_hops + 1))
    shown = next(get_task("var_chain", show_work=True).generate(seed=0, n=1))
    assert shown.reasoning.endswith(f"={shown.answer}")


@pytest.mark.parametrize("spaced", [False, True])
def test_var_chain_queries_answer_every_asked_chain_in_order(spaced):
    """`queries`: each asked variable resolved on its own by following the statements; chains
    draw their own hop counts (0 = assigned a number directly); the checker wants every pair."""
    task = get_task(
        "var_chain", queries=3, min_hops=0, max_hops=4, distractors=1, letters=26, spaced=spaced
    )
    per_chain_hops = set()
    for ex in task.generate(seed=11, n=60):
        flat = ex.prompt.replace(" = ", "=").replace(" ; ", "; ").replace(" . ", ". ")
        body, question = flat.split(". What is ")
        table = dict(s.split("=") for s in body.removeprefix("Variables: ").split("; "))
        asked = re.findall(r"[a-z]", question.split("?")[0])
        want = []
        for name in asked:
            seen, hops = name, 0
            while not table[seen].isdigit():
                seen, hops = table[seen], hops + 1
            want.append((name, table[seen]))
            per_chain_hops.add(hops)
        numbers = re.findall(r"=(\d)", flat)
        assert len(numbers) == 4 == len(set(numbers))  # 3 asked + 1 distractor, distinct values
        assert re.findall(r"([a-z]) ?= ?(\d)", ex.answer) == want
        assert task.score(f"\\boxed{{{ex.answer}}}", ex.answer) == 1.0
        wrong = ex.answer.replace(want[1][1], str((int(want[1][1]) + 1) % 10))
        assert task.score(f"\\boxed{{{wrong}}}", ex.answer) == 0.0
        short = re.sub(r"[;,]? ?" + want[2][0] + r" ?= ?\d", "", ex.answer)
        assert task.score(f"\\boxed{{{short}}}", ex.answer) == 0.0  # a missing pair fails
    assert per_chain_hops == set(range(5))
    with pytest.raises(ValueError, match="at most 10"):
        get_task("var_chain", queries=8, distractors=3, max_hops=1)


@pytest.mark.parametrize("spaced", [False, True])
def test_var_chain_ask_all_answers_every_variable_alphabetically(spaced):
    """`ask_all`: one pair per variable of every chain (distractors too), in alphabetical order,
    each value found by following the statements; hop counts 0..max_hops all occur."""
    task = get_task(
        "var_chain", ask_all=True, min_hops=0, max_hops=3, distractors=2, letters=12, spaced=spaced
    )
    hops_seen = set()
    for ex in task.generate(seed=5, n=40):
        flat = ex.prompt.replace(" = ", "=").replace(" ; ", "; ").replace(" . ", ". ")
        body, question = flat.split(". What is ")
        assert question.startswith("each")
        table = dict(s.split("=") for s in body.removeprefix("Variables: ").split("; "))
        want = []
        for name in sorted(table):
            seen, hops = name, 0
            while not table[seen].isdigit():
                seen, hops = table[seen], hops + 1
            want.append((name, table[seen]))
            hops_seen.add(hops)
        assert re.findall(r"([a-z]) ?= ?(\d)", ex.answer) == want
        assert task.score(f"\\boxed{{{ex.answer}}}", ex.answer) == 1.0
        last = want[-1]
        wrong = ex.answer.replace(f"{last[0]} = {last[1]}" if spaced else f"{last[0]}={last[1]}",
                                  f"{last[0]} = {(int(last[1]) + 1) % 10}")  # fmt: skip
        assert task.score(f"\\boxed{{{wrong}}}", ex.answer) == 0.0
    assert hops_seen == set(range(4))
    shown = next(get_task("var_chain", ask_all=True, show_work=True).generate(seed=0, n=1))
    steps = shown.reasoning.split("; ")  # one resolution per asked variable, in answer order
    pairs = re.findall(r"([a-z])=(\d)", shown.answer)
    assert [(s[0], s[-1]) for s in steps] == pairs


def test_var_chain_knobs_are_checked():
    with pytest.raises(ValueError, match="max_hops must be >= 3"):
        get_task("var_chain", min_hops=3, max_hops=2)
    with pytest.raises(ValueError, match="more than the 26 letters"):
        get_task("var_chain", max_hops=12, distractors=2)


def test_var_chain_spaced_format_and_letter_pool():
    """`spaced` only adds whitespace (the same problem, resolved the same way); `letters` caps
    the variable names and is checked against the chain sizes."""
    kw = {"max_hops": 3, "distractors": 1, "letters": 8, "instructions": False}
    plain = get_task("var_chain", **kw)
    spaced = get_task("var_chain", **kw, spaced=True)
    for a, b in zip(plain.generate(seed=5, n=40), spaced.generate(seed=5, n=40)):
        assert b.prompt.startswith("Variables: ") and " = " in b.prompt and b.prompt.endswith(" ?")
        unspaced = b.prompt.replace(" = ", "=").replace(" ; ", "; ").replace(" . ", ". ")
        assert unspaced.replace(" ?", "?") == a.prompt and a.answer == b.answer
        assert str(_resolve(a.prompt)[0]) == a.answer
        assert set(re.findall(r"([a-z])=", a.prompt)) <= set("abcdefgh")
    with pytest.raises(ValueError, match="more than the 8 letters"):
        get_task("var_chain", max_hops=4, distractors=1, letters=8)
    with pytest.raises(ValueError, match="letters must be <= 26"):
        get_task("var_chain", letters=27)


# --- perm_walk ------------------------------------------------------------------------------


def test_perm_walk_answer_composes_the_fixed_permutations():
    """The answer is the start state pushed through every move's permutation in order; the
    moves are permutations (none the identity), fixed by table_seed whatever the data seed."""
    task = get_task("perm_walk", states=6, moves=4, min_steps=2, max_steps=7, instructions=False)
    table = task.table
    assert table.shape == (4, 6)
    for row in table:
        assert sorted(row) == list(range(6)) and list(row) != list(range(6))
    assert (get_task("perm_walk", states=6, moves=4).table == table).all()
    assert not (get_task("perm_walk", states=6, moves=4, table_seed=1).table == table).all()
    steps_seen = set()
    for ex in task.generate(seed=2, n=80):
        start, *word = ex.prompt.removeprefix("Walk: ").removesuffix(" .").split()
        # composition as one permutation matrix product, not a step-by-step walk
        perm = np.eye(6, dtype=int)
        for letter in word:
            perm = np.eye(6, dtype=int)[:, table["abcd".index(letter)]] @ perm  # e_i -> e_p(i)
        assert ex.answer == str(int(np.argmax(perm[:, int(start)])))
        steps_seen.add(len(word))
        assert task.score(f"\\boxed{{{ex.answer}}}", ex.answer) == 1.0
        assert task.score(f"\\boxed{{{(int(ex.answer) + 1) % 6}}}", ex.answer) == 0.0
    assert steps_seen == set(range(2, 8))
    shown = next(get_task("perm_walk", show_work=True).generate(seed=0, n=1))
    assert shown.reasoning.split()[-1] == shown.answer


def test_perm_walk_default_moves_generate_s5():
    """The demo's moves (3 permutations of 5 states, table_seed 0) generate the whole symmetric
    group S5 (non-solvable: the word problem the recurrent-depth demo relies on), counted by
    closing the identity under the moves."""
    table = get_task("perm_walk").table
    group, frontier = {tuple(range(5))}, [tuple(range(5))]
    while frontier:
        reached = {tuple(int(m[i]) for i in g) for g in frontier for m in table}
        frontier = list(reached - group)
        group |= reached
    assert len(group) == 120
