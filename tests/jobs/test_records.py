"""jreason.jobs.records: every kind of bad input line, n-sample expansion, and resume after a kill."""

import json
import re

import pytest

from jreason.jobs.records import InputError, PromptRecord, ResultWriter, read_requests


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# read_requests


def test_valid_lines(tmp_path):
    p = write_lines(
        tmp_path / "in.jsonl",
        [
            json.dumps({"id": "a", "prompt": "2+2?", "answer": "4", "source": "gsm8k"}),
            "",  # blank lines are skipped but still counted
            "   ",
            json.dumps({"messages": [{"role": "user", "content": "hi"}], "answer": 7}),
            json.dumps({"id": 12, "prompt": "", "meta": {"k": [1, 2]}}),
        ],
    )
    recs = list(read_requests(p))
    assert recs == [
        PromptRecord("a", 0, 1, "2+2?", None, "4", {"source": "gsm8k"}),
        PromptRecord("line-4", 0, 4, None, [{"role": "user", "content": "hi"}], "7", {}),
        PromptRecord("12", 0, 5, "", None, None, {"meta": {"k": [1, 2]}}),
    ]
    assert [r.key for r in recs] == [("a", 0), ("line-4", 0), ("12", 0)]


def test_n_samples_expand_each_line_with_independent_copies(tmp_path):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}]
    p = write_lines(
        tmp_path / "in.jsonl",
        [json.dumps({"id": "x", "messages": msgs, "tag": [1]}), "not json", '{"prompt": "p"}'],
    )
    recs = list(read_requests(p, n=3))
    assert [(r.key, r.line_no, type(r).__name__) for r in recs] == [
        (("x", 0), 1, "PromptRecord"),
        (("x", 1), 1, "PromptRecord"),
        (("x", 2), 1, "PromptRecord"),
        (("line-2", 0), 2, "InputError"),
        (("line-2", 1), 2, "InputError"),
        (("line-2", 2), 2, "InputError"),
        (("line-3", 0), 3, "PromptRecord"),
        (("line-3", 1), 3, "PromptRecord"),
        (("line-3", 2), 3, "PromptRecord"),
    ]
    assert all(r.messages == msgs for r in recs[:3])
    recs[1].messages.append({"role": "assistant", "content": "a"})
    recs[1].extra["tag"].append(2)
    assert recs[0].messages == msgs and recs[2].messages == msgs
    assert recs[0].extra == {"tag": [1]} and recs[2].extra == {"tag": [1]}


@pytest.mark.parametrize("n", [0, -1, 1.0, True])
def test_bad_n(tmp_path, n):
    p = write_lines(tmp_path / "in.jsonl", ['{"prompt": "p"}'])
    with pytest.raises(ValueError, match="n must be a positive integer"):
        list(read_requests(p, n=n))


