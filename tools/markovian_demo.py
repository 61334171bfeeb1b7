"""Markovian-thinking RL (Delethink) demonstration, end to end on CPU, one command:

    python tools/markovian_demo.py [--run-dir runs/markovian_demo] [sft.KEY=V ...] [rl.KEY=V ...]

The task (configs/sft/markovian_demo.yaml: 4-operand +/- arithmetic) needs traces of 36-47
tokens; the model thinks in Delethink chunks of C = 20 tokens with a carryover of m = 10
(configs/rl/markovian_demo.yaml `rollout.markovian`): when a chunk fills, the context is reset to
the query + the last 10 trace tokens, so the KV cache per sequence never holds more than
query + 20 tokens, about half of the trace it thinks.

1. tokenizer: a BPE trained on the task's text (as `jreason train` trains one), run_dir/tokenizer.
2. data: tools/markovian_sft_data.py rows for the task - whole traces, plus the chunk contexts
   the rollout's Markovian settings produce on each trace (query + carried tail -> next tokens),
   pre-tokenized in run_dir/data (a model trained on whole traces alone gets ~0% under chunked
   decoding: after a reset it restarts or invents operands).
3. SFT (configs/sft/markovian_demo.yaml) on that mix, stopped partway down its schedule: a
   model that thinks Markovian-ly only some of the time, the paper's starting point.
4. Delethink RL (configs/rl/markovian_demo.yaml) from the SFT export: rollouts in chunks,
   every chunk a training row, held-out accuracy measured greedily under the same chunked
   decoding before the first step and after the last.
5. Full-context accuracy of the SFT and RL models on the same problems, for reference, with the
   peak context each decoding needs.

Rerunning resumes: the tokenizer and data are reused, both training stages resume from their
checkpoints. `sft.KEY=VALUE` / `rl.KEY=VALUE` override the two configs. Writes
run_dir/summary.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/markovian_demo")
    p.add_argument("--examples", type=int, default=10000, help="task examples for the SFT rows")
    p.add_argument("--data-seed", type=int, default=2, help="their task stream")
    p.add_argument("--full-fraction", type=float, default=0.5, help="examples with a whole row")
    p.add_argument("overrides", nargs="*", help="sft.KEY=VALUE / rl.KEY=VALUE")
    args = p.parse_args(argv)
    bad = [o for o in args.overrides if not o.startswith(("sft.", "rl."))]
    if bad:
        p.error(f"overrides must start with sft. or rl.: {bad}")

    from jreason import distributed
    from jreason.decode.load import load_engine
    from jreason.tokenizer import load_tokenizer
    from jreason.train.config import load_train_config
    from jreason.train.rl import rollout as rollout_lib
    from jreason.train.rl.config import load_rl_config
    from jreason.train.rl.loop import evaluate_engine, train_rl
    from jreason.train.setup import _train_task_tokenizer
    from jreason.train.sft import train

    distributed.initialize()
    distributed.setup_logging()
    t_start = time.perf_counter()
    run = Path(args.run_dir).absolute()
    sft_over = [o.removeprefix("sft.") for o in args.overrides if o.startswith("sft.")]
    rl_over = [o.removeprefix("rl.") for o in args.overrides if o.startswith("rl.")]
    tok_file, data_dir = run / "tokenizer" / "tokenizer.model", run / "data"
    sft_cfg = load_train_config(
        REPO / "configs/sft/markovian_demo.yaml",
        [
            f"run_dir={run}",
            f"tokenizer.path={tok_file}",
            f"data.paths=[{data_dir}/*.array_record]",
            *sft_over,
        ],
    )
    rl_cfg = load_rl_config(
        REPO / "configs/rl/markovian_demo.yaml",
        [f"run_dir={run / 'rl'}", f"model.init_from={run / 'export-hf'}", *rl_over],
    )
    mk = rollout_lib.markovian_config(rl_cfg.rollout)
    if mk is None:
        raise SystemExit("markovian_demo: rl.rollout.markovian.chunk_size must be set")
    if (sft_cfg.data.task, sft_cfg.data.task_knobs) != (rl_cfg.data.task, rl_cfg.data.task_knobs):
        raise SystemExit("markovian_demo: the SFT and RL configs must name the same task/knobs")

    # 1-2. tokenizer and the SFT rows (whole traces + chunk contexts)
    if not tok_file.is_file():
        tok_file.parent.mkdir(parents=True, exist_ok=True)
        _train_task_tokenizer(sft_cfg, tok_file.parent)  # as `jreason train` does
    tokenizer = load_tokenizer(tok_file)
    if not (data_dir / "meta.json").is_file():
        data_tool = _tool("markovian_sft_data")
        rows = data_tool.build(
            tokenizer,
            sft_cfg.data.task,
            dict(sft_cfg.data.task_knobs),
            num=args.examples,
            seed=args.data_seed,
            cfg=mk,
            full_fraction=args.full_fraction,
        )
        extra = {
            "task": sft_cfg.data.task,
            "knobs": dict(sft_cfg.data.task_knobs),
            "examples": args.examples,
            "seed": args.data_seed,
            "markovian": dataclasses.asdict(mk),
            "full_fraction": args.full_fraction,
        }
        meta = data_tool.write(rows, tokenizer, str(data_dir), extra)
        print(f"data: {meta['num_records']} rows ({meta['full_rows']} whole traces) in {data_dir}")

    # 3. SFT on the mix; 4. Delethink RL from its export
    t0 = time.perf_counter()
    sft = train(sft_cfg)
    t_sft = time.perf_counter() - t0
    t0 = time.perf_counter()
    rl = train_rl(rl_cfg)
    t_rl = time.perf_counter() - t0

    # 5. full-context accuracy on the same held-out problems (the RL eval set)
    full_cfg = load_rl_config(
        REPO / "configs/rl/markovian_demo.yaml",
        [f"run_dir={run / 'rl'}", *rl_over, "rollout.markovian.chunk_size=0"]
        + [f"rollout.max_tokens={rl_cfg.rollout.max_tokens + rl_cfg.data.seq_len}"],
    )
    full = {}
    for name, model_dir in (("sft", run / "export-hf"), ("rl", run / "rl" / "export-hf")):
        engine, tok = load_engine(model_dir, max_slots=rl_cfg.rollout.max_slots, max_len=512)
        full[name] = evaluate_engine(engine, tok, full_cfg)

    chunked = {"sft": rl.get("eval_before", {}), "rl": rl.get("eval", {})}
    summary = {
        "run_dir": str(run),
        "task": {"name": sft_cfg.data.task, **dict(sft_cfg.data.task_knobs)},
        "markovian": {
            "chunk_size": mk.chunk_size,
            "carryover": mk.carryover,
            "keep_head": mk.keep_head,
            "max_chunks": mk.max_chunks,
        },
        "sft_steps": sft["step"],
        "rl_steps": rl["step"],
        "eval_problems": rl_cfg.eval.num_examples,
        "chunked": chunked,
        "full_context": full,
        "seconds": {"sft": t_sft, "rl": t_rl, "total": time.perf_counter() - t_start},
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    def acc(d: dict) -> str:
        return f"{d['accuracy']:.1%}" if "accuracy" in d else "-"

    n = rl_cfg.eval.num_examples
    print()
    print(f"Markovian-thinking demo: {sft_cfg.data.task} {dict(sft_cfg.data.task_knobs)}")
    print(f"  chunks: C={mk.chunk_size}, carryover m={mk.carryover}, at most I={mk.max_chunks}")
    print(
        f"  SFT {sft['step']} steps ({t_sft:.0f} s), Delethink RL {rl['step']} steps ({t_rl:.0f} s)"
    )
    print(f"  held-out accuracy, greedy, {n} problems:      after SFT   after RL")
    print(
        f"    chunked (peak context {chunked['rl'].get('peak_context', 0):.0f} tokens)"
        f"            {acc(chunked['sft']):>9}  {acc(chunked['rl']):>9}"
    )
    print(
        f"    full context (peak context {full['rl']['peak_context']:.0f} tokens)"
        f"       {acc(full['sft']):>9}  {acc(full['rl']):>9}"
    )
    print(f"  mean trace length under chunking: {chunked['rl'].get('mean_length', 0):.0f} tokens")
    print(f"  total {summary['seconds']['total']:.0f} s; {run / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
