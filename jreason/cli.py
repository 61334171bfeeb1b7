"""`jreason <subcommand>`: parse arguments, load config, call one entry function.

Each subcommand lives in a small `_cmd_*` function that does nothing but translate arguments
into a call into the library, so everything the CLI can do is also a Python API. Heavy imports
(jax, transformers-free model code) happen inside the commands so `jreason --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_convert(args) -> int:
    from jreason.model import hf, store

    kw = dict(param_dtype=args.param_dtype)
    if args.direction == "hf-to-jreason":
        if not store.is_hf_dir(args.src):
            raise SystemExit(f"error: {args.src} is not a Hugging Face model dir (no config.json)")
        cfg, params = hf.load_hf(args.src, **kw)
        out = store.save_model(
            args.out, cfg, params, tokenizer_dir=args.src, overwrite=args.overwrite
        )
    else:
        if not store.is_jreason_dir(args.src):
            raise SystemExit(
                f"error: {args.src} is not a jreason model dir (needs model.yaml and params/)"
            )
        cfg, params = store.load_jreason(args.src, **kw)
        out = hf.save_hf(
            args.out,
            cfg,
            params,
            tokenizer_dir=args.src,
            overwrite=args.overwrite,
            max_shard_bytes=int(args.max_shard_gb * (1 << 30)),
        )
    print(f"wrote {out} ({cfg.family}, {cfg.n_params / 1e6:.1f}M params, {cfg.param_dtype})")
    return 0


def _cmd_inspect(args) -> int:
    from jreason import config as config_lib
    from jreason.model import config as model_config
    from jreason.model import hf, store
    from jreason.model.transformer import abstract_model

    path = Path(args.path)
    if store.is_jreason_dir(path):
        kind, cfg = "jreason", store.load_config_file(path)
    elif store.is_hf_dir(path):
        kind, cfg = "huggingface", hf.config_from_hf(hf.read_config(path))
    elif not path.exists() and args.path in model_config.list_presets():
        kind, cfg = "preset", model_config.load_config(args.path)
    else:
        raise SystemExit(
            f"error: {path} is not a model directory (HF or jreason) or a preset "
            f"({', '.join(model_config.list_presets())})"
        )
    _, shapes = abstract_model(cfg)
    import jax

    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    tensors = [("/".join(str(k.key) for k in p), list(v.shape), str(v.dtype)) for p, v in flat]
    files = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    report = {
        "path": str(path),
        "kind": kind,
        "n_params": cfg.n_params,
        "config": config_lib.to_dict(cfg),
        "tensors": tensors,
        "files": files,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{path}  [{kind}]  {cfg.family}  {cfg.n_params / 1e6:.2f}M params")
    for k, v in report["config"].items():
        print(f"  {k:<14} {v}")
    print("  parameters:")
    for name, shape, dtype in tensors:
        print(f"    {name:<32} {str(tuple(shape)):<24} {dtype}")
    if files:
        print("  files: " + ", ".join(files))
    return 0


def _init_distributed(args, *, logs: bool = True) -> None:
    """Joins the other processes of a multi-process run (a no-op alone), then sets up logging.

    Runs first in every command that computes with jax: jax.distributed must start before the
    first computation, and so must the XLA:CPU thread pool's size (cpu_threads.py). Only
    process 0 logs at INFO.
    """
    from jreason import cpu_threads, distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    cpu_threads.start_backend(args.cpu_threads)
    if logs:
        distributed.setup_logging()


def _step_window(text: str) -> tuple[int, int]:
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(start), int(stop)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--profile {text!r}: expected START:STOP step numbers, e.g. 10:15"
        ) from None


def _profile_override(args) -> list[str]:
    if args.profile is None:
        return []
    return [f"profile_steps=[{args.profile[0]}, {args.profile[1]}]"]


def _cmd_train(args) -> int:
    from jreason.train.config import load_train_config
    from jreason.train.sft import train

    _init_distributed(args)
    cfg = load_train_config(args.config, [*args.overrides, *_profile_override(args)])
    report = train(cfg)
    print(json.dumps(report, indent=2))
    return 0


def _cmd_rl(args) -> int:
    from jreason.train.rl.config import load_rl_config
    from jreason.train.rl.loop import train_rl

    _init_distributed(args)
    cfg = load_rl_config(args.config, [*args.overrides, *_profile_override(args)])
    report = train_rl(cfg)
    print(json.dumps(report, indent=2))
    return 0


def _cmd_demo(args) -> int:
    """The built-in default experiment, end to end on CPU: SFT (configs/sft/demo.yaml), then
    GRPO from the SFT export (configs/rl/demo.yaml) in `run_dir/rl`.

    Overrides: `rl.KEY=VALUE` goes to the RL stage; `sft.KEY=VALUE` or a plain `KEY=VALUE` to
    the SFT stage. `rl.steps=0` stops after SFT.
    """
    from jreason.config import repo_root
    from jreason.train.config import load_train_config
    from jreason.train.rl.config import load_rl_config
    from jreason.train.rl.loop import train_rl
    from jreason.train.sft import train

    _init_distributed(args)
    sft_over = [o.removeprefix("sft.") for o in args.overrides if not o.startswith("rl.")]
    rl_over = [o.removeprefix("rl.") for o in args.overrides if o.startswith("rl.")]
    configs = repo_root() / "configs"
    cfg = load_train_config(configs / "sft" / "demo.yaml", sft_over)
    run_rl = "steps=0" not in rl_over
    if run_rl:  # a bad RL override fails now, not after minutes of SFT
        if not cfg.export.hf:
            raise ValueError("demo: the RL stage starts from the SFT export: keep export.hf=true")
        run_dir = Path(cfg.run_dir)
        rl_cfg = load_rl_config(
            configs / "rl" / "demo.yaml",
            [f"run_dir={run_dir / 'rl'}", f"model.init_from={run_dir / 'export-hf'}", *rl_over],
        )
    report = train(cfg)
    run_dir = Path(report["run_dir"])
    ev = report.get("eval", {})
    lines = [
        f"demo: {cfg.data.task} task, {report['n_params'] / 1e6:.2f}M-param model",
        f"  SFT: {report['step']} steps, final train loss {report['final_loss']:.4f}",
    ]
    if ev:
        lines.append(
            f"  SFT held-out accuracy     {ev['accuracy']:.1%} "
            f"(greedy, {cfg.eval.num_examples} unseen problems)"
        )
    lines.append(f"  SFT run directory         {run_dir}  (report.json, plot.png, export-hf/)")
    if run_rl:
        rl = train_rl(rl_cfg)
        mk = rl_cfg.rollout.markovian
        algo = f"Delethink (C={mk.chunk_size}, I={mk.max_chunks})" if mk.chunk_size else "GRPO"
        lines.append(f"  {algo}: {rl['step']} steps from the SFT export")
        if "eval" in rl:
            before = rl.get("eval_before", {})
            n = rl_cfg.eval.num_examples
            shown = f"{before['accuracy']:.1%} -> " if "accuracy" in before else ""
            lines.append(
                f"  RL held-out accuracy      {shown}{rl['eval']['accuracy']:.1%} "
                f"(greedy through the engine, {n} unseen problems)"
            )
            if mk.chunk_size:
                lines.append(
                    f"  peak context per sequence {rl['eval']['peak_context']:.0f} tokens "
                    f"(mean trace {rl['eval']['mean_length']:.0f} tokens)"
                )
        lines.append(f"  RL run directory          {rl['run_dir']}  (report.json, plot.png)")
    print()
    print("\n".join(lines))
    return 0


def _generate_options(args):
    from jreason.jobs.generate import GenerateOptions

    return GenerateOptions(
        n=args.n,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
        stop=tuple(args.stop),
        chat=not args.raw_prompt,
        enable_thinking=not args.no_thinking,
        min_thinking_tokens=args.min_thinking_tokens,
        max_thinking_tokens=args.max_thinking_tokens,
        continuation=args.continuation,
        answer_prefix=args.answer_prefix,
        max_answer_tokens=args.max_answer_tokens,
        chunk_size=args.chunk_size,
        keep_head=args.keep_head,
        keep_tail=args.keep_tail,
        max_chunks=args.max_chunks,
        max_slots=args.max_slots,
        max_len=args.max_len,
        logprobs=getattr(args, "logprobs", False),
        soft_thinking=args.soft_thinking,
        soft_top_k=args.soft_top_k,
        soft_top_p=args.soft_top_p,
        soft_min_p=args.soft_min_p,
        soft_temperature=args.soft_temperature,
        cold_stop_entropy=args.cold_stop_entropy,
        cold_stop_steps=args.cold_stop_steps,
    )


def _engine_kw(args, opts) -> dict:
    return dict(
        max_slots=opts.max_slots,
        max_len=opts.max_len,
        param_dtype=args.param_dtype,
        recurrence=args.recurrence,
        exit_threshold=args.exit_threshold,
    )


def _cmd_generate(args) -> int:
    from jreason.decode.load import load_engine
    from jreason.jobs.generate import run_generate

    _init_distributed(args, logs=False)
    opts = _generate_options(args)
    if not Path(args.input).is_file():
        raise FileNotFoundError(f"--input {args.input} not found")
    engine, tokenizer = load_engine(args.model, **_engine_kw(args, opts))
    stats = run_generate(engine, tokenizer, args.input, args.output, opts)
    print(json.dumps(stats, indent=2))
    return 0


def _budget(text: str) -> int | None:
    if text.lower() in ("none", "inf", "unlimited"):
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"budget {text!r} must be >= 1 or 'none'")
    return value


def _cmd_eval(args) -> int:
    from jreason.config import parse_knobs
    from jreason.decode.load import load_engine
    from jreason.jobs.sweep import run_eval

    _init_distributed(args, logs=False)
    opts = _generate_options(args)
    engine, tokenizer = load_engine(args.model, **_engine_kw(args, opts))
    summary = run_eval(
        engine,
        tokenizer,
        args.out,
        opts,
        input_path=args.input,
        task=args.task,
        knobs=parse_knobs(args.knob),
        num=args.num,
        seed=args.problem_seed,
        budgets=tuple(args.budgets),
    )
    from jreason.jobs.evaluate import format_table

    print(format_table(summary))
    print(f"report: {Path(args.out) / 'report'}")
    return 0


def _cmd_serve(args) -> int:
    from jreason.serve.server import ServeOptions, serve

    _init_distributed(args)
    opts = ServeOptions(
        host=args.host,
        port=args.port,
        max_slots=args.max_slots,
        max_len=args.max_len,
        api_key=args.api_key,
        max_queue=args.max_queue,
        max_n=args.max_n,
        max_body_bytes=args.max_body_bytes,
        model_name=args.served_model_name,
    )
    serve(
        args.model,
        opts,
        param_dtype=args.param_dtype,
        recurrence=args.recurrence,
        exit_threshold=args.exit_threshold,
    )
    return 0


def _add_depth_flags(p) -> None:
    g = p.add_argument_group("recurrent depth (Huginn models only)")
    g.add_argument(
        "--recurrence", type=int, default=None,
        help="core iterations per token (default the model's mean_recurrence; the cap with "
        "--exit-threshold)",
    )  # fmt: skip
    g.add_argument(
        "--exit-threshold", type=float, default=None,
        help="adaptive depth: a token stops iterating when KL(step i || step i-1) < this",
    )  # fmt: skip


def _add_generation_flags(p) -> None:
    p.add_argument("--model", required=True, help="Hugging Face or jreason model directory")
    p.add_argument("--param-dtype", choices=["float32", "bfloat16", "float16"], default=None)
    _add_depth_flags(p)
    g = p.add_argument_group("sampling")
    g.add_argument("--n", type=int, default=1, help="samples per prompt")
    g.add_argument("--max-tokens", type=int, default=1024, help="cap on the whole completion")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--raw-prompt", action="store_true", help="no chat template for 'prompt'")
    g.add_argument("--no-thinking", action="store_true", help="enable_thinking=False")
    g = p.add_argument_group("thinking budgets (s1 budget forcing, Elastic Reasoning)")
    g.add_argument("--min-thinking-tokens", type=int, default=0)
    g.add_argument("--max-thinking-tokens", type=int, default=None)
    g.add_argument("--continuation", default="Wait", help="replaces an early </think>")
    g.add_argument("--answer-prefix", default="", help="follows a forced </think>")
    g.add_argument("--max-answer-tokens", type=int, default=None, help="solution budget")
    g = p.add_argument_group("Markovian thinking (Delethink)")
    g.add_argument("--chunk-size", type=int, default=None, help="C; enables Markovian mode")
    g.add_argument("--keep-head", type=int, default=0)
    g.add_argument("--keep-tail", type=int, default=None, help="default C/2 - keep_head")
    g.add_argument("--max-chunks", type=int, default=8)
    g = p.add_argument_group(
        "Soft Thinking",
        "think in concept tokens (embedding mixtures); the sampling flags then shape the answer "
        "and --max-thinking-tokens caps the soft steps",
    )
    g.add_argument("--soft-thinking", action="store_true", help="enable (decode/soft.py)")
    g.add_argument("--soft-top-k", type=int, default=15, help="tokens mixed per concept")
    g.add_argument("--soft-top-p", type=float, default=0.95)
    g.add_argument("--soft-min-p", type=float, default=0.0)
    g.add_argument("--soft-temperature", type=float, default=0.6)
    g.add_argument(
        "--cold-stop-entropy", type=float, default=None, help="Cold Stop threshold, nats (off)"
    )
    g.add_argument("--cold-stop-steps", type=int, default=256, help="low-entropy steps in a row")
    g = p.add_argument_group("engine")
    g.add_argument("--max-slots", type=int, default=16, help="concurrent sequences")
    g.add_argument(
        "--max-len",
        type=int,
        default=None,
        help="KV cache length per slot (default: the model's, at most 4096)",
    )


def distributed_flags() -> argparse.ArgumentParser:
    """The multi-process flags and --cpu-threads: a parent parser shared by every command that
    runs jax work (both must act before the first computation)."""
    from jreason.distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group(
        "multi-process",
        "all three or none; automatic on SLURM, Open MPI, Cloud TPU and Kubernetes Jobs",
    )
    g.add_argument(
        "--coordinator", metavar="HOST:PORT", help=f"process 0's address (or {ENV_COORDINATOR})"
    )
    g.add_argument(
        "--num-processes", type=int, metavar="N", help=f"processes in the run ({ENV_NUM_PROCESSES})"
    )
    g.add_argument(
        "--process-id", type=int, metavar="I", help=f"this process, 0..N-1 ({ENV_PROCESS_ID})"
    )
    p.add_argument(
        "--cpu-threads",
        metavar="N",
        help="XLA:CPU threads per op (or JREASON_CPU_THREADS; default: every core). 1 is faster "
        "for tiny models on CPU; see jreason/cpu_threads.py",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jreason", description="Train and serve reasoning language models with JAX."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    dist = [distributed_flags()]  # train, demo, generate, eval, serve (and any new jax command)

    p = sub.add_parser(
        "convert",
        help="convert checkpoints between Hugging Face and jreason formats",
        description="hf-to-jreason DIR OUT | jreason-to-hf CKPT OUT",
    )
    p.add_argument("direction", choices=["hf-to-jreason", "jreason-to-hf"])
    p.add_argument("src", help="source model directory")
    p.add_argument("out", help="output directory (written atomically)")
    p.add_argument("--param-dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--max-shard-gb", type=float, default=4.0, help="safetensors shard size")
    p.set_defaults(fn=_cmd_convert)

    p = sub.add_parser(
        "train",
        parents=dist,
        help="supervised fine-tuning from a YAML experiment config",
        description="jreason train --config configs/sft/demo.yaml optim.lr=3e-4 mesh.fsdp=4",
    )
    p.add_argument("--config", required=True, help="experiment YAML (configs/sft/*.yaml)")
    p.add_argument(
        "--profile",
        type=_step_window,
        metavar="START:STOP",
        help="JAX profiler trace of steps START..STOP-1 in RUN_DIR/profile (= profile_steps)",
    )
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.set_defaults(fn=_cmd_train)

    p = sub.add_parser(
        "rl",
        parents=dist,
        help="RL (GRPO, Dr. GRPO, DAPO, Delethink) with rollouts from the decode engine",
        description="jreason rl --config configs/rl/demo.yaml algo.eps_high=0.28",
    )
    p.add_argument("--config", required=True, help="experiment YAML (configs/rl/*.yaml)")
    p.add_argument(
        "--profile",
        type=_step_window,
        metavar="START:STOP",
        help="JAX profiler trace of steps START..STOP-1 in RUN_DIR/profile (= profile_steps)",
    )
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.set_defaults(fn=_cmd_rl)

    p = sub.add_parser(
        "demo",
        parents=dist,
        help="the built-in default: tokenizer + tiny model SFT + eval, CPU, no downloads",
    )
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of configs/sft/demo.yaml")
    p.set_defaults(fn=_cmd_demo)

    p = sub.add_parser(
        "generate",
        parents=dist,
        help="resumable batch inference over a JSONL file of prompts",
        description="jreason generate --model DIR --input prompts.jsonl --output out.jsonl",
    )
    p.add_argument("--input", required=True, help='JSONL: {"id", "prompt" | "messages", ...}')
    p.add_argument("--output", required=True, help="JSONL results, appended; rerun to resume")
    p.add_argument("--logprobs", action="store_true", help="also write token ids and logprobs")
    _add_generation_flags(p)
    p.set_defaults(fn=_cmd_generate)

    p = sub.add_parser(
        "eval",
        parents=dist,
        help="accuracy, pass@k, maj@k and accuracy vs thinking budget",
        description="jreason eval --model DIR --task arithmetic --n 4 --budgets 32 64 none",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="a procedural task (graded by its checker)")
    src.add_argument("--input", help='JSONL with "prompt"/"messages" and "answer"')
    p.add_argument("--knob", action="append", default=[], help="task knob key=value")
    p.add_argument("--num", type=int, default=64, help="task problems")
    p.add_argument("--problem-seed", type=int, default=1234, help="task problem stream")
    p.add_argument("--budgets", nargs="+", type=_budget, default=[None], help="ints or none")
    p.add_argument("--out", required=True, help="output directory (resumable)")
    _add_generation_flags(p)
    p.set_defaults(fn=_cmd_eval)

    p = sub.add_parser(
        "serve",
        parents=dist,
        help="OpenAI-compatible HTTP server (completions, chat, streaming, reasoning_content)",
        description="jreason serve --model DIR --port 8000 --max-slots 16 --api-key KEY",
    )
    p.add_argument("--model", required=True, help="Hugging Face or jreason model directory")
    p.add_argument("--param-dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="default: the model dir's name")
    p.add_argument("--max-slots", type=int, default=16, help="concurrent sequences")
    p.add_argument("--max-len", type=int, default=None, help="KV cache per slot (default <= 4096)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    p.add_argument("--max-n", type=int, default=8, help="largest n (choices) per request")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger bodies get 413")
    _add_depth_flags(p)
    p.set_defaults(fn=_cmd_serve)

    p = sub.add_parser("inspect", help="show a model's config, size and tensors")
    p.add_argument("path", help="HF dir, jreason dir or preset name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (
        FileNotFoundError,
        FileExistsError,
        ValueError,
        RuntimeError,
    ) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