# (line, expected error id, regex the message must match). Every case sits on line 2 after one
# good line "first", so the line number in the message is checked too.
BAD_LINES = [
    ("{not json", "line-2", r"^line 2: invalid JSON"),
    ('{"prompt": "p"', "line-2", r"^line 2: invalid JSON"),
    ('["prompt", "p"]', "line-2", r"^line 2: expected a JSON object, got list"),
    ('"just a string"', "line-2", r"^line 2: expected a JSON object, got str"),
    ('{"prompt": "a", "prompt": "b"}', "line-2", r"^line 2: duplicate key 'prompt'"),
    ('{"id": "q"}', "q", r"^line 2: needs a 'prompt' \(string\) or 'messages'"),
    (
        '{"id": "q", "prompt": "p", "messages": [{"role": "user", "content": "c"}]}',
        "q",
        r"^line 2: fields 'prompt' and 'messages' are both present",
    ),
    ('{"prompt": 5}', "line-2", r"^line 2: field 'prompt' must be a string, got int"),
    ('{"prompt": null}', "line-2", r"^line 2: field 'prompt' must be a string, got null"),
    ('{"messages": []}', "line-2", r"^line 2: field 'messages' must be a non-empty list, got an"),
    (
        '{"messages": "hi"}',
        "line-2",
        r"^line 2: field 'messages' must be a non-empty list, got str",
    ),
    (
        '{"messages": ["hi"]}',
        "line-2",
        r"^line 2: field 'messages\[0\]' must be an object, got str",
    ),
    (
        '{"messages": [{"role": "user", "content": "a"}, {"content": "b"}]}',
        "line-2",
        r"^line 2: field 'messages\[1\]\.role' must be a string, missing",
    ),
    (
        '{"messages": [{"role": "user", "content": ["a"]}]}',
        "line-2",
        r"^line 2: field 'messages\[0\]\.content' must be a string, got list",
    ),
    ('{"prompt": "p", "answer": [4]}', "line-2", r"^line 2: field 'answer' must be a string or"),
    ('{"prompt": "p", "answer": true}', "line-2", r"^line 2: field 'answer' must be a string or"),
    ('{"id": 1.5, "prompt": "p"}', "line-2", r"^line 2: field 'id' must be a string or integer"),
    ('{"id": true, "prompt": "p"}', "line-2", r"^line 2: field 'id' must be a string or integer"),
    ('{"id": "", "prompt": "p"}', "line-2", r"^line 2: field 'id' is an empty string"),
    ('{"id": "first", "prompt": "p"}', "line-2", r"^line 2: field 'id' 'first' duplicates .* 1$"),
]


@pytest.mark.parametrize("line,rid,pattern", BAD_LINES, ids=[b[2] for b in BAD_LINES])
def test_each_error_kind_names_line_and_field(tmp_path, line, rid, pattern):
    first = '{"id": "first", "prompt": "ok"}'
    p = write_lines(tmp_path / "in.jsonl", [first, line, '{"id": "after", "prompt": "ok"}'])
    recs = list(read_requests(p, n=2))
    assert [type(r) for r in recs] == [PromptRecord] * 2 + [InputError] * 2 + [PromptRecord] * 2
    errs = recs[2:4]
    assert [e.key for e in errs] == [(rid, 0), (rid, 1)]
    assert all(e.line_no == 2 for e in errs)
    assert errs[0].message == errs[1].message
    assert re.search(pattern, errs[0].message), errs[0].message


def test_invalid_utf8_is_an_error_not_a_crash(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff"}\n{"prompt": "ok2"}\n')
    recs = list(read_requests(p))
    assert [type(r) for r in recs] == [PromptRecord, InputError, PromptRecord]
    assert recs[1].message.startswith("line 2: not valid UTF-8")


def test_bom_and_crlf_and_unicode_line_separators(tmp_path):
    p = tmp_path / "in.jsonl"
    # U+2028 inside a string must not split the line (str.splitlines would).
    body = '{"id": "a", "prompt": "x\u2028y"}\r\n{"prompt": "z\u0085"}\r\n'
    p.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    recs = list(read_requests(p))
    assert [(r.id, r.prompt) for r in recs] == [("a", "x\u2028y"), ("line-2", "z\u0085")]


def test_duplicate_ids_keep_every_yielded_key_unique(tmp_path):
    p = write_lines(
        tmp_path / "in.jsonl",
        [
            '{"id": "line-3", "prompt": "explicit id that looks like a default one"}',
            '{"id": "a", "prompt": "p"}',
            '{"prompt": "no id: default line-3 is taken"}',
            '{"id": "a", "prompt": "dup"}',
            '{"id": "line-4", "prompt": "now taken by the error row of line 4"}',
        ],
    )
    recs = list(read_requests(p))
    assert [(type(r).__name__, r.id) for r in recs] == [
        ("PromptRecord", "line-3"),
        ("PromptRecord", "a"),
        ("InputError", "line-3.2"),
        ("InputError", "line-4"),
        ("InputError", "line-5"),
    ]
    assert "default id 'line-3' duplicates the id of line 1" in recs[2].message
    assert recs[3].message == "line 4: field 'id' 'a' duplicates the id of line 2"
    assert recs[4].message == "line 5: field 'id' 'line-4' duplicates the id of line 4"
    assert len({r.key for r in recs}) == len(recs)


def test_integer_and_string_ids_collide(tmp_path):
    p = write_lines(
        tmp_path / "in.jsonl", ['{"id": "7", "prompt": "a"}', '{"id": 7, "prompt": "b"}']
    )
    recs = list(read_requests(p))
    assert recs[1].message == "line 2: field 'id' '7' duplicates the id of line 1"


def test_same_file_same_keys(tmp_path):
    p = write_lines(tmp_path / "in.jsonl", ['{"prompt": "a"}', "bad", '{"id": 1, "prompt": "b"}'])
    assert [r.key for r in read_requests(p, n=2)] == [r.key for r in read_requests(p, n=2)]


# ---------------------------------------------------------------------------------------------
# ResultWriter


def read_rows(path):
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.split("\n")[:-1]]


