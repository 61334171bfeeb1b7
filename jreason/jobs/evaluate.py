"""Metrics for `jreason eval`: pass@k, maj@k, a per-budget summary, a table and a plot.

Input is graded result rows, one per (budget, id, sample): {"id", "sample", "correct",
"answer", "thinking_tokens", "budget"}. `budget` is the thinking budget the row was generated
with (None = unlimited), so one call can compare a sweep of budgets; the question it answers is
"how much accuracy does each extra thinking token buy", hence the accuracy-vs-tokens plot.

pass@k is the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained
on Code", Codex paper, fig. 3): from n samples of which c are correct, the chance that a random
k-subset holds at least one correct sample, 1 - C(n-c, k) / C(n, k). It is computed as their
product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials.

maj@k (self-consistency, Wang et al. 2022) is a vote over the first k samples' extracted
answers, compared as exact strings: normalise them before calling if "1/2" and "0.5" should
count as the same vote. Using the *first* k samples, not an average over subsets, keeps it the
number a deployed system with k samples would get.

Left out on purpose: grading itself (answers arrive already extracted and marked correct, see
`jreason.data.verify`), confidence intervals, and per-dataset breakdowns (call `summarize` per
dataset).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

DEFAULT_KS = (1, 2, 4, 8, 16, 32, 64)  # each k <= samples per problem is reported

# plot_accuracy_vs_thinking geometry: fixed so the PNG is reproducible.
PLOT_WIDTH_IN = 6.0
PLOT_HEIGHT_IN = 4.0
PLOT_DPI = 100


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"pass_at_k: {name} must be a non-negative integer, got {v!r}")
    if k < 1:
        raise ValueError(f"pass_at_k: k must be at least 1, got {k}")
    if k > n:
        raise ValueError(f"pass_at_k: k={k} is larger than the number of samples n={n}")
    if c > n:
        raise ValueError(f"pass_at_k: c={c} correct is more than the n={n} samples")
    if n - c < k:
        return 1.0  # every k-subset must contain a correct sample
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i)
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int) -> float:
    """1.0 if the most common answer among the first k samples is correct, else 0.0.

    None (no answer extracted) casts no vote; with no votes at all the result is 0.0. A tie goes
    to the answer that appeared first. The winner's correctness is that of its first sample
    (equal strings graded against one reference should agree anyway).
    """
    if len(answers) != len(correct):
        raise ValueError(f"maj_at_k: {len(answers)} answers but {len(correct)} correct flags")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(answers):
        raise ValueError(f"maj_at_k: k must be in [1, {len(answers)}], got {k!r}")
    votes = Counter(a for a in answers[:k] if a is not None)
    if not votes:
        return 0.0
    # Counter keeps insertion order and max() returns the first maximal item: earliest wins ties.
    winner = max(votes, key=votes.__getitem__)
    return 1.0 if correct[list(answers).index(winner)] else 0.0


def summarize(rows: Iterable[dict[str, Any]], ks: Sequence[int] = DEFAULT_KS) -> list[dict]:
    """One dict per budget (ascending, unlimited last) with accuracy, pass@k, maj@k, tokens.

    Keys of each dict:
      budget                int | None
      problems              distinct ids with at least one graded sample
      n, n_max              fewest / most graded samples of any problem; pass@k and maj@k are
                            reported for each k in `ks` with k <= n
      samples               graded rows
      errors                rows with an "error" key (bad input line, failed generation); they
                            are excluded from everything else
      accuracy              mean of `correct` over all graded samples
      pass@k, maj@k         means over problems (maj@k votes over samples 0..k-1 by index)
      mean_thinking_tokens  mean over all graded samples
    A budget with only error rows has problems = samples = 0 and None for the means.
    """
    groups: dict[Any, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    errors: Counter = Counter()
    seen: set[tuple] = set()
    for row in rows:
        budget = row.get("budget")
        if "error" in row:
            errors[budget] += 1
            groups.setdefault(budget, defaultdict(list))
            continue
        for key in ("id", "sample", "correct", "thinking_tokens"):
            if key not in row:
                raise ValueError(f"summarize: row {_describe(row)} has no {key!r} key")
        if not isinstance(row["correct"], bool):
            raise ValueError(f"summarize: row {_describe(row)}: 'correct' must be a bool")
        key = (budget, row["id"], row["sample"])
        if key in seen:
            raise ValueError(f"summarize: row {_describe(row)} appears twice")
        seen.add(key)
        groups[budget][row["id"]].append(row)

    out = []
    for budget in sorted(groups, key=lambda b: (b is None, b if b is not None else 0)):
        problems = groups[budget]
        graded = [r for rs in problems.values() for r in rs]
        counts = [len(rs) for rs in problems.values()]
        n = min(counts, default=0)
        s: dict[str, Any] = {
            "budget": budget,
            "problems": len(problems),
            "n": n,
            "n_max": max(counts, default=0),
            "samples": len(graded),
            "errors": errors[budget],
            "accuracy": _mean(r["correct"] for r in graded),
        }
        for k in sorted(set(ks)):
            if k > n:
                continue
            s[f"pass@{k}"] = _mean(
                pass_at_k(len(rs), sum(r["correct"] for r in rs), k) for rs in problems.values()
            )
        for k in sorted(set(ks)):
            if k > n:
                continue
            maj = []
            for rs in problems.values():
                rs = sorted(rs, key=lambda r: r["sample"])
                maj.append(maj_at_k([r.get("answer") for r in rs], [r["correct"] for r in rs], k))
            s[f"maj@{k}"] = _mean(maj)
        s["mean_thinking_tokens"] = _mean(r["thinking_tokens"] for r in graded)
        out.append(s)
    return out


def _describe(row: dict) -> str:
    return f"(budget={row.get('budget')!r}, id={row.get('id')!r}, sample={row.get('sample')!r})"


def _mean(xs: Iterable[float]) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _budget_label(budget: Any) -> str:
    return "unlimited" if budget is None else str(budget)


def format_table(summary: Sequence[dict]) -> str:
    """A markdown table, one row per budget; a metric a budget lacks (k > n) shows as "-"."""

    def k_of(name: str) -> int:
        return int(name.split("@")[1])

    metric_cols = sorted(
        {c for s in summary for c in s if c.startswith(("pass@", "maj@"))},
        key=lambda c: (not c.startswith("pass@"), k_of(c)),
    )
    header = ["budget", "problems", "n", "errors", "accuracy", *metric_cols, "mean thinking tokens"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for s in summary:
        n = str(s["n"]) if s["n"] == s["n_max"] else f"{s['n']}-{s['n_max']}"
        cells = [_budget_label(s["budget"]), str(s["problems"]), n, str(s["errors"])]
        cells += [_fmt(s.get(c), ".3f") for c in ["accuracy", *metric_cols]]
        cells.append(_fmt(s.get("mean_thinking_tokens"), ".1f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def plot_accuracy_vs_thinking(summary: Sequence[dict], path: str | Path) -> Path:
    """PNG of accuracy against mean thinking tokens, one labelled point per budget.

    Points are joined in budget order (the summary's order). Budgets with no graded samples are
    skipped. Uses the Agg canvas directly (no pyplot), so it needs no display and leaves
    matplotlib's global backend alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = [s for s in summary if s.get("accuracy") is not None]
    if not pts:
        raise ValueError("plot_accuracy_vs_thinking: no budget has graded samples")
    xs = [s["mean_thinking_tokens"] for s in pts]
    ys = [s["accuracy"] for s in pts]

    fig = Figure(figsize=(PLOT_WIDTH_IN, PLOT_HEIGHT_IN), dpi=PLOT_DPI)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(xs, ys, marker="o")
    for s, x, y in zip(pts, xs, ys):
        ax.annotate(_budget_label(s["budget"]), (x, y), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("mean thinking tokens")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0.0, 1.05)
    ax.set_title("accuracy vs thinking tokens (labels: thinking budget)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
