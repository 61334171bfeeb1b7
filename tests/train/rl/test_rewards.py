"""Rewards against hand-computed numbers: verifiers, format, L1, DAPO overlong, combine."""

import pytest

from jreason.data.tasks import get_task
from jreason.train.rl.rewards import REWARDS, combine

RIGHT = "<think>\n12 + 13 = 25\n</think>\n\\boxed{25}"
WRONG = "<think>\n12 + 13 = 26\n</think>\n\\boxed{26}"
EX = {"answer": "25", "task": "arithmetic", "target_len": 100}


def test_correct_uses_the_task_verifier_or_math_equivalence():
    assert REWARDS["correct"](RIGHT, 10, EX) == 1.0
    assert REWARDS["correct"](WRONG, 10, EX) == 0.0
    assert REWARDS["correct"]("<think>\n\\boxed{25}", 10, EX) == 0.0  # never finished thinking
    task = get_task("arithmetic")
    example = next(task.generate(0, 1))
    assert REWARDS["correct"](task.reference_completion(example), 50, {**example.to_dict(),
                              "task": task}) == 1.0  # fmt: skip
    # no task: math_verify equivalence, 0.5 == 1/2
    assert REWARDS["correct"]("</think>\\boxed{0.5}", 5, {"answer": "\\frac{1}{2}"}) == 1.0
    assert REWARDS["correct"]("</think>\\boxed{0.4}", 5, {"answer": "\\frac{1}{2}"}) == 0.0
    with pytest.raises(ValueError, match="'answer'"):
        REWARDS["correct"](RIGHT, 10, {})


@pytest.mark.parametrize(
    "completion,score",
    [
        (RIGHT, 1.0),
        ("12 + 13 = 25\n</think>\nAnswer: 25", 1.0),  # <think> was in the prompt
        ("<think>\nhmm\n</think>\n", 0.0),  # no answer
        ("<think>\nhmm \\boxed{25}", 0.0),  # never closed
        ("hi <think>x</think>\\boxed{1}", 0.0),  # text before <think>
        ("<think>a</think>b</think>\\boxed{1}", 0.0),  # two closes
        ("<think>a<think>b</think>\\boxed{1}", 0.0),  # nested open
        ("\\boxed{1}", 0.0),  # no thinking block
    ],
)
def test_format(completion, score):
    assert REWARDS["format"](completion, 0, {}) == score


def test_format_require_open():
    assert REWARDS["format"]("x</think>\\boxed{1}", 0, {}, require_open=True) == 0.0
    assert REWARDS["format"]("<think>x</think>\\boxed{1}", 0, {}, require_open=True) == 1.0


def test_l1_rewards():
    exact, lmax = REWARDS["l1_exact"], REWARDS["l1_max"]
    # exact, alpha 0.001, target 100, n 150: 1 - 0.001 * 50 = 0.95; wrong: 0 - 0.05
    assert exact(RIGHT, 150, EX, alpha=0.001) == pytest.approx(0.95)
    assert exact(WRONG, 150, EX, alpha=0.001) == pytest.approx(-0.05)
    # n 70: |100 - 70| = 30 -> 1 - 0.03
    assert exact(RIGHT, 70, EX, alpha=0.001) == pytest.approx(0.97)
    # max, alpha 0.01, delta 0.5: n 120: 0.01 * (100 - 120) + 0.5 = 0.3
    assert lmax(RIGHT, 120, EX) == pytest.approx(0.3)
    # n 20: 0.8 + 0.5 = 1.3 -> clipped to 1;  n 160: -0.6 + 0.5 = -0.1 -> clipped to 0
    assert lmax(RIGHT, 20, EX) == pytest.approx(1.0)
    assert lmax(RIGHT, 160, EX) == 0.0
    assert lmax(WRONG, 20, EX) == 0.0  # wrong answers earn nothing however short
    with pytest.raises(ValueError, match="'target_len'"):
        lmax(RIGHT, 20, {"answer": "25", "task": "arithmetic"})


def test_dapo_overlong():
    over = REWARDS["overlong"]
    # L_max 100, L_buf 20: free up to 80 tokens, then (80 - n) / 20, -1 at 100 and beyond
    assert over("", 80, {}, max_len=100, buffer=20) == 0.0
    assert over("", 90, {}, max_len=100, buffer=20) == pytest.approx(-0.5)
    assert over("", 100, {}, max_len=100, buffer=20) == pytest.approx(-1.0)
    assert over("", 130, {}, max_len=100, buffer=20) == pytest.approx(-1.0)


def test_combine():
    reward = combine(
        {"correct": 1.0, "format": 0.2, "overlong": {"weight": 0.5, "max_len": 100, "buffer": 20}}
    )
    # right and well-formed at 90 tokens: 1 + 0.2 * 1 + 0.5 * -0.5 = 0.95
    assert reward(RIGHT, 90, EX) == pytest.approx(0.95)
    # wrong but well-formed at 50 tokens: 0 + 0.2 + 0 = 0.2
    assert reward(WRONG, 50, EX) == pytest.approx(0.2)
    assert reward.parts(RIGHT, 90, EX) == {"correct": 1.0, "format": 1.0, "overlong": -0.5}
    with pytest.raises(ValueError, match=r"allowed rewards: \['correct', 'format'"):
        combine({"corect": 1.0})
    with pytest.raises(ValueError, match="allowed: \\['weight', 'alpha', 'delta'\\]"):
        combine({"l1_max": {"weight": 1.0, "beta": 2}})
    with pytest.raises(ValueError, match="buffer"):
        combine({"overlong": 1.0})  # needs max_len and buffer