def test_write_appends_lines_and_refuses_done_keys(tmp_path):
    out = tmp_path / "sub" / "out.jsonl"
    with ResultWriter(out) as w:
        assert w.done == set()
        w.write({"id": "a", "sample": 0, "text": "héllo\u2028"})
        w.write({"id": "a", "sample": 1, "text": "x"})
        w.write({"id": "b", "sample": 0, "line_no": 3, "error": "line 3: invalid JSON"})
        assert w.done == {("a", 0), ("a", 1), ("b", 0)}
        with pytest.raises(ValueError, match=r"key \(id='a', sample=1\) is already in"):
            w.write({"id": "a", "sample": 1, "text": "again"})
        with pytest.raises(ValueError, match="needs key 'sample'"):
            w.write({"id": "c"})
        with pytest.raises(ValueError, match="needs key 'id'"):
            w.write({"sample": 0})
        with pytest.raises(ValueError, match="key 'id' must be a string"):
            w.write({"id": 3, "sample": 0})
        with pytest.raises(TypeError):  # not JSON-serialisable: nothing written, not done
            w.write({"id": "c", "sample": 0, "x": object()})
        assert ("c", 0) not in w.done
    raw = out.read_bytes()
    assert "héllo\u2028".encode() in raw  # ensure_ascii=False: text stays readable
    assert [(r["id"], r["sample"]) for r in read_rows(out)] == [("a", 0), ("a", 1), ("b", 0)]
    with pytest.raises(RuntimeError, match="not open"):
        w.write({"id": "z", "sample": 0})


def test_resume_after_kill_drops_partial_line(tmp_path):
    out = tmp_path / "out.jsonl"
    with ResultWriter(out) as w:
        for s in range(3):
            w.write({"id": "p", "sample": s, "text": f"t{s}"})
    complete = out.read_bytes()
    with out.open("ab") as f:  # the job was killed halfway through writing sample 3
        f.write(b'{"id": "p", "sample": 3, "te')

    with ResultWriter(out) as w:
        assert out.read_bytes() == complete  # partial line gone at open
        assert w.done == {("p", 0), ("p", 1), ("p", 2)}
        with pytest.raises(ValueError, match="already in"):
            w.write({"id": "p", "sample": 2})
        w.write({"id": "p", "sample": 3, "text": "t3"})
    rows = read_rows(out)
    assert [r["sample"] for r in rows] == [0, 1, 2, 3]
    assert rows[3]["text"] == "t3"


def test_complete_json_without_newline_is_still_partial(tmp_path):
    # One write() carries the line and its newline; no newline means the write was torn.
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": "a", "sample": 0}\n{"id": "a", "sample": 1}')
    with ResultWriter(out) as w:
        assert w.done == {("a", 0)}
    assert out.read_bytes() == b'{"id": "a", "sample": 0}\n'


def test_garbage_last_line_with_newline_is_truncated(tmp_path):
    # E.g. a crash that extended the file with unwritten (zero-filled) blocks.
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": "a", "sample": 0}\n\x00\x00\x00\x00\n')
    with ResultWriter(out) as w:
        assert w.done == {("a", 0)}
    assert out.read_bytes() == b'{"id": "a", "sample": 0}\n'
    out.write_bytes(b"\x00\x00")  # only garbage: everything goes
    with ResultWriter(out) as w:
        assert w.done == set()
    assert out.read_bytes() == b""


