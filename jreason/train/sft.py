"""Supervised fine-tuning: the cross-entropy loss and the training loop around the shared step.

`train(cfg)` is what `jreason train` and `make demo` run:

    tokenizer (given, or trained on the task's text) -> model (preset or checkpoint) ->
    grain iterator -> jitted step (sharded, donated) -> metrics / checkpoints / eval -> export

A recurrent-depth preset (`family: recurrent`, model/recurrent.py) trains with
`recurrent_cross_entropy`, the step's per-microbatch key choosing each step's depth; it is
evaluated at its mean depth and `export.hf` writes it as a jreason model directory (it has no
HF format), which `jreason eval --recurrence R` loads.

Resuming is automatic: if `run_dir/checkpoints` holds a readable checkpoint, state and data
position are restored from it and the run continues as if never interrupted (the exactness test
kills a real process and compares final params bitwise). SIGTERM saves and exits cleanly.

Multi-process runs (`jreason train --coordinator ...`, see jreason/distributed.py) run this same
function on every process: each feeds its own rows of the global batch, and every process takes
part in the step, checkpointing and the export's gather; only process 0 writes the config,
metrics, report, plot and export.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import jax
import numpy as np

from jreason import config as config_lib
from jreason import distributed
from jreason.data import pipeline
from jreason.model.recurrent import recurrent_cross_entropy_loss
from jreason.train import checkpoint as ckpt_lib
from jreason.train import metrics as metrics_lib
from jreason.train import state as state_lib
from jreason.train.config import TrainConfig
from jreason.train.profiling import StepProfiler
from jreason.train.setup import (
    build_model,
    build_tokenizer,
    evaluate,
    is_recurrent,
    make_mesh,
    param_axes,
    tokenizer_dir,
)
from jreason.train.step import batch_sharding, compile_step, make_train_step

log = logging.getLogger(__name__)


def cross_entropy_loss(model, params, mb):
    """Sum of next-token cross-entropy over loss-mask tokens (prompt and padding excluded).

    With `model.logits_chunk` set, the logits are computed chunk by chunk (model/vocab_head.py).
    """
    stats = model.token_stats(
        params, mb["inputs"], mb["positions"], mb["segment_ids"], mb["targets"]
    )
    mask_bt = mb["loss_mask"]
    ce_sum = -(stats["logp"] * mask_bt).sum()
    return ce_sum, {"n_tokens": mask_bt.sum(), "accuracy": (stats["correct"] * mask_bt).sum()}


# recurrent_cross_entropy: the same loss at a depth sampled per step (model/recurrent.py)
LOSSES = {
    "cross_entropy": cross_entropy_loss,
    "recurrent_cross_entropy": recurrent_cross_entropy_loss,
}


def to_global_batch(local: dict, mesh, grad_accum: int) -> dict:
    """Process-local rows (b, T) -> global (A, B/A, T) arrays sharded over data/fsdp."""
    sh = batch_sharding(mesh)
    out = {}
    for k, x in local.items():
        x = np.asarray(x)
        x = x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])
        global_shape = (grad_accum, x.shape[1] * jax.process_count(), *x.shape[2:])
        out[k] = jax.make_array_from_process_local_data(sh, x, global_shape)
    return out


def train(cfg: TrainConfig) -> dict:
    run_dir = Path(cfg.run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    is_main = distributed.is_main()
    mesh = make_mesh(cfg.mesh)
    tokenizer = build_tokenizer(cfg, run_dir)
    model, params, model_cfg = build_model(cfg, tokenizer, mesh)
    if is_main:
        config_lib.save(cfg, run_dir / "config.yaml")
        config_lib.save(model_cfg, run_dir / "model.yaml")
    recurrent = is_recurrent(model_cfg)

    def run_eval(params) -> dict:
        return evaluate(cfg, model, params, tokenizer)

    data_iter = pipeline.build_iterator(
        cfg.data, tokenizer, process_index=jax.process_index(), process_count=jax.process_count()
    )
    optimizer, schedule = state_lib.make_optimizer(cfg.optim, cfg.steps)
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
    start = 0
    if cfg.checkpoint.resume:
        target = state_lib.abstract_state(optimizer, shapes, st_shardings, cfg.seed)
        restored = checkpointer.restore_latest(target)
        if restored is not None:
            start, state, data_state = restored
            data_iter.set_state(data_state)
            if is_main:
                log.info("resumed from %s at step %d", checkpointer.directory, start)

    loss_fn = LOSSES["recurrent_cross_entropy" if recurrent else "cross_entropy"]
    step_fn = compile_step(make_train_step(model, optimizer, schedule, loss_fn), st_shardings, mesh)
    flops_per_token = metrics_lib.train_flops_per_token(model_cfg, cfg.data.seq_len)
    device_kind = jax.devices()[0].device_kind
    logger = metrics_lib.MetricsLogger(
        run_dir, enabled=is_main, total_steps=cfg.steps, start_step=start
    )
    config_dict = config_lib.to_dict(cfg)

    def save(step: int) -> None:
        checkpointer.save(step, state, data_iter.get_state(), config_dict)

    last_eval: dict = {}
    t_last, tokens_since = time.perf_counter(), 0.0
    pending = []  # (step, metrics) not yet fetched to host: keeps dispatch asynchronous
    preempted = False
    profiler = StepProfiler(cfg.profile_steps, run_dir / "profile")
    with ckpt_lib.PreemptionFlag() as preempt, profiler:
        for step in range(start + 1, cfg.steps + 1):
            profiler.before(step)
            batch = to_global_batch(next(data_iter), mesh, cfg.optim.grad_accum)
            state, metrics = step_fn(state, batch)
            pending.append((step, metrics))
            profiler.after(step, state)
            if step % cfg.log_every == 0 or step == cfg.steps:
                host = [(s, jax.device_get(m)) for s, m in pending]
                pending.clear()
                now = time.perf_counter()
                tokens_since += sum(float(m["tokens"]) for _, m in host)
                tok_s = tokens_since / max(now - t_last, 1e-9)
                for s, m in host:
                    row = {k: float(v) for k, v in m.items()}
                    if s == step:
                        row["tokens_per_s"] = tok_s
                        row["mfu"] = metrics_lib.mfu(
                            tok_s, flops_per_token, device_kind, jax.device_count()
                        )
                    logger.log(s, row)
                t_last, tokens_since = now, 0.0
            if cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.steps:
                last_eval = run_eval(state["params"])
                logger.log(step, {f"eval_{k}": v for k, v in last_eval.items()})
            if step % cfg.checkpoint.every == 0 or step == cfg.steps:
                save(step)
            if preempt.agreed():
                if step % cfg.checkpoint.every:
                    save(step)
                log.warning("SIGTERM: saved step %d, exiting", step)
                preempted = True
                break
    checkpointer.wait()
    final_step = int(jax.device_get(state["step"]))
    report = {"run_dir": str(run_dir), "step": final_step, "preempted": preempted}
    if not preempted:
        last_eval = run_eval(state["params"])
        logger.log(final_step, {f"eval_{k}": v for k, v in last_eval.items()})
        report["eval"] = last_eval
        if cfg.export.hf:
            out = run_dir / ("export" if recurrent else "export-hf")  # a jreason dir / an HF dir
            ckpt_lib.export_hf(out, model_cfg, state["params"], tokenizer_dir(cfg, run_dir))
    logger.close()
    checkpointer.close()
    if is_main:
        records = metrics_lib.read_jsonl(run_dir / "metrics.jsonl")
        losses = [r["loss"] for r in records if r.get("loss") is not None]
        report |= {
            "final_loss": losses[-1] if losses else None,
            "n_params": model_cfg.n_params,
            "mesh": dict(mesh.shape),
            "device": device_kind,
        }
        (run_dir / "report.json").write_text(json.dumps(report, indent=2))
        metrics_lib.plot_metrics(records, run_dir / "plot.png", keys=("loss", "eval_accuracy"))
    return report
