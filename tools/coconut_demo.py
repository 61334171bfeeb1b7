"""Coconut vs. written chains of thought on ProsQA-style graph questions, on CPU in minutes.

    python tools/coconut_demo.py [--steps 3000] [--stage-steps 500] [--record]   (~9 min on 2 CPUs)

Three tiny models (configs/models/tiny-llama.yaml: 2 layers, d_model 64) answer "Is A a B or a C?" over a
random concept DAG (data/tasks/prosqa.py), each trained in-process with the shared
`make_train_step` (through train/coconut.py's stage loop):

    no-CoT   question -> "Answer: B"                          (--steps steps)
    CoT      question -> the path's "- X Y" lines -> "Answer: B"   (--steps steps)
    Coconut  from the CoT model, stages 1 .. K (K = --max-stage, --stage-steps each, optimizer
             reset per stage): stage k replaces the first k lines by k * c continuous thoughts
             (model/latent.py); the last stage has no written steps left

then evaluated greedily on held-out problems (another seed), Coconut with K * c thoughts
through decode/latent.py. The table is the paper's (Hao et al. 2024, table 1) shape: method,
accuracy, mean generated tokens (for Coconut: thoughts + text tokens). `--record` writes it to
RESULTS.md's "## Coconut demo" section (replacing an earlier one) with the command that made it.

All three start from the same `--pretrain` steps of an induction exercise: a random run of 6-20
concept names, then the same run again, the repeat supervised. It stands in for the paper's
pretrained GPT-2, and for the one thing a chain of thought here needs from it: an induction head
(find the earlier occurrence of the current name, copy the token after it), which is the fact
lookup `- X` -> ` Y`. Trained from scratch on ProsQA rows alone, the tiny model never formed one
in 10k steps: it settled on a bag-of-names heuristic (write a name that occurs often in the facts)
at ~70% CoT accuracy, and plain fact restatement (2-8 lookups a row) was too sparse a signal to
form the head in 3k steps. The copy runs give 6-20 lookups a row; after 3k of them the CoT model
reaches 100% on 2-hop chains within 3k more steps (RESULTS.md, "Coconut demo: what was tried").

Facts and steps are `- X Y` lines (prosqa's `terse` knob) so that a name is one token wherever it
appears; `--sentences` uses `Every X is a Y.` instead (the lookup then matches a name three tokens
back, which the copy exercise does not teach). The defaults (2-hop problems, K = 2, lr 3e-3,
batch 32, rope theta 1e4) fit ~9 CPU minutes; deeper problems (--max-hops 3 --max-stage 3) need
more steps. The default `--branching 1` makes A's path a chain (a distractor chain and a cross
edge remain): with `--branching 2` the first written step must pick one of A's two out-edges
before it can see which reaches an option, the search ProsQA is about, and this 2-layer model's
CoT then sits at chance (52.0%, as do no-CoT 55.5% and Coconut 52.0%, 2026-12-05).

The tokenizer is a BPE trained here on task text (as `jreason demo` does); `<bot>`,
`<latent>` and `<eot>` are three ids after its vocabulary, so the model's vocab is 3 larger.
Training data is fresh problems every step (seed 0, consecutive indices); evaluation uses seed 1.

Left out: the paper's "pause as thought" and "w/o curriculum" ablations, and GPT-2: a 0.15M
parameter model from scratch is what fits a CPU demo, so do not expect the paper's numbers.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jreason.data.tasks import get_task
from jreason.data.tasks.prosqa import NAMES
from jreason.decode.latent import generate_latent
from jreason.decode.sampler import generate
from jreason.model import latent as lt
from jreason.model.config import RopeConfig, load_config
from jreason.model.transformer import init_model
from jreason.tokenizer import load_tokenizer, train_sentencepiece
from jreason.train.coconut import train_stages
from jreason.train.config import OptimConfig
from jreason.train.sft import cross_entropy_loss


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--pretrain", type=int, default=3000,
        help="shared induction-exercise steps (repeated runs of names; 0: start from scratch)",
    )  # fmt: skip
    p.add_argument("--steps", type=int, default=3000, help="no-CoT and CoT training steps")
    p.add_argument("--stage-steps", type=int, default=500, help="Coconut steps per stage")
    p.add_argument("--max-stage", type=int, default=2, help="K: Coconut's max_latent_stage")
    p.add_argument("--c-thought", type=int, default=1, help="c: thoughts per replaced step")
    p.add_argument("--min-hops", type=int, default=2)
    p.add_argument("--max-hops", type=int, default=2)
    p.add_argument(
        "--branching", type=int, default=1,
        help="out-edges per path node (1: a chain, no dead ends; 2: the step must pick a branch)",
    )  # fmt: skip
    p.add_argument(
        "--sentences", action="store_true",
        help="facts and steps as `Every X is a Y.`, not `- X Y` lines (prosqa's terse knob)",
    )  # fmt: skip
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval", type=int, default=256, help="held-out problems")
    p.add_argument("--preset", default="tiny-llama")
    p.add_argument(
        "--init-std", type=float, default=None,
        help="weight init std (default: the preset's, 0.02 for tiny-llama)",
    )  # fmt: skip
    p.add_argument(
        "--rope-theta", type=float, default=10000.0,
        help="plain RoPE base replacing the preset's (0: keep the preset's rope)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--record", action="store_true", help="write the table to RESULTS.md (replaces its section)"
    )
    args = p.parse_args(argv)
    if args.pretrain < 0:
        p.error("--pretrain must be >= 0")
    if args.rope_theta < 0:
        p.error("--rope-theta must be > 0 (or 0 for the preset's rope)")
    for name in ("steps", "stage_steps", "batch", "eval"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_hops > args.max_stage:
        # the last stage must replace every written step
        p.error(f"--max-hops={args.max_hops} must be <= --max-stage={args.max_stage}")
    return args


class Problems:
    """ProsQA problems as (question, steps, answer) ids, and the rows of each method."""

    def __init__(self, task, tokenizer, tokens: lt.LatentTokens, coconut: lt.CoconutConfig):
        self.task, self.tok, self.tokens, self.coconut = task, tokenizer, tokens, coconut

    def parts(self, seed: int, n: int, start: int = 0):
        for ex in self.task.generate(seed, n, start):
            question = self.tok.encode(ex.prompt + "\n")
            steps = [self.tok.encode(line + "\n") for line in ex.reasoning.splitlines()]
            answer = self.tok.encode(f"Answer: {ex.answer}", add_eos=True)
            yield ex, question, steps, answer

    def copy_row(self, rng: np.random.Generator) -> dict:
        """The induction exercise: ` a b c ...` (6-20 distinct names), then the same run again,
        supervised. Runs vary in length so the repeat is found by matching names, not by a fixed
        offset."""
        names = rng.permutation(NAMES)[: int(rng.integers(6, 21))]
        run = self.tok.encode(" " + " ".join(names))
        end = self.tok.encode("\n", add_eos=True)
        return lt.build_row(run, [run], end, n_skip=0, n_latent=0, tokens=None)

    def row(self, method: str, stage: int, question, steps, answer) -> dict:
        if method == "coconut":
            return lt.stage_row(question, steps, answer, stage, self.coconut, self.tokens)
        n_skip = len(steps) if method == "no-cot" else 0
        return lt.build_row(question, steps, answer, n_skip=n_skip, n_latent=0, tokens=None)


def train_tokenizer(task, directory: Path, vocab_size: int = 512):
    lines = []
    for ex in task.generate(12345, 2000):
        lines += ex.prompt.splitlines() + ex.reasoning.splitlines() + [f"Answer: {ex.answer}"]
    return load_tokenizer(train_sentencepiece(lines, vocab_size, directory / "tok"))


def evaluate(method, model, params, problems: Problems, n: int, n_latent: int, seed: int = 1):
    """(accuracy, mean generated tokens, share of answers naming one of the two options)."""
    tok, correct, lengths, picked, shown = problems.tok, 0.0, [], 0, 0
    items = list(problems.parts(seed, n))
    for i in range(0, n, 128):
        chunk = items[i : i + 128]
        questions = [q for _, q, _, _ in chunk]
        kw = {"max_new_tokens": 64, "stop_ids": [tok.eos_id], "pad_id": tok.pad_id}
        if method == "coconut":
            outs = generate_latent(
                model, params, questions, tokens=problems.tokens, n_latent=n_latent, **kw
            )
        else:
            outs = generate(model, params, questions, **kw)
        for (ex, *_), out in zip(chunk, outs):
            text = tok.decode([t for t in out["tokens"] if t < tok.vocab_size])
            correct += problems.task.score(text, ex.answer)
            lengths.append(len(out["tokens"]) + out.get("n_latent", 0))
            options = re.search(r"Is \w+ a (\w+) or a (\w+)\?", ex.prompt).groups()
            picked += any(problems.task.score(text, o) for o in options)
            if shown < 2:  # a look at what the model writes (is the answer format learned?)
                shown += 1
                print(f"  {method} sample: {text!r} (gold {ex.answer})", flush=True)
    return correct / n, float(np.mean(lengths)), picked / n


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    task = get_task(
        "prosqa",
        min_hops=args.min_hops,
        max_hops=args.max_hops,
        branching=args.branching,
        terse=not args.sentences,
        side_len=1,
        instructions=False,
    )
    coconut = lt.CoconutConfig(
        c_thought=args.c_thought,
        max_latent_stage=args.max_stage,
        steps_per_stage=args.stage_steps,
        reset_optimizer=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(task, Path(tmp))
    tokens = lt.LatentTokens.for_tokenizer(tok)
    problems = Problems(task, tok, tokens, coconut)

    # every method's rows fit one static shape: the longest CoT row of a sample, plus latents
    longest = max(
        len(problems.row("cot", 0, *p)["ids"]) for _, *p in problems.parts(args.seed, 512)
    )
    seq_len = max(-(-(longest + coconut.max_latents + 8) // 16) * 16, 64)  # 64: copy rows
    cfg = load_config(args.preset).replace(
        vocab_size=tokens.vocab_size,
        eos_token_ids=(tok.eos_id,),
        pad_token_id=tok.pad_id,
        max_seq_len=max(seq_len + 128, 256),
    )
    if args.init_std is not None:
        cfg = cfg.replace(init_std=args.init_std)
    if args.rope_theta:
        # tiny-llama's head_dim 16 has 8 rotary frequencies; at its llama3 theta 5e5 only ~2 turn
        # fast enough to single out the previous token, the other half of an induction head
        cfg = cfg.replace(rope=RopeConfig(theta=args.rope_theta))
    model, params0 = init_model(cfg, jax.random.key(args.seed))
    print(
        f"prosqa hops {args.min_hops}-{args.max_hops}: vocab {tok.vocab_size}+3, seq_len "
        f"{seq_len}, {cfg.n_params / 1e6:.2f}M params, batch {args.batch}",
        flush=True,
    )

    def batches(method):
        def batch_fn(stage, i):
            # fresh problems every step; Coconut's stages continue past the CoT run's indices
            start = (args.steps + (stage - 1) * args.stage_steps + i) * args.batch
            if method != "coconut":
                start = i * args.batch
            if method == "pretrain":
                rng = np.random.default_rng([args.seed, 1000, i])
                rows = [problems.copy_row(rng) for _ in range(args.batch)]
            else:  # eval uses seed 1
                parts = problems.parts(args.seed, args.batch, start)
                rows = [problems.row(method, stage, *p) for _, *p in parts]
            b = lt.collate(rows, seq_len, coconut.max_latents, tok.pad_id)
            return {k: v[None] for k, v in b.items()}  # (A=1, b, T)

        return batch_fn

    def log(name):
        def on_step(stage, i, m):
            if (i + 1) % 100 == 0:
                print(
                    f"  {name} stage {stage} step {i + 1}: loss {float(m['loss']):.3f} "
                    f"acc {float(m['accuracy']):.3f} ({time.perf_counter() - t0:.0f}s)",
                    flush=True,
                )

        return on_step

    optim = OptimConfig(lr=args.lr, schedule="cosine", warmup_steps=20, weight_decay=0.0)
    one_stage = lt.CoconutConfig(steps_per_stage=args.steps)
    if args.pretrain:
        # the paper fine-tunes a pretrained GPT-2 for every method; this stands in for it
        params0, _ = train_stages(
            model, params0, lt.CoconutConfig(steps_per_stage=args.pretrain), optim,
            batches("pretrain"), [0], loss_fn=cross_entropy_loss, seed=args.seed,
            on_step=log("pretrain"),
        )  # fmt: skip
    trained = {}
    for method in ("no-cot", "cot"):
        trained[method], _ = train_stages(
            model, params0, one_stage, optim, batches(method), [0],
            loss_fn=cross_entropy_loss, seed=args.seed, on_step=log(method),
        )  # fmt: skip
    # Coconut starts from the CoT model (its stage 0 is CoT training), as the paper does
    trained["coconut"], _ = train_stages(
        model, trained["cot"], coconut, optim, batches("coconut"),
        list(range(1, args.max_stage + 1)), seed=args.seed, on_step=log("coconut"),
    )  # fmt: skip

    n_latent = coconut.eval_latents(args.max_stage)
    results = []
    for method, label in (("no-cot", "No-CoT"), ("cot", "CoT"), ("coconut", "Coconut")):
        results.append(
            (label, *evaluate(method, model, trained[method], problems, args.eval, n_latent))
        )
    elapsed = time.perf_counter() - t0

    command = "python tools/coconut_demo.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    table = [
        "| method | accuracy | mean generated tokens |",
        "|---|---|---|",
        *(f"| {m} | {100 * a:.1f}% | {n:.1f} |" for m, a, n, _ in results),
    ]
    # a model that always names one of the two options scores 50% by chance; below that, it
    # has not yet learned the answer format (it names some other concept)
    picked = ", ".join(f"{m} {100 * p:.0f}%" for m, _, _, p in results)
    note = (
        f"ProsQA-style, hops {args.min_hops}-{args.max_hops}, {args.eval} held-out problems; "
        f"{cfg.n_params / 1e6:.2f}M-param `{args.preset}` model (init_std {cfg.init_std:g}, "
        f"rope theta {cfg.rope.theta:g}); {args.pretrain} induction-exercise steps; "
        f"no-CoT/CoT {args.steps} steps, "
        f"Coconut = CoT + {args.max_stage} stages x {args.stage_steps} steps (c={args.c_thought}, "
        f"{n_latent} thoughts at eval); batch {args.batch}; {elapsed:.0f}s on "
        f"{jax.devices()[0].device_kind}. Answers naming one of the two options: {picked}."
    )
    print("\n".join(table) + "\n\n" + note)
    if args.record:
        path = Path(__file__).resolve().parents[1] / "RESULTS.md"
        if not path.exists():
            path.write_text("# Results\n\nMeasured runs, newest last; each names its command.\n")
        section = f"## Coconut demo\n\n`{command.strip()}`\n\n" + "\n".join(table) + f"\n\n{note}\n"
        text = path.read_text()
        # one Coconut section: a rerun replaces the previous table instead of stacking up
        old = re.search(r"^## Coconut demo\n.*?(?=^## |\Z)", text, flags=re.M | re.S)
        if old:
            tail = text[old.end() :]
            text = text[: old.start()] + section + ("\n" + tail if tail else "")
        else:
            text = text.rstrip("\n") + "\n\n" + section
        path.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
