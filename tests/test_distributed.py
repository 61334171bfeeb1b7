"""Multi-process runs: two real CPU processes train like one, resume, and fail loudly at barriers.

The SFT check starts `jreason train --coordinator ...` twice over (process 0 and 1, two fake CPU
devices each, gloo collectives over loopback) and compares every step's loss with a
single-process run of the same config: the data pipeline gives each process its half of the
same global batch, so the losses must agree to float rounding. The two-process run stops at a
checkpoint and a second two-process launch resumes from it to the same losses as the
uninterrupted single-process run.

Speed (2 shared cores): the subprocesses compile with XLA's backend optimization off (compiles
are ~2.5x faster, losses move by ~1e-7) and share a persistent compilation cache, from which
process 0 of the resumed launch loads its executables (jax writes and reuses entries for
multi-process programs on process 0 only; process 1 compiles again).
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jreason import cli, distributed
from jreason.config import repo_root
from jreason.train.config import load_train_config
from jreason.train.sft import train

DEMO = repo_root() / "configs" / "sft" / "demo.yaml"
WORKER = Path(__file__).with_name("distributed_worker.py")
TINY = [
    "log_every=1",
    "checkpoint.every=10",
    "eval.num_examples=0",
    "tokenizer.train_examples=300",
    "data.seq_len=128",
    "data.global_batch=8",
    "model.overrides.n_layers=2",
    "model.overrides.d_model=64",
    "model.overrides.d_ff=128",
    "optim.warmup_steps=2",
    # constant after warmup: a run stopped at 10 of 10 and resumed to 20 sees the same lrs
    "optim.schedule=constant",
]
CLUSTER_VARS = [v for sets in distributed.CLUSTER_ENV_VARS.values() for vs in sets for v in vs]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JREASON_")}
    return env | {
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
        "JAX_COMPILATION_CACHE_DIR": str(tmp / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }


def _run_pair(make_cmd, env, logs: Path, timeout=240) -> list[subprocess.CompletedProcess]:
    """Runs process 0 and 1 of one job to the end (or kills both); returns their results.

    Output goes to files, not pipes: a process blocked on a full pipe would stall the other at
    its next collective.
    """
    coordinator = f"localhost:{_free_port()}"
    logs.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    for i in (0, 1):
        out, err = open(logs / f"p{i}.out", "w+"), open(logs / f"p{i}.err", "w+")  # noqa: SIM115
        files.append((out, err))
        procs.append(subprocess.Popen(make_cmd(coordinator, i), env=env, stdout=out, stderr=err))
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for out, err in files:
            out.close()
            err.close()
    return [
        subprocess.CompletedProcess(
            p.args, p.returncode, (logs / f"p{i}.out").read_text(), (logs / f"p{i}.err").read_text()
        )
        for i, p in enumerate(procs)
    ]


def _losses(run_dir) -> list[tuple[int, float]]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def _train_cmd(run_dir, *overrides):
    def make(coordinator, i):
        return [
            sys.executable, "-m", "jreason", "train", "--config", str(DEMO),
            "--coordinator", coordinator, "--num-processes", "2", "--process-id", str(i),
            f"run_dir={run_dir}", *TINY, *overrides,
        ]  # fmt: skip

    return make


@pytest.mark.timeout(420)
def test_two_processes_train_and_resume_like_one(tmp_path):
    ref = train(load_train_config(DEMO, [*TINY, f"run_dir={tmp_path / 'ref'}", "steps=20"]))
    assert ref["step"] == 20
    want = dict(_losses(tmp_path / "ref"))
    env, run = _env(tmp_path), tmp_path / "two"

    first = _run_pair(_train_cmd(run, "steps=10", "export.hf=false"), env, tmp_path / "log1")
    for i, r in enumerate(first):
        assert r.returncode == 0, f"process {i} failed:\n{r.stderr[-3000:]}"
    assert (run / "tokenizer" / "tokenizer.model").is_file()
    assert not list((run / "tokenizer").glob(".tokenizer.tmp-*"))
    # every process saved its own data-iterator position
    data = sorted(p.name for p in (run / "checkpoints" / "10" / "data").glob("*.json"))
    assert data == ["process_0-of-2.json", "process_1-of-2.json"]

    # resumed on a hybrid mesh: data spans the two processes (as two slices or hosts would)
    hybrid = ("mesh.data=2", "mesh.dcn_data=2", "mesh.fsdp=2")
    second = _run_pair(
        _train_cmd(run, "steps=20", "export.hf=true", *hybrid), env, tmp_path / "log2"
    )
    for i, r in enumerate(second):
        assert r.returncode == 0, f"process {i} failed:\n{r.stderr[-3000:]}"
    reports = [json.loads(r.stdout[r.stdout.index("{") :]) for r in second]
    assert [r["step"] for r in reports] == [20, 20]
    assert reports[0]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert "final_loss" not in reports[1]  # only process 0 reads back and writes the report

    got = _losses(run)
    assert [s for s, _ in got] == list(range(1, 21))  # each step once: only process 0 logs
    np.testing.assert_allclose([v for _, v in got], [want[s] for s in range(1, 21)], rtol=1e-5)
    assert (run / "export-hf" / "model.safetensors").is_file()
    assert json.loads((run / "report.json").read_text())["step"] == 20


@pytest.mark.timeout(120)
def test_barriers_votes_preemption_and_restore_agree_across_processes(tmp_path):
    def make(coordinator, i):
        return [sys.executable, str(WORKER), coordinator, str(i), str(tmp_path / "run")]

    results = _run_pair(make, _env(tmp_path), tmp_path / "log", timeout=90)
    for i, r in enumerate(results):
        assert r.returncode == 0, f"process {i} failed:\n{r.stderr[-3000:]}"
    p0, p1 = (json.loads(r.stdout.strip().splitlines()[-1]) for r in results)

    assert p0["first"] == p0["again"] == "explicit"
    assert p0["again_from_env_or_nothing"] == "already initialized"
    assert "cannot re-initialize as process 1 of 2" in p0["other_layout"]
    assert (p0["is_main"], p1["is_main"]) == (True, False)

    msg = p0["timeout"]
    assert "barrier 'only_process_0_comes'" in msg
    assert "process(es) [1] of 2 did not arrive (arrived: [0])" in msg
    assert p0["after"] == p1["after"] == "passed"  # a later barrier still works

    # one process's vote, SIGTERM or unreadable checkpoint decides for both
    assert p0["votes"] == p1["votes"] == [False, True, False]
    assert p0["stopped_at"] == p1["stopped_at"] == 3
    assert p0["restored"] == p1["restored"] == [1, 1, 1.0]

    assert "info line from process 0" in results[0].stderr
    assert "info line from process 1" not in results[1].stderr  # warnings only off process 0
    assert "[p1] WARNING worker: warning line from process 1" in results[1].stderr


@pytest.mark.parametrize(
    "kwargs, env, error",
    [
        (
            dict(coordinator="h:1234"),
            {},
            "not --num-processes (JREASON_NUM_PROCESSES), --process-id",
        ),
        (dict(coordinator="h:1234", num_processes=2), {}, "but not --process-id"),
        ({}, {"JREASON_PROCESS_ID": "0"}, "got --process-id (JREASON_PROCESS_ID) but not"),
        (dict(coordinator="h", num_processes=2, process_id=0), {}, "expected HOST:PORT"),
        (dict(coordinator="h:99999", num_processes=2, process_id=0), {}, "expected HOST:PORT"),
        (dict(coordinator="h:1", num_processes=2, process_id=2), {}, "--process-id (JREASON_"),
        (dict(coordinator="h:1", num_processes=0, process_id=0), {}, "must be >= 1, got 0"),
        (dict(coordinator="h:1", process_id=0), {"JREASON_NUM_PROCESSES": "two"}, "an integer"),
    ],
)
def test_bad_flag_combinations_name_the_flag(kwargs, env, error):
    with pytest.raises(ValueError) as e:
        distributed.resolve(**kwargs, environ=env)
    assert error in str(e.value)


def test_flags_win_over_env_vars_and_env_vars_alone_suffice():
    env = {
        "JREASON_COORDINATOR": "10.0.0.1:1234",
        "JREASON_NUM_PROCESSES": "4",
        "JREASON_PROCESS_ID": "3",
    }
    assert distributed.resolve(environ=env) == ("10.0.0.1:1234", 4, 3)
    assert distributed.resolve(process_id=1, environ=env) == ("10.0.0.1:1234", 4, 1)
    assert distributed.resolve(environ={}) is None


def test_cluster_detection_needs_the_whole_set_of_variables():
    slurm = dict.fromkeys(
        ["SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"],
        "1",
    )
    assert distributed.detect_cluster(slurm) == "SLURM"
    assert distributed.detect_cluster({"SLURM_JOB_ID": "1"}) is None  # salloc shell, no srun
    assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "a,b"}).startswith("Cloud TPU")
    assert distributed.detect_cluster({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) is None
    assert distributed.detect_cluster({}) is None


def test_single_process_initialize_is_a_repeatable_no_op(monkeypatch):
    for var in [*CLUSTER_VARS, "JREASON_COORDINATOR", "JREASON_NUM_PROCESSES"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("JREASON_PROCESS_ID", raising=False)
    assert distributed.initialize() == distributed.initialize() == "single"
    assert not distributed.is_initialized()
    distributed.barrier("alone", timeout_s=0.1)  # nothing to wait for
    assert distributed.is_main()


def test_cli_commands_take_the_flags_and_report_bad_ones(capsys):
    flags = ["--coordinator", "h:1", "--num-processes", "2", "--process-id", "1"]
    commands = [
        ["train", "--config", "x.yaml"],
        ["demo"],
        ["generate", "--model", "m", "--input", "i", "--output", "o"],
        ["eval", "--model", "m", "--task", "arithmetic", "--out", "o"],
        ["serve", "--model", "m"],
    ]
    for cmd in commands:
        args = cli.build_parser().parse_args([*cmd, *flags])
        assert (args.coordinator, args.num_processes, args.process_id) == ("h:1", 2, 1), cmd

    assert cli.main(["train", "--config", str(DEMO), "--coordinator", "localhost:1234"]) == 2
    err = capsys.readouterr().err
    assert "--num-processes (JREASON_NUM_PROCESSES)" in err and "--process-id" in err
