"""The RL loop (`jreason rl`): on-policy rollouts from the decode engine, then clipped updates.

    for each step:
        engine.set_params(current params)             # in memory, no recompilation, no copy
        groups = P prompts x G completions             # rollout.py, through decode/engine.py
        (DAPO dynamic sampling: drop all-equal groups, top up for <= max_rounds rounds)
        advantages (advantages.py) -> rows (rollout.py) -> old log-probs (trainer or engine)
        epochs x minibatches optimizer updates          # the shared step.py, losses.py

Everything around it is the SFT trainer's: mesh, tokenizer, model, optimizer, state shardings,
orbax checkpoints (the rollout position - the next prompt index - is saved as the data state,
and sampling seeds derive from (seed, step, prompt, sample), so a resumed run draws the same
completions), metrics JSONL + TensorBoard + progress bar, HF export.

Evaluation is greedy through the same engine with the rollout's Markovian settings, so "after
RL" is measured the way the policy was trained to decode.

Left out: separate rollout workers (the engine shares the trainer's devices and process; every
process of a multi-host run generates the whole step's rollouts with the same seeds and feeds
its own rows), value models, and asynchronous (off-policy) rollouts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import jax
import numpy as np

from jreason import config as config_lib
from jreason import distributed
from jreason.data import pipeline
from jreason.data.tasks.base import Example
from jreason.decode.engine import Engine
from jreason.train import checkpoint as ckpt_lib
from jreason.train import metrics as metrics_lib
from jreason.train import state as state_lib
from jreason.train.profiling import StepProfiler
from jreason.train.rl import rollout as rollout_lib
from jreason.train.rl.advantages import compute_advantages
from jreason.train.rl.config import RLConfig
from jreason.train.rl.losses import make_loss, token_logprobs
from jreason.train.rl.rewards import combine
from jreason.train.setup import (
    build_model,
    build_tokenizer,
    is_recurrent,
    make_mesh,
    param_axes,
    tokenizer_dir,
)
from jreason.train.sft import to_global_batch
from jreason.train.step import compile_step, make_train_step

log = logging.getLogger(__name__)


class PromptSource:
    """Training prompts by index (task stream or JSONL/Parquet records, in a seeded order)."""

    def __init__(self, cfg: RLConfig):
        self.data = cfg.data
        if cfg.data.source == "task":
            self.records = pipeline._TaskRecords(cfg.data, "train")
            self.task_name = cfg.data.task
        elif cfg.data.source in ("jsonl", "parquet"):
            paths = pipeline.expand_paths(cfg.data.paths, "paths")
            self.records, _ = pipeline.read_records(paths, cfg.data)
            self.task_name = None
        else:
            raise config_lib.ConfigError(
                f"data.source={cfg.data.source!r}: RL reads prompts from a task, jsonl or parquet"
            )
        if not len(self.records):
            raise config_lib.ConfigError("data: the prompt source holds no records")

    def examples(self, start: int, n: int) -> list:
        out = []
        for i in range(start, start + n):
            epoch, j = divmod(i, len(self.records))
            if self.data.shuffle:
                order = np.random.default_rng([self.data.seed, epoch]).permutation(
                    len(self.records)
                )
                j = int(order[j])
            r = self.records[j]
            if "messages" in r:
                raise ValueError(f"{r['where']}: RL needs problem/answer records, not messages")
            out.append(Example(r["id"], r["prompt"], r.get("reasoning", ""), r["answer"]))
        return out


def collect(engine, tokenizer, source, cfg: RLConfig, reward, step: int, next_prompt: int):
    """(groups, next prompt index, groups filtered, rounds) for one step."""
    r = cfg.rollout
    kept, filtered, rounds = [], 0, 0
    while len(kept) < r.prompts_per_step and rounds < r.max_rounds:
        need = r.prompts_per_step - len(kept)
        examples = source.examples(next_prompt, need)
        groups = rollout_lib.generate_groups(
            engine,
            tokenizer,
            examples,
            r,
            reward,
            task_name=source.task_name,
            seed=cfg.seed,
            step=step,
            first_prompt=next_prompt,
            thinking=cfg.data.thinking,
        )
        next_prompt += need
        rounds += 1
        if not r.dynamic_sampling:
            return groups, next_prompt, 0, rounds
        for g in groups:
            if len({s.reward for s in g}) > 1:
                kept.append(g)
            else:
                filtered += 1
    # out of rounds: the batch is topped up with rows of zero advantage (they weigh nothing)
    return kept, next_prompt, filtered, rounds


def evaluate_engine(engine, tokenizer, cfg: RLConfig, n: int | None = None) -> dict:
    """Greedy held-out accuracy through the engine, with the rollout's Markovian settings."""
    n = n or cfg.eval.num_examples
    examples = pipeline.eval_examples(cfg.data, n)
    greedy = dataclasses.replace(cfg.rollout, group_size=1, temperature=0.0)
    reward = combine({"correct": 1.0})
    groups = rollout_lib.generate_groups(
        engine,
        tokenizer,
        examples,
        greedy,
        reward,
        task_name=cfg.data.task if cfg.data.source == "task" else None,
        seed=cfg.seed,
        step=0,
        thinking=cfg.data.thinking,
    )
    samples = [g[0] for g in groups]
    return {
        "accuracy": float(np.mean([s.parts["correct"] for s in samples])),
        "mean_length": float(np.mean([len(s.result.tokens) for s in samples])),
        "peak_context": float(max(s.result.peak_context for s in samples)),
    }


