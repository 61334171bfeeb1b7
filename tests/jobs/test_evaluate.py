"""jreason.jobs.evaluate: pass@k / maj@k / summaries against numbers worked out by hand."""

import itertools
import math
import random

import pytest

from jreason.jobs.evaluate import (
    format_table,
    maj_at_k,
    pass_at_k,
    plot_accuracy_vs_thinking,
    summarize,
)

# ---------------------------------------------------------------------------------------------
# pass@k


@pytest.mark.parametrize(
    "n,c,k,expected",
    [
        (5, 2, 1, 0.4),  # c / n
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (5, 2, 3, 0.9),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
        (5, 2, 4, 1.0),  # n - c = 3 < k: every 4-subset holds a correct one
        (5, 0, 3, 0.0),
        (5, 5, 1, 1.0),
        (10, 3, 5, 1 - 21 / 252),  # C(7,5) = 21, C(10,5) = 252
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
    ],
)
def test_pass_at_k_by_hand(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def brute_force_pass_at_k(n, c, k):
    # Samples 0..c-1 are the correct ones; count k-subsets that contain at least one of them.
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize(
    "n,c,k", [(n, c, k) for n in range(1, 8) for c in range(n + 1) for k in range(1, n + 1)]
)
def test_pass_at_k_matches_enumeration(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_large_n_is_stable():
    # C(1000, 500) overflows a float; the product form does not need it.
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5)
    assert pass_at_k(1000, 0, 500) == 0.0
    exact = 1 - math.comb(990, 100) / math.comb(1000, 100)  # exact integers, then one division
    assert pass_at_k(1000, 10, 100) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize(
    "n,c,k,pattern",
    [
        (3, 1, 4, "k=4 is larger than the number of samples n=3"),
        (3, 4, 1, "c=4 correct is more than the n=3"),
        (-1, 0, 1, "n must be a non-negative integer"),
        (3, -1, 1, "c must be a non-negative integer"),
        (3, 1, -1, "k must be a non-negative integer"),
        (3, 1, 0, "k must be at least 1"),
        (3, 1.0, 1, "c must be a non-negative integer"),
    ],
)
def test_pass_at_k_rejects(n, c, k, pattern):
    with pytest.raises(ValueError, match=pattern):
        pass_at_k(n, c, k)


# ---------------------------------------------------------------------------------------------
# maj@k


def test_maj_at_k_cases():
    answers = ["5", "4", "4", "5", "5"]
    correct = [False, True, True, False, False]
    assert maj_at_k(answers, correct, 1) == 0.0  # only "5"
    assert maj_at_k(answers, correct, 2) == 0.0  # 1-1 tie: "5" came first
    assert maj_at_k(answers, correct, 3) == 1.0  # "4" x2
    assert maj_at_k(answers, correct, 4) == 0.0  # 2-2 tie: "5" came first
    assert maj_at_k(answers, correct, 5) == 0.0  # "5" x3


def test_maj_at_k_ignores_missing_answers():
    answers = [None, None, "7", None, "3", "3"]
    correct = [False, False, True, False, False, False]
    assert maj_at_k(answers, correct, 1) == 0.0  # no vote at all
    assert maj_at_k(answers, correct, 2) == 0.0
    assert maj_at_k(answers, correct, 3) == 1.0  # "7" is the only vote; Nones do not outvote it
    assert maj_at_k(answers, correct, 5) == 1.0  # "7" vs "3" tie, "7" first
    assert maj_at_k(answers, correct, 6) == 0.0  # "3" x2
    assert maj_at_k([None, None], [False, False], 2) == 0.0


def test_maj_at_k_rejects():
    with pytest.raises(ValueError, match="2 answers but 1 correct flags"):
        maj_at_k(["a", "b"], [True], 1)
    with pytest.raises(ValueError, match=r"k must be in \[1, 2\], got 3"):
        maj_at_k(["a", "b"], [True, False], 3)
    with pytest.raises(ValueError, match=r"k must be in \[1, 2\], got 0"):
        maj_at_k(["a", "b"], [True, False], 0)


# ---------------------------------------------------------------------------------------------
# summarize


def row(budget, pid, sample, correct, answer, tokens):
    return {
        "id": pid,
        "sample": sample,
        "correct": correct,
        "answer": answer,
        "thinking_tokens": tokens,
        "budget": budget,
    }


def hand_rows():
    rows = [
        # budget 256: two problems, three samples each
        row(256, "p1", 0, True, "4", 100),
        row(256, "p1", 1, False, "5", 200),
        row(256, "p1", 2, False, "5", 300),
        row(256, "p2", 0, False, None, 50),
        row(256, "p2", 1, True, "7", 50),
        row(256, "p2", 2, True, "7", 50),
        {"id": "p3", "sample": 0, "line_no": 3, "error": "line 3: invalid JSON", "budget": 256},
        # unlimited: p1 has two samples, p2 one (e.g. its second failed)
        row(None, "p1", 0, True, "4", 1000),
        row(None, "p1", 1, True, "4", 2000),
        row(None, "p2", 0, False, "8", 600),
        {"id": "p2", "sample": 1, "error": "generation failed", "budget": None},
        {"id": "p3", "sample": 0, "line_no": 3, "error": "line 3: invalid JSON"},  # no budget key
        # budget 64: one problem, one unanswered sample
        row(64, "p1", 0, False, None, 10),
    ]
    random.Random(0).shuffle(rows)  # order must not matter (maj@k sorts by sample)
    return rows


def test_summarize_by_hand():
    got = summarize(hand_rows(), ks=(1, 2, 3, 4))
    assert [s["budget"] for s in got] == [64, 256, None]  # ascending, unlimited last
    b64, b256, unl = got

    assert b64 == {
        "budget": 64,
        "problems": 1,
        "n": 1,
        "n_max": 1,
        "samples": 1,
        "errors": 0,
        "accuracy": 0.0,
        "pass@1": 0.0,
        "maj@1": 0.0,  # no answer -> 0
        "mean_thinking_tokens": 10.0,
    }

    assert {k: b256[k] for k in ("problems", "n", "n_max", "samples", "errors")} == {
        "problems": 2,
        "n": 3,
        "n_max": 3,
        "samples": 6,
        "errors": 1,
    }
    assert b256["accuracy"] == pytest.approx(3 / 6)
    # p1: n=3, c=1; p2: n=3, c=2.
    assert b256["pass@1"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert b256["pass@2"] == pytest.approx(((1 - 1 / 3) + 1.0) / 2)  # p1: 1 - C(2,2)/C(3,2)
    assert b256["pass@3"] == pytest.approx(1.0)
    assert "pass@4" not in b256 and "maj@4" not in b256  # k > n
    # maj@1: p1 "4" right, p2 no answer. maj@2: p1 "4"/"5" tie -> "4" right, p2 "7" right.
    # maj@3: p1 "5" x2 wrong, p2 "7" x2 right.
    assert (b256["maj@1"], b256["maj@2"], b256["maj@3"]) == (0.5, 1.0, 0.5)
    assert b256["mean_thinking_tokens"] == pytest.approx((100 + 200 + 300 + 50 * 3) / 6)  # 125

    # Unlimited: uneven samples, so only k <= min n = 1 is reported; pass@1 per problem
    # uses that problem's own n: p1 2/2, p2 0/1.
    assert {k: unl[k] for k in ("problems", "n", "n_max", "samples", "errors")} == {
        "problems": 2,
        "n": 1,
        "n_max": 2,
        "samples": 3,
        "errors": 2,
    }
    assert unl["accuracy"] == pytest.approx(2 / 3)
    assert unl["pass@1"] == pytest.approx(0.5)
    assert unl["maj@1"] == pytest.approx(0.5)
    assert "pass@2" not in unl
    assert unl["mean_thinking_tokens"] == pytest.approx(1200.0)


def test_summarize_only_errors_and_bad_rows():
    (s,) = summarize([{"id": "a", "sample": 0, "error": "x", "budget": 8}])
    assert s == {
        "budget": 8,
        "problems": 0,
        "n": 0,
        "n_max": 0,
        "samples": 0,
        "errors": 1,
        "accuracy": None,
        "mean_thinking_tokens": None,
    }
    assert summarize([]) == []
    with pytest.raises(ValueError, match="appears twice"):
        summarize([row(1, "a", 0, True, "x", 1), row(1, "a", 0, True, "x", 1)])
    with pytest.raises(ValueError, match="has no 'correct' key"):
        summarize([{"id": "a", "sample": 0, "thinking_tokens": 1}])
    with pytest.raises(ValueError, match="'correct' must be a bool"):
        summarize([row(1, "a", 0, 1, "x", 1)])


def test_format_table():
    table = format_table(summarize(hand_rows(), ks=(1, 2)))
    assert table == (
        "| budget | problems | n | errors | accuracy | pass@1 | pass@2 | maj@1 | maj@2"
        " | mean thinking tokens |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
        "| 64 | 1 | 1 | 0 | 0.000 | 0.000 | - | 0.000 | - | 10.0 |\n"
        "| 256 | 2 | 3 | 1 | 0.500 | 0.500 | 0.833 | 0.500 | 1.000 | 125.0 |\n"
        "| unlimited | 2 | 1-2 | 2 | 0.667 | 0.500 | - | 0.500 | - | 1200.0 |\n"
    )


def test_plot_is_a_png(tmp_path):
    summary = summarize(hand_rows(), ks=(1,))
    path = plot_accuracy_vs_thinking(summary, tmp_path / "plots" / "acc.png")
    assert path == tmp_path / "plots" / "acc.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    # IHDR: width and height as big-endian u32 at bytes 16..24; 6 x 4 in at 100 dpi.
    assert int.from_bytes(data[16:20], "big") == 600
    assert int.from_bytes(data[20:24], "big") == 400


def test_plot_needs_a_graded_budget(tmp_path):
    summary = summarize([{"id": "a", "sample": 0, "error": "x"}])
    with pytest.raises(ValueError, match="no budget has graded samples"):
        plot_accuracy_vs_thinking(summary, tmp_path / "x.png")
