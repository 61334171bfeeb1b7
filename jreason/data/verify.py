"""Final-answer extraction and equivalence checking for real math datasets (MATH, GSM8K, AIME).

This is the reward for math RL: pull the final answer out of a completion, then ask whether it
is mathematically equal to the reference. The equality check is delegated to Hugging Face's
`math_verify` (LaTeX -> SymPy, then numeric / symbolic / set / interval comparison), because
every hand-rolled normaliser we have seen (string rules from the MATH paper, `strip_string`)
misses cases that matter for reward hacking and for false negatives.

Answer format read from a completion, in order:
  1. Only text after the last `</think>`. A `<think>` with no `</think>` means the model never
     finished thinking (truncated), so there is no answer: rewarding a number found mid-thought
     would teach the model to stop early and guess.
  2. The last `\\boxed{...}` (or `\\fbox{...}`), with nested braces.
  3. Else the last line of the form `Answer: ...` (also `Final answer:`, `**Answer:**`).
  4. Optionally (`number_fallback=True`) the last number in the text, for GSM8K-style outputs.

math_verify quirks handled here:
  * Its timeouts use `signal.alarm`, which only works in the main thread; from any other thread
    `parse`/`verify` raise ValueError. We pass a timeout only in the main thread and `None`
    elsewhere. Without a timeout a power tower such as `10^{10^{10}}` would hang a worker
    thread (it takes the full 5 s timeout even in the main thread), so before comparing we
    reject expressions with huge powers or factorials (`_too_big`), and cap input length.
  * `verify(gold, pred)` is not symmetric (gold first).
  * Text after the answer (units, `\\text{ cm}`, `%`) is normalised away by its LaTeX config,
    so `5 \\text{ cm}` equals `5` and `50\\%` equals `50`.

Also here: `load_math_records`, a strict JSONL / Parquet loader that turns dataset rows into
`Example`s. Left out: multiple-choice letter matching and code-execution rewards (other files),
and hard process-based timeouts (use a process pool around `score_math` if you need one).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jreason.data.tasks.base import Example

# Longer "answers" are almost always a model dumping its reasoning into the box; parsing them
# with SymPy is slow and never right.
MAX_ANSWER_CHARS = 1000
# |exponent| or factorial argument beyond which an expression is too big to compare exactly.
MAX_EXPONENT = 10_000

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_ANSWER_LINE = re.compile(
    r"^[ \t*#>_]*(?:final[ \t]+)?answer[ \t*_]*[:：][ \t*_]*(?P<ans>.*?)[ \t*_]*$",
    re.IGNORECASE | re.MULTILINE,
)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _after_think(completion: str) -> str | None:
    """The text after the last `</think>`, or None if a `<think>` was never closed."""
    head, sep, tail = completion.rpartition("</think>")
    if sep:
        return tail
    return None if "<think>" in completion else completion


def extract_boxed(text: str) -> str | None:
    """Contents of the last `\\boxed{...}` / `\\fbox{...}` (nested braces), or None.

    Also accepts the brace-less `\\boxed 5` form some datasets use. Returns None when the last
    box is empty or unterminated (a truncated answer is not an answer).
    """
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if text.startswith(" ", i):  # `\boxed 5`: up to the next space or `$`.
        content = re.match(r"\s*([^\s$]*)", text[i:]).group(1)
        return content or None
    if not text.startswith("{", i):
        return None
    depth = 0
    j = i
    while j < len(text):
        c = text[j]
        if c == "\\":  # `\{` and `\}` are literal braces in LaTeX, not grouping.
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                content = text[i + 1 : j].strip()
                return content or None
        j += 1
    return None


def _strip_math_delimiters(s: str) -> str:
    s = s.strip().rstrip(".").strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            s = s[len(left) : len(s) - len(right)].strip()
    return s


def extract_answer(completion: str, number_fallback: bool = False) -> str | None:
    """The final answer in a completion (see the module docstring for the order), or None."""
    text = _after_think(completion)
    if text is None:
        return None
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    lines = [m.group("ans") for m in _ANSWER_LINE.finditer(text)]
    if lines:
        ans = _strip_math_delimiters(lines[-1])
        return ans or None
    if number_fallback:
        numbers = _NUMBER.findall(text)
        if numbers:
            return numbers[-1].replace(",", "")
    return None


def _too_big(expr: Any) -> bool:
    """True if SymPy would need a huge integer to compare `expr` (e.g. `10^{10^{10}}`)."""
    import sympy

    if not isinstance(expr, sympy.Basic):
        return False
    for node in sympy.preorder_traversal(expr):
        if isinstance(node, sympy.Pow):
            arg = node.exp
        elif isinstance(node, sympy.factorial):
            arg = node.args[0]
        else:
            continue
        if arg.is_number:
            try:
                # evalf keeps a separate exponent, so this is cheap even for towers.
                if abs(complex(sympy.N(arg, 5))) > MAX_EXPONENT:
                    return True
            except (TypeError, ValueError, OverflowError):
                return True
    return False


def _unbox(s: str) -> str:
    boxed = extract_boxed(s)
    return (boxed if boxed is not None else s).strip()


def math_equal(pred: str | None, gold: str | None, timeout_s: int = 5) -> bool:
    """True if answer `pred` is mathematically equal to reference `gold` (via math_verify).

    Both are answer strings (LaTeX or plain), not whole completions; a surrounding `\\boxed{}`
    is removed. Safe to call from worker threads: the signal-based timeout is used only in the
    main thread, and oversized inputs are rejected up front instead.
    """
    if pred is None or gold is None:
        return False
    pred, gold = _unbox(pred), _unbox(gold)
    if not pred or not gold or len(pred) > MAX_ANSWER_CHARS:
        return False
    if " ".join(pred.split()) == " ".join(gold.split()):
        return True  # also covers text answers SymPy cannot parse

    from math_verify import parse, verify  # imports SymPy (~1 s); only pay it when used

    # signal.alarm needs the main thread and whole seconds; elsewhere run without a timeout.
    main = threading.current_thread() is threading.main_thread()
    timeout = max(1, int(timeout_s)) if main else None
    try:
        # Wrapping in \boxed makes math_verify take the whole string as the answer instead of
        # hunting for the "most answer-like" fragment inside it.
        gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
        pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=timeout)
        if not gold_parsed or not pred_parsed:
            return False
        if any(_too_big(e) for e in (*gold_parsed, *pred_parsed)):
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except Exception:
        # A reward function must not crash the RL loop on adversarial output.
        return False


def score_math(completion: str, gold: str, number_fallback: bool = False) -> float:
    """1.0 if the completion's final answer equals `gold`, else 0.0."""
    pred = extract_answer(completion, number_fallback=number_fallback)
    return 1.0 if math_equal(pred, gold) else 0.0


