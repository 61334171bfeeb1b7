"""Recurrent depth at test time: accuracy vs core iterations r, and adaptive exit (issue 7).

Trains (or reuses) the tiny recurrent-depth model of `configs/sft/recurrent_demo.yaml` on the
permutation walk (`perm_walk`: where a start state ends up after a word of fixed moves, answered
with no written reasoning, so every move is composed inside the forward pass), then decodes the
same held-out problems greedily at fixed depths r and with adaptive exit (a token stops
iterating when the KL between successive iterates' output distributions is below a threshold,
capped at the largest r). Prints the table (accuracy overall and by word length, and the core
iterations per generated token), plots accuracy vs r, and with `--record` appends both (and the
plot's path) to RESULTS.md.

Training is a curriculum of word lengths (`--stages MAX:STEPS ...`, default `STAGES`): words of
up to 8 moves, which the model learns to compose mostly within one pass through its layers,
then up to 12, which need more depth than one pass has. Each stage is a run of its own
(`RUN_DIR/stage<i>`, from the previous stage's export with a fresh optimizer, seed i) that
resumes if interrupted; the evaluation uses the last stage's problems.

    python tools/recurrent_demo.py                       # train (~35 min on 2 cores) + evaluate
    python tools/recurrent_demo.py --skip-train --record # re-evaluate runs/recurrent_demo

`--config` takes another SFT config on `perm_walk` or `var_chain` (variable tracking, where a
stage's MAX sets `max_hops` and the table also scores each asked variable by its hop count;
RESULTS.md has that earlier attempt). The same evaluation from the CLI, one depth at a time:
    jreason eval --model runs/recurrent_demo/stage1/export --task perm_walk --knob max_steps=12 \\
        --knob instructions=false --recurrence 8 --out runs/recurrent_demo/eval8
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO / "configs" / "sft" / "recurrent_demo.yaml"
# words of up to 8 moves (composed within about one pass), then up to 12 (more depth than that)
STAGES = ("8:1500", "12:1500")
# per task: the knob a stage's MAX sets, what a hop is called in the table, the matching min knob
HOPS = {
    "perm_walk": ("max_steps", "moves", "min_steps"),
    "var_chain": ("max_hops", "hops", "min_hops"),
}


def asked(prompt: str, answer: str) -> list[tuple[str, int, str]]:
    """(variable, hops, value) of every asked variable, resolved by following the statements.

    A perm_walk problem is one unnamed question whose "hops" are its moves."""
    if prompt.lstrip().startswith("Walk:"):
        from jreason.data.tasks.perm_walk import parse_walk

        return [("", len(parse_walk(prompt)[1]), answer)]
    body, question = prompt.split("What is", 1)
    table = dict(re.findall(r"(\w) ?= ?(\w)", body))
    if question.strip().startswith("each"):  # ask_all: every variable, alphabetically
        names = sorted(table)
    else:
        names = re.findall(r"[a-z]", re.match(r" ?([a-z](?: ?, ?[a-z])*) ?\?", question).group(1))
    out = []
    for name in names:
        var, n = name, 0
        while not table[var].isdigit():
            var, n = table[var], n + 1
        out.append((name, n, table[var]))
    return out


def predicted(text: str, names: list[str]) -> dict[str, str]:
    """The value the model gave each asked variable (a bare number answers a single question)."""
    from jreason.data.tasks.base import parse_int
    from jreason.data.tasks.var_chain import answer_pairs
    from jreason.data.verify import extract_answer

    text = extract_answer(text) or ""
    if len(names) == 1 and not answer_pairs(text):
        value = parse_int(text)
        return {names[0]: str(value)} if value is not None else {}
    return dict(answer_pairs(text))


def task_label(cfg) -> str:
    from jreason.data.tasks import get_task

    hi, unit, lo = HOPS[cfg.data.task]
    knobs = get_task(cfg.data.task, **cfg.data.task_knobs).config  # the task's defaults filled in
    return f"{cfg.data.task}, {getattr(knobs, lo)}-{getattr(knobs, hi)} {unit}"


def evaluate(export: Path, cfg, depths, thresholds, n: int) -> list[dict]:
    from jreason.data import pipeline
    from jreason.data.tasks import get_task
    from jreason.decode import sampler
    from jreason.model.store import abstract, load_model
    from jreason.tokenizer import load_tokenizer
    from jreason.train.setup import eval_prompts

    model_cfg, params = load_model(export)
    model, _, _ = abstract(model_cfg)
    tokenizer = load_tokenizer(export)
    task = get_task(cfg.data.task, **cfg.data.task_knobs)
    examples = pipeline.eval_examples(cfg.data, n)
    prompts = eval_prompts(cfg, tokenizer, examples)
    ex_asked = [asked(ex.prompt, ex.answer) for ex in examples]
    unit = HOPS[cfg.data.task][1]
    single = all(len(a) == 1 for a in ex_asked)  # one question per problem: variables = accuracy
    all_hops = sorted({h for a in ex_asked for _, h, _ in a})
    runs = [(f"r = {r}", model.with_depth(r)) for r in depths]
    runs += [
        (f"adaptive, KL < {t:g}, r <= {max(depths)}", model.with_depth(max(depths), t))
        for t in thresholds
    ]
    rows = []
    for name, m in runs:
        t0 = time.perf_counter()
        outs = sampler.generate(
            m, params, prompts, max_new_tokens=cfg.eval.max_new_tokens,
            stop_ids=sorted(tokenizer.stop_ids), pad_id=tokenizer.pad_id or 0,
        )  # fmt: skip
        texts = [tokenizer.decode(o["tokens"]) for o in outs]
        scores = [task.score(t, ex.answer) for t, ex in zip(texts, examples)]
        acc = sum(scores)
        # per asked variable, by its own hop count (each chain draws its own)
        right = {h: [] for h in all_hops}
        for text, a in zip(texts, ex_asked):
            pred = predicted(text, [var for var, _, _ in a])
            for var, h, value in a:
                right[h].append(pred.get(var) == value)
        by_hops = {f"{h} {unit}": sum(v) / len(v) for h, v in right.items()}
        variables = sum(map(sum, right.values())) / sum(map(len, right.values()))
        steps = sum(o["mean_steps"] * len(o["tokens"]) for o in outs) / sum(
            len(o["tokens"]) for o in outs
        )
        rows.append({
            "decoding": name,
            "depth": m.decode_steps,
            "adaptive": m.exit_threshold is not None,
            "accuracy": acc / len(examples),
            **({} if single else {"variables": variables}),
            **by_hops,
            "iterations/token": steps,
            "seconds": time.perf_counter() - t0,
        })  # fmt: skip
        per = "  ".join(f"{k} {v:6.1%}" for k, v in by_hops.items())
        print(
            f"{name:32s} accuracy {acc / len(examples):6.1%}  "
            + ("" if single else f"variables {variables:6.1%}  ")
            + f"({per})  iterations/token {steps:5.2f}"
        )
    return rows


def parse_stage(text: str) -> tuple[int, int]:
    """'MAX:STEPS' -> (max moves or hops, steps); anything else is refused, quoting it."""
    try:
        hops, steps = (int(x) for x in text.split(":"))
    except ValueError:
        raise SystemExit(f"--stages: expected MAX:STEPS (e.g. 8:1500), got {text!r}") from None
    if hops < 0 or steps < 1:
        raise SystemExit(f"--stages: need MAX >= 0 and STEPS >= 1, got {text!r}")
    return hops, steps


def plot(rows: list[dict], path: Path, label: str = "var_chain") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed = [r for r in rows if not r["adaptive"]]
    key = "variables" if "variables" in rows[0] else "accuracy"  # what the adaptive points show
    curves = [("variables", "o-", "variables right"), ("accuracy", "^--", "all right")]
    if key == "accuracy":  # one question per problem: a curve per word length instead
        curves = [(k, "o-", k) for k in rows[0] if k.endswith(" moves")][1::2]
        curves.append(("accuracy", "^--", "all"))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for col, style, curve in curves:
        ax.plot([r["depth"] for r in fixed], [r[col] for r in fixed], style, label=curve)
    for r in rows:
        if r["adaptive"]:
            ax.plot(r["iterations/token"], r[key], "s", label=r["decoding"])
    ax.set_xlabel("core iterations per token")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"{label}: accuracy vs test-time depth")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(CONFIG.relative_to(REPO)), help="the SFT config")
    ap.add_argument("--run-dir", default="runs/recurrent_demo")
    ap.add_argument("--skip-train", action="store_true", help="reuse run_dir/export")
    ap.add_argument(
        "--stages",
        nargs="+",
        default=list(STAGES),
        metavar="MAX:STEPS",
        help="the curriculum: stage i trains STEPS steps on problems of up to MAX moves (hops) in "
        "RUN_DIR/stage<i>, from stage i-1's export (fresh optimizer, seed i); the evaluation "
        f"uses the last stage's problems (default: {' '.join(STAGES)})",
    )
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 12, 16])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[1e-3, 1e-2])
    ap.add_argument("--num", type=int, default=256, help="held-out problems")
    ap.add_argument("--plot", default="docs/recurrent_depth.png")
    ap.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    args = ap.parse_args(argv)

    from jreason.train.config import load_train_config
    from jreason.train.sft import train

    run_dir, prev, cfg = Path(args.run_dir), None, None
    task = load_train_config(args.config, []).data.task
    if task not in HOPS:
        raise SystemExit(f"--config: task {task!r} has no hop knob here; use one of {sorted(HOPS)}")
    for i, (hops, steps) in enumerate(map(parse_stage, args.stages)):
        overrides = [
            f"run_dir={run_dir / f'stage{i}'}",
            f"steps={steps}",
            f"data.task_knobs.{HOPS[task][0]}={hops}",
            f"seed={i}",
        ]
        if prev is not None:  # the previous stage's model and tokenizer, a short warm-up
            overrides += [f"model.init_from={prev}", "optim.warmup_steps=20"]
        cfg = load_train_config(args.config, overrides)
        prev = Path(cfg.run_dir) / "export"
        if not args.skip_train:
            train(cfg)
    export = prev
    if not export.is_dir():
        raise SystemExit(f"{export} not found: train first (drop --skip-train)")
    rows = evaluate(export, cfg, args.depths, args.thresholds, args.num)
    plot(rows, REPO / args.plot, task_label(cfg))
    if args.record:
        command = " ".join(["python tools/recurrent_demo.py", *(argv or sys.argv[1:])])
        record(rows, command, task_label(cfg), args.plot)
    return 0


def record(rows: list[dict], command: str, label: str, plot_path: str) -> None:
    sys.path.insert(0, str(REPO / "tools" / "bench"))
    from common import markdown_table

    table = [
        {k: (f"{v:.1%}" if k in ("accuracy", "variables") or k.endswith(("hops", "moves"))
             else f"{v:.2f}" if isinstance(v, float) else v)
         for k, v in r.items() if k not in ("depth", "adaptive")}
        for r in rows
    ]  # fmt: skip
    text = (
        f"\n### Recurrent depth: accuracy vs test-time iterations ({label}, greedy)\n\n"
        f"`{command}`, {time.strftime('%Y-%m-%d')}\n\n{markdown_table(table)}\n\n"
        f"![accuracy vs r]({plot_path})\n"
    )
    with open(REPO / "RESULTS.md", "a") as f:
        f.write(text)


if __name__ == "__main__":
    raise SystemExit(main())
