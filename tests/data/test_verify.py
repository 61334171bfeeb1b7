"""Answer extraction, math equivalence (math_verify) and the JSONL / Parquet record loader."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jreason.data.verify import (
    RecordError,
    extract_answer,
    extract_boxed,
    load_math_records,
    math_equal,
    score_math,
)

# --- extract_boxed --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\frac{\\sqrt{2}}{2}} end", "\\frac{\\sqrt{2}}{2}"),
        ("first \\boxed{1}, then \\boxed{2}", "2"),  # the last one wins
        ("\\boxed{\\boxed{7}}", "7"),  # nested boxes: the innermost, which is the last
        ("\\fbox{3}", "3"),
        ("\\boxed{1} and \\fbox{9}", "9"),
        ("$\\boxed 5$", "5"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not close the box
        ("\\boxed{ x^{2} }", "x^{2}"),
        ("no box here", None),
        ("\\boxed{unterminated", None),
        ("\\boxed{}", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


# --- extract_answer -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("<think>maybe \\boxed{1}</think> so \\boxed{2}", "2"),
        ("<think>\\boxed{1}</think> I give up", None),  # boxes inside thinking don't count
        ("<think>still thinking \\boxed{1}", None),  # unclosed think: truncated
        ("no think tags \\boxed{3}", "3"),
        ("work\nAnswer: 17", "17"),
        ("work\nAnswer: $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("**Final Answer:** 12", "12"),
        ("Answer: 1\nmore work\nanswer: 2", "2"),
        ("Answer: 1\n\\boxed{5}", "5"),  # boxed first
        ("the total is 1,234 apples", None),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_extract_answer_number_fallback():
    assert extract_answer("the total is 1,234 apples", number_fallback=True) == "1234"
    assert extract_answer("went from 3 to -2.5", number_fallback=True) == "-2.5"
    assert extract_answer("<think>7</think> none", number_fallback=True) is None
    assert extract_answer("<think>7", number_fallback=True) is None


# --- math_equal -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pred,gold",
    [
        ("\\frac{1}{2}", "0.5"),
        ("0.5", "\\frac{1}{2}"),
        ("\\dfrac12", "1/2"),
        ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),
        ("5 \\text{ cm}", "5"),
        ("5", "5\\text{ cm}"),
        ("[1, 2)", "[1,2)"),  # intervals
        ("(-\\infty, 3]", "(-\\infty,3]"),
        ("\\{2, 1\\}", "\\{1,2\\}"),  # sets are unordered
        ("x = 3", "3"),
        ("1{,}000", "1000"),
        ("(x+1)^2", "x^2+2x+1"),
        ("\\boxed{42}", "42"),
        ("Paris", "Paris"),  # non-math text falls back to string equality
    ],
)
def test_math_equal_true(pred, gold):
    assert math_equal(pred, gold)


@pytest.mark.parametrize(
    "pred,gold",
    [
        ("3", "4"),
        ("\\frac{1}{3}", "0.5"),
        ("(1, 2]", "[1,2)"),  # same endpoints, different interval
        ("\\sqrt{3}/2", "\\frac{\\sqrt{2}}{2}"),
        ("", "1"),
        (None, "1"),
        ("1", None),
        ("Paris", "London"),
        ("1" * 2000, "1" * 2000 + "1"),  # too long to be an answer
    ],
)
def test_math_equal_false(pred, gold):
    assert not math_equal(pred, gold)


def test_huge_powers_are_rejected_fast():
    # Without the guard math_verify spends its whole 5 s timeout here (and would hang forever in
    # a worker thread, where there is no timeout).
    math_equal("1", "2")  # warm up: the first call imports SymPy
    t0 = time.perf_counter()
    assert not math_equal("10^{10^{10}}", "1")
    assert not math_equal("9999999999^{9999999999}", "1")
    assert math_equal("2^{10}", "1024")
    assert time.perf_counter() - t0 < 2.0


def test_math_equal_works_in_worker_threads():
    # math_verify's signal-based timeout raises ValueError off the main thread; we must not.
    cases = [("\\frac{1}{2}", "0.5", True), ("3", "4", False), ("10^{10^{10}}", "1", False)]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda c: math_equal(c[0], c[1]), cases))
    assert results == [c[2] for c in cases]


def test_score_math():
    assert score_math("<think>hmm</think>The answer is \\boxed{\\frac{2}{4}}.", "0.5") == 1.0
    assert score_math("<think>hmm</think>\nAnswer: 0.5", "\\frac12") == 1.0
    assert score_math("<think>hmm</think>\\boxed{0.6}", "0.5") == 0.0
    assert score_math("<think>\\boxed{0.5}", "0.5") == 0.0  # truncated
    assert score_math("I think it is 18 in total", "18") == 0.0
    assert score_math("I think it is 18 in total", "18", number_fallback=True) == 1.0


# --- load_math_records ----------------------------------------------------------------------


def _write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_load_jsonl_fields_and_answer_sources(tmp_path):
    path = _write_jsonl(
        tmp_path / "mix.jsonl",
        [
            {"problem": "1+1?", "answer": "2", "unique_id": "a/1"},
            {"question": "Half?", "solution": "It is \\boxed{\\frac{1}{2}}."},
            "",  # blank lines are skipped
            {"question": "Apples?", "answer": "3 + 4 = 7 apples.\n#### 7"},  # GSM8K style
            {"problem": "Int?", "answer": 5},
            {"problem": "Boxed?", "answer": "\\boxed{9}", "solution": "sol"},
        ],
    )
    recs = load_math_records(path)
    assert [r.answer for r in recs] == ["2", "\\frac{1}{2}", "7", "5", "9"]
    assert [r.prompt for r in recs] == ["1+1?", "Half?", "Apples?", "Int?", "Boxed?"]
    assert recs[0].id == "a/1" and recs[1].id == "mix-2"
    assert recs[1].reasoning == "It is \\boxed{\\frac{1}{2}}."
    assert recs[2].reasoning == "3 + 4 = 7 apples."
    assert recs[4].reasoning == "sol"


def test_load_jsonl_custom_fields(tmp_path):
    path = _write_jsonl(tmp_path / "c.jsonl", [{"q": "x?", "final": "3", "problem": "ignored"}])
    (rec,) = load_math_records(path, prompt_fields=("q",), answer_fields=("final",))
    assert (rec.prompt, rec.answer) == ("x?", "3")


@pytest.mark.parametrize(
    "bad,message",
    [
        ('{"problem": "x", "answer": ', "invalid JSON"),
        ('["not", "an", "object"]', "JSON object"),
        ('{"answer": "1"}', "prompt"),
        ('{"problem": "x"}', "answer"),
        ('{"problem": "x", "solution": "no box"}', "boxed"),
        ('{"problem": "x", "answer": [1]}', "'answer'"),
    ],
)
def test_load_jsonl_malformed_line_names_file_and_line(tmp_path, bad, message):
    path = _write_jsonl(
        tmp_path / "bad.jsonl",
        [{"problem": "a", "answer": "1"}, "", bad, {"problem": "b", "answer": "2"}],
    )
    with pytest.raises(RecordError, match=message) as e:
        load_math_records(path)
    assert f"{path}:3:" in str(e.value)


def test_load_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    table = pa.Table.from_pylist(
        [
            {"problem": "p0", "answer": "1", "solution": None},
            {"problem": "p1", "answer": None, "solution": "so \\boxed{x^2}"},
        ]
    )
    pq.write_table(table, path)
    recs = load_math_records(path)
    assert [(r.id, r.prompt, r.answer) for r in recs] == [("d-0", "p0", "1"), ("d-1", "p1", "x^2")]


def test_load_parquet_malformed_row_names_file_and_row(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"problem": "p0", "answer": "1"}, {"problem": "p1", "answer": None}]),
        path,
    )
    with pytest.raises(RecordError, match=r"bad\.parquet: row 1: no answer"):
        load_math_records(path)


def test_load_unsupported_suffix(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("problem,answer\n")
    with pytest.raises(ValueError, match=r"\.csv.*\.jsonl"):
        load_math_records(path)
