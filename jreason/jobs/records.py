"""The file side of a resumable batch-inference job: validated requests in, result lines out.

`jreason generate --input prompts.jsonl --output out.jsonl` reads every input line, expands it
into `n` samples, and appends one JSON line per finished sample to the output. The unit of work
and of resume is the key `(id, sample)`:

  * `read_requests` yields a `PromptRecord` per (line, sample), or an `InputError` for a bad
    line, so one typo in a 100k-line file costs one error row instead of the whole job. An
    error is yielded once per sample too, so error rows cover the same keys a good line would
    and a resumed job does not retry them.
  * `ResultWriter` scans an existing output on open and exposes `done`, the keys already
    written; the job skips those. Each row is one `write` of a whole line followed by fsync, so
    a kill leaves at most one torn line at the end, which the next open cuts off.

Why only the *last* line is repaired: appending whole lines means a crash can only damage the
tail. Garbage in the middle of the file (or a duplicate key) means someone edited it or two jobs
shared it; deleting it would destroy data silently, so that raises an error naming the line.
A second job opening the same output while one is running is refused with an flock.

Ids: the record's "id" field (a string or an integer, stored as str) or `line-<line_no>` when
absent. Ids are unique within a file; for a line whose own id cannot be used (a duplicate, a bad
id type) the error gets a fallback id that is unique too, so every yielded key is distinct and
the same file always yields the same keys.

Lines are split on b"\\n" only, never with str.splitlines(), which would also split inside a
JSON string holding U+2028 or U+0085 (legal raw characters with ensure_ascii=False).

Left out on purpose: no output compaction or reordering (rows land in completion order; sort at
eval time), no reading of the output by other processes while the job runs (they may see the
torn tail), no schema for result rows beyond "id" and "sample".
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Top-level input fields with a meaning here; every other field goes to `PromptRecord.extra`.
KNOWN_FIELDS = ("id", "prompt", "messages", "answer")


@dataclass(frozen=True)
class PromptRecord:
    """One sample of one valid input line."""

    id: str
    sample: int  # in [0, n)
    line_no: int  # 1-based, blank lines counted
    prompt: str | None  # exactly one of prompt / messages is set
    messages: list[dict] | None
    answer: str | None  # optional reference answer, for grading later
    extra: dict = field(default_factory=dict)  # all other input fields, passed through

    @property
    def key(self) -> tuple[str, int]:
        return (self.id, self.sample)


@dataclass(frozen=True)
class InputError:
    """One sample of one bad input line; `message` starts with "line N:" and names the field."""

    id: str
    sample: int
    line_no: int
    message: str

    @property
    def key(self) -> tuple[str, int]:
        return (self.id, self.sample)


class _LineError(Exception):
    """A bad input line; carries the id to report it under, if the line had a usable one."""

    def __init__(self, message: str, rid: str | None = None):
        super().__init__(message)
        self.rid = rid


def read_requests(path: str | Path, n: int = 1) -> Iterator[PromptRecord | InputError]:
    """Yields `n` items per non-blank line of the JSONL file at `path`, lazily, in file order.

    Only I/O errors (missing file) raise; everything wrong with a line becomes an InputError.
    Each sample gets its own copy of `messages` / `extra`, so a caller that appends to one
    sample's conversation does not change the others.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    seen: dict[str, int] = {}  # id -> line that first used it
    with Path(path).open("rb") as f:
        for line_no, raw in enumerate(f, start=1):  # binary iteration splits on b"\n" only
            if line_no == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM from some editors
            if not raw.strip():
                continue
            try:
                rec = _parse_line(raw, line_no, seen)
            except _LineError as e:
                rid = e.rid if e.rid is not None else _fallback_id(line_no, seen)
                seen[rid] = line_no
                for s in range(n):
                    yield InputError(id=rid, sample=s, line_no=line_no, message=str(e))
                continue
            seen[rec.id] = line_no
            for s in range(n):
                if s == 0:
                    yield rec
                else:
                    yield PromptRecord(
                        id=rec.id,
                        sample=s,
                        line_no=line_no,
                        prompt=rec.prompt,
                        messages=copy.deepcopy(rec.messages),
                        answer=rec.answer,
                        extra=copy.deepcopy(rec.extra),
                    )