def test_corrupt_middle_line_raises_and_keeps_the_file(tmp_path):
    out = tmp_path / "out.jsonl"
    content = b'{"id": "a", "sample": 0}\n{"id": "a", "sam\n{"id": "b", "sample": 0}\n'
    out.write_bytes(content)
    with pytest.raises(ValueError, match=r"out\.jsonl line 2: not valid JSON.*by hand"):
        ResultWriter(out).open()
    assert out.read_bytes() == content  # never deleted silently
    # A torn line before a partial tail is not one torn write either.
    content = b'{"id": "a", "sample": 0}\n{"id": "a", "sam\n{"id": "b"'
    out.write_bytes(content)
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        ResultWriter(out).open()
    assert out.read_bytes() == content


@pytest.mark.parametrize(
    "line,pattern",
    [
        (b'{"id": "b"}', r"line 2: a result row needs key 'sample'"),
        (b'{"id": "b", "sample": "0"}', r"line 2: key 'sample' must be a non-negative integer"),
        (b"[1, 2]", r"line 2: a result row must be a JSON object"),
        (b'{"id": "a", "sample": 0}', r"line 2: key \(id='a', sample=0\) was already .* line 1"),
    ],
)
def test_valid_json_bad_row_raises_even_when_last(tmp_path, line, pattern):
    # Valid JSON cannot come from a torn write, so even as the last line it is not dropped.
    out = tmp_path / "out.jsonl"
    content = b'{"id": "a", "sample": 0}\n' + line + b"\n"
    out.write_bytes(content)
    with pytest.raises(ValueError, match=pattern):
        ResultWriter(out).open()
    assert out.read_bytes() == content


def test_blank_lines_in_output_are_tolerated(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": "a", "sample": 0}\n\n{"id": "a", "sample": 1}\n')
    with ResultWriter(out) as w:
        assert w.done == {("a", 0), ("a", 1)}


def test_second_writer_on_same_file_is_refused(tmp_path):
    out = tmp_path / "out.jsonl"
    with ResultWriter(out) as w:
        w.write({"id": "a", "sample": 0})
        with pytest.raises(RuntimeError, match="locked by another running job"):
            ResultWriter(out).open()
    with ResultWriter(out) as w:  # released on close
        assert w.done == {("a", 0)}


def test_end_to_end_resume_writes_each_key_once(tmp_path):
    inp = write_lines(
        tmp_path / "in.jsonl",
        ['{"id": "a", "prompt": "1"}', "oops", '{"id": "b", "messages": [1]}', '{"prompt": "2"}'],
    )
    out = tmp_path / "out.jsonl"

    def run(stop_after=None):
        written = 0
        with ResultWriter(out) as w:
            for req in read_requests(inp, n=2):
                if req.key in w.done:
                    continue
                if stop_after is not None and written == stop_after:
                    return
                if isinstance(req, InputError):
                    row = {"id": req.id, "sample": req.sample, "line_no": req.line_no}
                    row["error"] = req.message
                else:
                    row = {"id": req.id, "sample": req.sample, "text": req.prompt}
                w.write(row)
                written += 1

    run(stop_after=3)
    with out.open("ab") as f:
        f.write(b'{"id": "line-2", "sam')  # killed mid-write of the 4th row
    run()
    rows = read_rows(out)
    keys = [(r["id"], r["sample"]) for r in rows]
    assert keys == [
        ("a", 0),
        ("a", 1),
        ("line-2", 0),
        ("line-2", 1),
        ("b", 0),
        ("b", 1),
        ("line-4", 0),
        ("line-4", 1),
    ]
    assert rows[4]["error"].startswith("line 3: field 'messages[0]' must be an object")
    run()  # nothing left to do: the file does not change
    assert [(r["id"], r["sample"]) for r in read_rows(out)] == keys