def _local_rows(rows: dict, lo: int, hi: int) -> dict:
    """This process's share of rows lo..hi (every process built the same rows)."""
    per = (hi - lo) // jax.process_count()
    a = lo + jax.process_index() * per
    return {k: v[a : a + per] for k, v in rows.items()}


def train_rl(cfg: RLConfig) -> dict:
    run_dir = Path(cfg.run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    is_main = distributed.is_main()
    mesh = make_mesh(cfg.mesh)
    tokenizer = build_tokenizer(cfg, run_dir)
    model, params, model_cfg = build_model(cfg, tokenizer, mesh)
    if is_main:
        config_lib.save(cfg, run_dir / "config.yaml")
        config_lib.save(model_cfg, run_dir / "model.yaml")
    r, a = cfg.rollout, cfg.algo
    reward = combine(a.rewards)
    source = PromptSource(cfg)

    updates_per_step = a.epochs * a.minibatches
    optimizer, schedule = state_lib.make_optimizer(cfg.optim, cfg.steps * updates_per_step)
    axes = param_axes(model_cfg)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    st_shardings = state_lib.state_shardings(optimizer, shapes, axes, mesh)
    state = jax.jit(
        lambda p: state_lib.init_state(p, optimizer, cfg.seed), out_shardings=st_shardings
    )(params)
    del params

    checkpointer = ckpt_lib.Checkpointer(
        run_dir, max_to_keep=cfg.checkpoint.max_to_keep, async_save=cfg.checkpoint.async_save
    )
    start, next_prompt = 0, 0
    if cfg.checkpoint.resume:
        target = state_lib.abstract_state(optimizer, shapes, st_shardings, cfg.seed)
        restored = checkpointer.restore_latest(target)
        if restored is not None:
            start, state, data_state = restored
            next_prompt = int(data_state["next_prompt"])
            if is_main:
                log.info("resumed from %s at step %d", checkpointer.directory, start)

    markovian = r.markovian.chunk_size > 0
    loss_agg = "delethink" if markovian else a.loss_agg
    loss_fn = make_loss(
        "ppo_clip",
        eps_low=a.eps_low,
        eps_high=a.eps_high,
        kl_coef=a.kl_coef,
        kl_estimator=a.kl_estimator,
        entropy_coef=a.entropy_coef,
        tis_cap=a.tis_cap,
        temperature=r.temperature,
    )
    step_fn = compile_step(make_train_step(model, optimizer, schedule, loss_fn), st_shardings, mesh)
    # (A, b, T) batches: one microbatch at a time, as the step sees them
    old_logprobs_fn = jax.jit(
        lambda p, batch: jax.lax.map(
            lambda b: token_logprobs(
                model, p, b["inputs"], b["positions"], b["segment_ids"], b["targets"], r.temperature
            )[0],
            batch,
        )
    )
    # KL needs the frozen initial policy: a copy of the starting weights (a resumed run's
    # checkpoint holds the current ones, so the reference is re-read from model.init_from)
    ref_params = None
    if a.kl_coef:
        ref_params = jax.tree.map(jax.numpy.copy, state["params"])
        if start:
            _, init_params, _ = build_model(cfg, tokenizer, mesh)
            ref_params = jax.device_put(init_params, st_shardings["params"])
    # the engine's cache holds a prompt + completion (or query + chunk): one training row
    engine = Engine(
        model,
        state["params"],
        max_slots=r.max_slots,
        max_len=min(cfg.data.seq_len + 1, model_cfg.max_seq_len),
        pad_id=tokenizer.pad_id or 0,
        detokenize=tokenizer.decode,
    )
    logger = metrics_lib.MetricsLogger(
        run_dir, enabled=is_main, total_steps=cfg.steps, start_step=start
    )
    n_rows, mb_rows = cfg.rows_per_step, cfg.rows_per_step // a.minibatches
    max_len_norm = a.max_len_norm or r.max_tokens

    def save(step: int) -> None:
        checkpointer.save(step, state, {"next_prompt": next_prompt}, config_lib.to_dict(cfg))

    report: dict = {"run_dir": str(run_dir)}
    if start == 0 and cfg.eval.num_examples:
        report["eval_before"] = evaluate_engine(engine, tokenizer, cfg)
        logger.log(0, {f"eval_{k}": v for k, v in report["eval_before"].items()})
    preempted = False
    profiler = StepProfiler(cfg.profile_steps, run_dir / "profile")
    with ckpt_lib.PreemptionFlag() as preempt, profiler:
        for step in range(start + 1, cfg.steps + 1):
            profiler.before(step)  # the trace covers rollouts and updates
            t0 = time.perf_counter()
            engine.set_params(state["params"])
            groups, next_prompt, filtered, rounds = collect(
                engine, tokenizer, source, cfg, reward, step, next_prompt
            )
            t_rollout = time.perf_counter() - t0
            rewards_pg = np.array([[s.reward for s in g] for g in groups], np.float32)
            adv_pg = np.asarray(compute_advantages(a.advantage, rewards_pg))
            rows = rollout_lib.build_rows(
                groups,
                adv_pg,
                n_rows=n_rows,
                seq_len=cfg.data.seq_len,
                loss_agg=loss_agg,
                max_len_norm=max_len_norm,
                pad_id=tokenizer.pad_id or 0,
            )
            # minibatches: a seeded shuffle of the rows, so groups mix across updates
            order = np.random.default_rng([cfg.seed, step]).permutation(n_rows)
            rows = {k: v[order] for k, v in rows.items()}
            batches = []
            for m in range(a.minibatches):
                local = _local_rows(rows, m * mb_rows, (m + 1) * mb_rows)
                # NaN = "the current policy": the first update runs at the rollout's weights, so
                # the loss takes pi_old from its own forward (losses.py), no extra pass
                local["old_logprobs_bt"] = (
                    local["engine_logprobs_bt"]
                    if a.old_logprobs == "engine"
                    else np.full_like(local["loss_mask"], np.nan)
                )
                batch = to_global_batch(local, mesh, cfg.optim.grad_accum)
                if a.old_logprobs == "trainer" and (m or a.epochs > 1):
                    batch["old_logprobs_bt"] = old_logprobs_fn(state["params"], batch)
                if ref_params is not None:
                    batch["ref_logprobs_bt"] = old_logprobs_fn(ref_params, batch)
                if a.tis_cap is None:
                    del batch["engine_logprobs_bt"]
                batches.append(batch)
            t1 = time.perf_counter()
            metrics = []
            for _ in range(a.epochs):
                for batch in batches:
                    state, m = step_fn(state, batch)
                    metrics.append(m)
            metrics = jax.device_get(metrics)
            t_update = time.perf_counter() - t1
            profiler.after(step, state)
            row = {
                k: float(np.mean([m[k] for m in metrics]))
                for k in metrics[0]
                if k not in ("tokens", "token_count")
            }
            row |= rollout_lib.rollout_stats(groups)
            row |= {
                "groups_filtered": filtered,
                "rollout_rounds": rounds,
                "rollout_s": t_rollout,
                "update_s": t_update,
                "loss_tokens": float(sum(m["token_count"] for m in metrics)) / a.epochs,
            }
            logger.log(step, row)
            if cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.steps:
                engine.set_params(state["params"])
                ev = evaluate_engine(engine, tokenizer, cfg)
                logger.log(step, {f"eval_{k}": v for k, v in ev.items()})
            if step % cfg.checkpoint.every == 0 or step == cfg.steps:
                save(step)
            if preempt.agreed():
                if step % cfg.checkpoint.every:
                    save(step)
                log.warning("SIGTERM: saved step %d, exiting", step)
                preempted = True
                break
    checkpointer.wait()
    report |= {"step": int(jax.device_get(state["step"])) // updates_per_step}
    report["preempted"] = preempted
    if not preempted:
        if cfg.eval.num_examples:
            engine.set_params(state["params"])
            report["eval"] = evaluate_engine(engine, tokenizer, cfg)
            logger.log(cfg.steps, {f"eval_{k}": v for k, v in report["eval"].items()})
        if cfg.export.hf:
            out = run_dir / ("export" if is_recurrent(model_cfg) else "export-hf")  # as SFT's
            ckpt_lib.export_hf(out, model_cfg, state["params"], tokenizer_dir(cfg, run_dir))
    logger.close()
    checkpointer.close()
    if is_main:
        report["mesh"] = dict(mesh.shape)
        (run_dir / "report.json").write_text(json.dumps(report, indent=2))
        records = metrics_lib.read_jsonl(run_dir / "metrics.jsonl")
        metrics_lib.plot_metrics(
            records,
            run_dir / "plot.png",
            keys=("reward", "response_length", "eval_accuracy", "token_entropy"),
        )
    return report