class RecordError(ValueError):
    """A dataset record is malformed; the message names the file and line or row."""


def _field(record: dict[str, Any], names: Sequence[str]) -> tuple[str, Any] | None:
    for name in names:
        if record.get(name) is not None:
            return name, record[name]
    return None


def _to_example(
    record: Any,
    index: int,
    where: str,
    stem: str,
    prompt_fields: Sequence[str],
    answer_fields: Sequence[str],
    solution_fields: Sequence[str],
    id_fields: Sequence[str],
) -> Example:
    from jreason.data.tasks.base import Example  # here, not at the top: tasks import this module

    if not isinstance(record, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(record).__name__}")
    prompt = _field(record, prompt_fields)
    if prompt is None or not isinstance(prompt[1], str) or not prompt[1].strip():
        raise RecordError(
            f"{where}: no non-empty string prompt field; looked for {list(prompt_fields)}, "
            f"record has {sorted(record)}"
        )
    solution = _field(record, solution_fields)
    reasoning = solution[1] if solution and isinstance(solution[1], str) else ""
    answer = _field(record, answer_fields)
    if answer is not None:
        name, value = answer
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise RecordError(f"{where}: field {name!r} must be a string or number, got {value!r}")
        value = str(value)
        if "####" in value:  # GSM8K: "<worked solution> #### 42"
            worked, _, value = value.rpartition("####")
            reasoning = reasoning or worked.strip()
        gold = _unbox(value)
    elif reasoning:
        gold = extract_boxed(reasoning)
        if gold is None:
            raise RecordError(f"{where}: no answer field and the solution has no \\boxed{{}}")
    else:
        raise RecordError(
            f"{where}: no answer field; looked for {list(answer_fields)} and "
            f"{list(solution_fields)}, record has {sorted(record)}"
        )
    if not gold:
        raise RecordError(f"{where}: empty answer")
    rid = _field(record, id_fields)
    return Example(
        id=str(rid[1]) if rid else f"{stem}-{index}",
        prompt=prompt[1],
        reasoning=reasoning,
        answer=gold,
    )


def load_math_records(
    path: str | Path,
    prompt_fields: Sequence[str] = ("problem", "question", "prompt"),
    answer_fields: Sequence[str] = ("answer",),
    solution_fields: Sequence[str] = ("solution",),
    id_fields: Sequence[str] = ("id", "unique_id"),
) -> list[Example]:
    """Reads a `.jsonl` / `.ndjson` or `.parquet` file of math problems into `Example`s.

    Each field list is tried in order; the first present, non-null field wins. The answer
    comes from an answer field (a GSM8K `... #### 42` tail and a `\\boxed{}` wrapper are
    stripped), else from the last `\\boxed{}` of the solution. The solution, if any, becomes
    `reasoning`. Blank JSONL lines are skipped. A bad record raises RecordError naming the
    file and the 1-based line (JSONL) or 0-based row (Parquet); the whole file is validated
    eagerly so a bad row fails at load time, not hours into training.
    """
    path = Path(path)
    fields = (prompt_fields, answer_fields, solution_fields, id_fields)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        out = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RecordError(f"{where}: invalid JSON: {e}") from None
                out.append(_to_example(record, lineno, where, path.stem, *fields))
        return out
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        out = []
        row = 0
        for batch in pq.ParquetFile(path).iter_batches():
            for record in batch.to_pylist():
                out.append(_to_example(record, row, f"{path}: row {row}", path.stem, *fields))
                row += 1
        return out
    raise ValueError(
        f"{path}: unsupported file type {suffix!r}; allowed: .jsonl, .ndjson, .parquet"
    )
