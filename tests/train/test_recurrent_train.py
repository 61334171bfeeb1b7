"""A recurrent-depth (Huginn) preset through the SFT trainer: it learns, every step draws its
own depth from the step's key, and a run resumed from a checkpoint logs exactly what an
uninterrupted run logs (the same per-step keys, so the same depths)."""

import json
import logging
import shutil

import pytest

from jreason.config import repo_root
from jreason.model.recurrent import RecurrentConfig, load_recurrent_config
from jreason.train.config import load_train_config
from jreason.train.sft import train

DEMO = repo_root() / "configs" / "sft" / "demo.yaml"
SMALL = [
    "model.preset=tiny-recurrent",
    "model.overrides.d_model=32",
    "model.overrides.head_dim=16",
    "model.overrides.d_ff=64",
    "model.overrides.n_core=1",
    "model.overrides.mean_recurrence=3",
    "model.overrides.backprop_depth=2",
    "model.overrides.max_recurrence=8",
    "tokenizer.train_examples=300",
    "data.seq_len=64",
    "data.global_batch=8",
    "mesh.data=8",  # replicated params: the step compiles in ~2/3 of fsdp=8's time
    "mesh.fsdp=1",
    "log_every=1",
    "optim.lr=1e-2",
    "optim.schedule=constant",  # a run stopped at 4 and one of 8 see the same learning rates
    "optim.warmup_steps=0",
    "optim.weight_decay=0.0",
    "checkpoint.every=4",
    "checkpoint.async_save=false",
    "eval.num_examples=4",  # greedy eval through the sampler at the mean depth
    "eval.max_new_tokens=8",
    # demo.yaml asks for an HF export: a recurrent model is exported as a jreason directory
]


def _run(run_dir, steps: int):
    report = train(load_train_config(DEMO, [*SMALL, f"run_dir={run_dir}", f"steps={steps}"]))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return report, {r["step"]: r for r in rows if "loss" in r}


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """8 uninterrupted steps, and the warnings they logged."""
    run = tmp_path_factory.mktemp("whole") / "run"
    handler = _Warnings()
    logging.getLogger("jreason.train.sft").addHandler(handler)
    try:
        report, rows = _run(run, 8)
    finally:
        logging.getLogger("jreason.train.sft").removeHandler(handler)
    return run, report, rows, handler.messages


def test_trains_at_a_depth_sampled_per_step(whole):
    run, report, rows, warnings = whole
    assert sorted(rows) == list(range(1, 9))
    first = (rows[1]["loss"] + rows[2]["loss"]) / 2
    last = (rows[7]["loss"] + rows[8]["loss"]) / 2
    assert last < first - 0.5, [rows[s]["loss"] for s in rows]  # measured: 6.27 -> 5.13
    depths = [rows[s]["recurrence_steps"] for s in rows]
    assert all(d >= 1 and d == int(d) for d in depths)  # one microbatch: the step's own r
    assert len(set(depths)) >= 3, depths
    # the run dir's model.yaml reloads as the model that was trained
    cfg = load_recurrent_config(run / "model.yaml")
    assert isinstance(cfg, RecurrentConfig) and (cfg.d_model, cfg.n_core) == (32, 1)
    assert report["n_params"] == cfg.n_params
    # greedy eval ran; the export is a jreason model dir the engine loads at any depth
    assert 0.0 <= report["eval"]["accuracy"] <= 1.0 and report["eval"]["mean_length"] > 0
    assert not (run / "export-hf").exists()
    from jreason.decode.engine import Request
    from jreason.decode.load import load_engine

    engine, tok = load_engine(run / "export", max_slots=2, max_len=64, recurrence=5)
    assert (engine.model.decode_steps, engine.model.cfg.n_core) == (5, 1)
    rid = engine.submit(Request(tok.encode("1+2"), max_tokens=4))
    assert len(engine.run_until_idle()[rid].tokens) == 4
    with pytest.raises(ValueError, match=r"recurrence: 9 is outside \[1, max_recurrence=8\]"):
        load_engine(run / "export", recurrence=9)


def test_resumed_run_logs_what_an_uninterrupted_run_logs(whole, tmp_path):
    src, _, full, _ = whole
    # the run as if killed after its step-4 checkpoint (one train() call less than stopping a
    # second run at 4: the checkpoint is the same either way)
    run = tmp_path / "run"
    shutil.copytree(src, run)
    shutil.rmtree(run / "checkpoints" / "8")
    report, resumed = _run(run, 8)
    assert report["step"] == 8
    for step in range(5, 9):
        for key in ("loss", "recurrence_steps", "grad_norm", "accuracy"):
            assert resumed[step][key] == full[step][key], (step, key)
