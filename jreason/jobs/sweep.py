"""`jreason eval`: generate, grade with the task verifiers, and sweep thinking budgets.

For each thinking budget (a `max_thinking_tokens`, or None for unlimited) the problems are run
through the resumable generate job into `OUT/budget-<b>.jsonl`, every row is graded (a
procedural task's own checker, or math-verify against the record's "answer" for JSONL input),
and evaluate.py turns the graded rows into accuracy, pass@k and maj@k per budget, a markdown
table (`summary.md`), the numbers (`summary.json`) and the accuracy-vs-thinking-tokens plot.
Everything under OUT is resumable: re-running the command finishes what a killed run left.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jreason.atomic import atomic_dir
from jreason.data.tasks import get_task
from jreason.data.verify import extract_answer, score_math
from jreason.jobs import evaluate
from jreason.jobs.generate import GenerateOptions, run_generate
from jreason.jobs.records import read_requests

PROBLEMS = "problems.jsonl"


def write_task_problems(out_dir: Path, task_name: str, knobs: dict, num: int, seed: int) -> Path:
    """The task's problems as generate-job input (written once; a rerun reuses the file)."""
    path = out_dir / PROBLEMS
    if path.is_file():
        return path
    task = get_task(task_name, **knobs)
    lines = [
        json.dumps({"id": f"{task_name}-{i}", "prompt": ex.prompt, "answer": ex.answer})
        for i, ex in enumerate(task.generate(seed, num))
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def budget_label(budget: int | None) -> str:
    return "none" if budget is None else str(budget)


def grade(rows: list[dict], scorer, budget: int | None) -> list[dict]:
    graded = []
    for row in rows:
        if "error" in row:
            graded.append({**row, "budget": budget})
            continue
        completion = row["completion"]
        graded.append(
            {
                "id": row["id"],
                "sample": row["sample"],
                "budget": budget,
                "correct": bool(scorer(completion, row.get("reference", ""))),
                "answer": extract_answer(completion),
                "thinking_tokens": row.get("thinking_tokens") or 0,
            }
        )
    return graded


def run_eval(
    engine,
    tokenizer,
    out_dir: str | Path,
    opts: GenerateOptions,
    *,
    input_path: str | Path | None = None,
    task: str | None = None,
    knobs: dict | None = None,
    num: int = 64,
    seed: int = 1234,
    budgets: tuple[int | None, ...] = (None,),
    ks: tuple[int, ...] = evaluate.DEFAULT_KS,
    progress: bool = True,
) -> list[dict]:
    """Runs the sweep; returns evaluate.summarize's per-budget list (also written to OUT)."""
    out_dir = Path(out_dir)
    if (input_path is None) == (task is None):
        raise ValueError("eval: give exactly one of an input file (--input) or a task (--task)")
    if task is not None:
        input_path = write_task_problems(out_dir, task, knobs or {}, num, seed)
        scorer = get_task(task, **(knobs or {})).score
    else:
        if not any(getattr(r, "answer", None) is not None for r in read_requests(input_path)):
            raise ValueError(f"eval: {input_path} has no 'answer' fields to grade against")
        scorer = score_math
    rows = []
    for budget in budgets:
        opts_b = dataclasses.replace(opts, max_thinking_tokens=budget)
        path = out_dir / f"budget-{budget_label(budget)}.jsonl"
        run_generate(engine, tokenizer, input_path, path, opts_b, progress=progress)
        generated = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows += grade(generated, scorer, budget)
    summary = evaluate.summarize(rows, ks)
    table = evaluate.format_table(summary)
    with atomic_dir(out_dir / "report", overwrite=True) as tmp:
        (tmp / "summary.md").write_text(table + "\n")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if any(s["accuracy"] is not None for s in summary):  # else every row was an error
            evaluate.plot_accuracy_vs_thinking(summary, tmp / "accuracy_vs_thinking.png")
    return summary
