"""Checkpoints resume exactly: a real SIGKILL mid-run, SIGTERM, a new mesh, a corrupt checkpoint."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jreason.config import repo_root
from jreason.train.config import load_train_config
from jreason.train.sft import train

SMALL = [
    "steps=16",
    "log_every=1",
    "checkpoint.every=8",
    "checkpoint.async_save=true",
    "eval.num_examples=0",
    "export.hf=false",
    "tokenizer.train_examples=300",
    "data.seq_len=128",
    "data.global_batch=8",
    "model.overrides.n_layers=2",
    "model.overrides.d_model=64",
    "model.overrides.d_ff=128",
    "optim.warmup_steps=2",
]
DEMO = repo_root() / "configs" / "sft" / "demo.yaml"


def _cmd(run_dir, *extra):
    return [
        sys.executable,
        "-m",
        "jreason",
        "train",
        "--config",
        str(DEMO),
        f"run_dir={run_dir}",
        *SMALL,
        *extra,
    ]


def _env(devices=1):
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )


def _losses(run_dir) -> dict[int, float]:
    """step -> loss, the last record of each step winning (a resumed run re-logs steps)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def _params(run_dir, step):
    with ocp.StandardCheckpointer() as c:
        state = c.restore(Path(run_dir).absolute() / "checkpoints" / str(step) / "state")
    return state["params"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("a") / "run"
    subprocess.run(_cmd(run), env=_env(), check=True, capture_output=True)
    return run


def test_sigkill_then_resume_is_bitwise_identical(uninterrupted, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _cmd(run), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    committed = run / "checkpoints" / "8"
    deadline = time.time() + 300
    while not committed.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert committed.is_dir(), "checkpoint 8 never appeared"
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "checkpoints" / "16").exists()

    subprocess.run(_cmd(run), env=_env(), check=True, capture_output=True)
    a, b = _params(uninterrupted, 16), _params(run, 16)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    la, lb = _losses(uninterrupted), _losses(run)
    assert [la[s] for s in range(9, 17)] == [lb[s] for s in range(9, 17)]


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _cmd(run, "steps=400", "checkpoint.every=1000"),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and len(_losses(run)) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    report = json.loads((run / "report.json").read_text())
    assert report["preempted"] is True
    assert 3 <= report["step"] < 400
    assert (run / "checkpoints" / str(report["step"])).is_dir()


def test_resume_on_a_different_mesh(tmp_path):
    # a constant schedule, so stopping at 4 of 4 and going on to 8 sees the same learning rates
    common = [*SMALL, "checkpoint.every=4", "optim.schedule=constant"]
    ref = train(
        load_train_config(DEMO, [*common, f"run_dir={tmp_path / 'ref'}", "steps=8", "mesh.fsdp=8"])
    )
    assert ref["step"] == 8
    run = tmp_path / "run"
    train(load_train_config(DEMO, [*common, f"run_dir={run}", "steps=4", "mesh.fsdp=8"]))
    second = load_train_config(
        DEMO, [*common, f"run_dir={run}", "steps=8", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    )
    report = train(second)
    assert report["step"] == 8 and report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    lr, lb = _losses(tmp_path / "ref"), _losses(run)
    np.testing.assert_allclose(
        [lb[s] for s in range(5, 9)], [lr[s] for s in range(5, 9)], rtol=1e-4
    )


def test_corrupt_checkpoint_is_skipped_with_a_warning(uninterrupted, tmp_path, caplog):
    import shutil

    from jreason.train.checkpoint import Checkpointer

    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    # truncate every data file of the newest checkpoint's state
    for f in (run / "checkpoints" / "16" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"")
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
        ),
        _state_shapes(uninterrupted),
    )
    with caplog.at_level(logging.WARNING):
        step, state, data = Checkpointer(run).restore_latest(target)
    assert step == 8
    assert any(
        "checkpoints/16" in r.getMessage() and "unreadable" in r.getMessage()
        for r in caplog.records
    )
    jax.tree.map(np.testing.assert_array_equal, state["params"], _params(uninterrupted, 8))


def _state_shapes(run_dir):
    with ocp.StandardCheckpointer() as c:
        meta = c.metadata(Path(run_dir).absolute() / "checkpoints" / "8" / "state")
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