def _fallback_id(line_no: int, seen: dict[str, int]) -> str:
    """`line-N`, or `line-N.2`, `line-N.3`, ... if an explicit id already took it."""
    rid, i = f"line-{line_no}", 1
    while rid in seen:
        i += 1
        rid = f"line-{line_no}.{i}"
    return rid


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys silently; a doubled "prompt" is a mistake.
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _LineError(f"duplicate key {k!r} in one object")
        out[k] = v
    return out


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _parse_line(raw: bytes, line_no: int, seen: dict[str, int]) -> PromptRecord:
    """The sample-0 record of a line, or _LineError("line N: ...")."""
    where = f"line {line_no}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _LineError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as e:
        raise _LineError(f"{where}: invalid JSON: {e}") from None
    except _LineError as e:
        raise _LineError(f"{where}: {e}") from None
    if not isinstance(obj, dict):
        raise _LineError(f"{where}: expected a JSON object, got {_type_name(obj)}")

    # The id first: a bad line with a good id is reported under that id.
    if "id" in obj:
        v = obj["id"]
        if isinstance(v, bool) or not isinstance(v, str | int):
            raise _LineError(
                f"{where}: field 'id' must be a string or integer, got {_type_name(v)}"
            )
        rid = str(v)
        if not rid:
            raise _LineError(f"{where}: field 'id' is an empty string")
        explicit = True
    else:
        rid, explicit = f"line-{line_no}", False
    if rid in seen:
        what = "field 'id'" if explicit else "no 'id' field, and the default id"
        raise _LineError(f"{where}: {what} {rid!r} duplicates the id of line {seen[rid]}")

    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt and has_messages:
        raise _LineError(f"{where}: fields 'prompt' and 'messages' are both present; give one", rid)
    if not has_prompt and not has_messages:
        raise _LineError(f"{where}: needs a 'prompt' (string) or 'messages' (list) field", rid)
    prompt = messages = None
    if has_prompt:
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            raise _LineError(
                f"{where}: field 'prompt' must be a string, got {_type_name(prompt)}", rid
            )
    else:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            got = "an empty list" if isinstance(messages, list) else _type_name(messages)
            raise _LineError(f"{where}: field 'messages' must be a non-empty list, got {got}", rid)
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise _LineError(
                    f"{where}: field 'messages[{i}]' must be an object, got {_type_name(m)}", rid
                )
            for k in ("role", "content"):
                if not isinstance(m.get(k), str):
                    got = "missing" if k not in m else f"got {_type_name(m[k])}"
                    raise _LineError(
                        f"{where}: field 'messages[{i}].{k}' must be a string, {got}", rid
                    )

    answer = obj.get("answer")
    if answer is not None:
        # Numeric references (GSM8K's 42) are common; store every answer as text.
        if isinstance(answer, bool) or not isinstance(answer, str | int | float):
            raise _LineError(
                f"{where}: field 'answer' must be a string or number, got {_type_name(answer)}",
                rid,
            )
        answer = str(answer)

    extra = {k: v for k, v in obj.items() if k not in KNOWN_FIELDS}
    return PromptRecord(
        id=rid,
        sample=0,
        line_no=line_no,
        prompt=prompt,
        messages=messages,
        answer=answer,
        extra=extra,
    )


class ResultWriter:
    """Append-only JSONL results with resume: `done` holds every (id, sample) already written.

        with ResultWriter("out.jsonl") as out:
            for req in read_requests("prompts.jsonl", n=4):
                if req.key in out.done:
                    continue
                out.write({"id": req.id, "sample": req.sample, ...})

    Opening repairs a torn tail (see the module docstring) and raises ValueError naming the line
    for anything else that is wrong with the file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.done: set[tuple[str, int]] = set()
        self._f = None

    def __enter__(self) -> ResultWriter:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        if self._f is not None:
            raise RuntimeError(f"{self.path} is already open")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Unbuffered, so each write() below is one system call on an O_APPEND descriptor.
        f = open(self.path, "ab", buffering=0)  # noqa: SIM115 (closed in close())
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise RuntimeError(f"{self.path} is locked by another running job") from None
        try:
            self.done = self._scan_and_repair(f)
        except BaseException:
            f.close()
            raise
        self._f = f

    def close(self) -> None:
        if self._f is not None:
            self._f.close()  # also drops the flock
            self._f = None

    def write(self, row: dict) -> None:
        """Appends `row` as one line and fsyncs; afterwards its key is in `done`."""
        if self._f is None:
            raise RuntimeError(f"{self.path} is not open; use ResultWriter as a context manager")
        key = _row_key(row)
        if key in self.done:
            raise ValueError(f"key (id={key[0]!r}, sample={key[1]}) is already in {self.path}")
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        # Regular files take the whole buffer in one call; the loop only guards short writes.
        view = memoryview(data)
        while view:
            view = view[self._f.write(view) :]
        os.fsync(self._f.fileno())
        self.done.add(key)

    def _scan_and_repair(self, f) -> set[tuple[str, int]]:
        """Keys of every complete line; cuts a torn last line; raises on damage elsewhere."""
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # bytes after the last newline: b"" unless the last write was torn
        keep = len(data) - len(tail)  # file length to keep
        done: dict[tuple[str, int], int] = {}  # key -> line number
        offset = 0
        for i, raw in enumerate(lines):
            line_no, end = i + 1, offset + len(raw) + 1
            offset = end
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                if i == len(lines) - 1 and not tail:
                    # The last line, ending in garbage after its newline: also a torn write
                    # (e.g. a crash that left unwritten, zero-filled blocks).
                    keep = end - len(raw) - 1
                    break
                raise ValueError(
                    f"{self.path} line {line_no}: not valid JSON ({e}); only a torn last line is"
                    " repaired automatically, fix or remove this line by hand"
                ) from None
            try:
                key = _row_key(row)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{self.path} line {line_no}: {e}") from None
            if key in done:
                raise ValueError(
                    f"{self.path} line {line_no}: key (id={key[0]!r}, sample={key[1]}) was"
                    f" already written on line {done[key]}; was the file shared by two jobs?"
                )
            done[key] = line_no
        if keep < len(data):
            f.truncate(keep)
            os.fsync(f.fileno())
        return set(done)


def _row_key(row: Any) -> tuple[str, int]:
    """(id, sample) of a result row; ValueError naming the missing or mistyped key."""
    if not isinstance(row, dict):
        raise ValueError(f"a result row must be a JSON object, got {_type_name(row)}")
    for k in ("id", "sample"):
        if k not in row:
            raise ValueError(f"a result row needs key {k!r}")
    rid, sample = row["id"], row["sample"]
    if not isinstance(rid, str):
        raise ValueError(f"key 'id' must be a string, got {_type_name(rid)}")
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 0:
        raise ValueError(f"key 'sample' must be a non-negative integer, got {sample!r}")
    return (rid, sample)
