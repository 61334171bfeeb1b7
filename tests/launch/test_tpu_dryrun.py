"""launch/tpu.py: the gcloud commands it prints and runs, its input errors, and configs/launch.

No cloud access: `--dry-run` output is checked line by line, and the real (non-dry) path runs
against a fake `gcloud` on PATH that records its arguments, so what runs is what was printed.
"""

import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TPU_PY = ROOT / "launch" / "tpu.py"
SLICE = "--name jr-test --zone us-west4-a --project my-proj-123"
WHERE = SLICE.split()


def _load_tpu():
    spec = importlib.util.spec_from_file_location("launch_tpu", TPU_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


tpu = _load_tpu()


def launch(*args, env=None):
    return subprocess.run(
        [sys.executable, str(TPU_PY), *args], capture_output=True, text=True, cwd=ROOT, env=env
    )


def gcloud_lines(stdout: str) -> list[list[str]]:
    """The printed commands, split back into argv; `#` lines are local steps."""
    return [shlex.split(line) for line in stdout.splitlines() if not line.startswith("#")]


def find(cmds, *words) -> int:
    """Index of the only command containing every word (as an argv element or inside one)."""
    hits = [i for i, c in enumerate(cmds) if all(any(w in a for a in c) for w in words)]
    assert len(hits) == 1, (words, cmds)
    return hits[0]


def test_up_v5e_8_prints_create_setup_and_run_on_all_workers():
    cfg = "configs/launch/v5e-8.yaml"
    argv = f"up {SLICE} --accelerator-type v5litepod-8 --config {cfg} --dry-run steps=100"
    proc = launch(*argv.split(), "data.paths=[data/a b.jsonl]")
    assert proc.returncode == 0, proc.stderr
    cmds = gcloud_lines(proc.stdout)
    assert all(c[:3] == ["gcloud", "compute", "tpus"] for c in cmds)
    for c in cmds:  # every command names the slice, its zone and project
        assert (
            "jr-test" in " ".join(c) and "--zone=us-west4-a" in c and "--project=my-proj-123" in c
        )

    create = cmds[find(cmds, "create")]
    assert create[3:6] == ["tpu-vm", "create", "jr-test"]
    assert "--accelerator-type=v5litepod-8" in create and "--version=v2-alpha-tpuv5-lite" in create

    code = find(cmds, "scp", ".tar.gz")
    setup = find(cmds, "ssh", "pip install")
    config = find(cmds, "scp", cfg)
    run = find(cmds, "ssh", "jreason train")
    stream = find(cmds, "ssh", "tail")
    assert 0 == find(cmds, "create") < code < setup < config < run < stream == len(cmds) - 1
    for i in (code, setup, config, run):
        assert "--worker=all" in cmds[i]
    assert "--worker=0" in cmds[stream]
    assert cmds[config][5:7] == [cfg, "jr-test:jreason/launch-v5e-8.yaml"]  # scp SRC DEST
    assert '-e ".[tpu]"' in cmds[setup][-1]

    # the remote command line: background, one log per worker, config and overrides quoted
    remote = cmds[run][-1]
    assert "nohup .venv/bin/jreason train --config launch-v5e-8.yaml steps=100" in remote
    assert "'data.paths=[data/a b.jsonl]'" in remote
    assert "> logs/jreason-$(hostname).log 2>&1 < /dev/null &" in remote
    assert "logs/jreason-$(hostname).log" in cmds[stream][-1]
    assert any(line.startswith("# pack ") for line in proc.stdout.splitlines())


def test_up_v5p_64_queued_waits_for_active_and_delete_uses_the_queue():
    argv = f"up {SLICE} --accelerator-type v5p-64 --queued --spot --no-stream --dry-run"
    proc = launch(*argv.split(), "--config", "configs/launch/v5p-64.yaml")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    create = shlex.split(lines[0])
    assert create[3:6] == ["queued-resources", "create", "jr-test"]
    for flag in ("--node-id=jr-test", "--accelerator-type=v5p-64", "--spot"):
        assert flag in create
    assert "--runtime-version=v2-alpha-tpuv5" in create and "--zone=us-west4-a" in create
    assert lines[1].startswith("# every 30 s until ACTIVE") and "describe jr-test" in lines[1]
    cmds = gcloud_lines(proc.stdout)
    assert "--worker=all" in cmds[find(cmds, "jreason train --config launch-v5p-64.yaml")]
    assert not any("tail" in " ".join(c) for c in cmds)  # --no-stream

    delete = gcloud_lines(launch("delete", *WHERE, "--queued", "--dry-run").stdout)
    assert delete == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "jr-test"]
        + ["--zone=us-west4-a", "--project=my-proj-123", "--force", "--quiet"]
    ]
    plain = gcloud_lines(launch("delete", *WHERE, "--dry-run").stdout)
    assert plain[0][3:6] == ["tpu-vm", "delete", "jr-test"]


def test_setup_from_git_and_stop_and_logs():
    git = launch(
        "setup", *WHERE, "--git", "https://example.com/jreason.git", "--ref", "v1", "--dry-run"
    )
    (cmd,) = gcloud_lines(git.stdout)
    assert "--worker=all" in cmd and "git clone -q https://example.com/jreason.git" in cmd[-1]
    assert "fetch -q origin v1" in cmd[-1] and "scp" not in cmd
    (stop,) = gcloud_lines(launch("stop", *WHERE, "--dry-run").stdout)
    assert "--worker=all" in stop and "kill -TERM" in stop[-1]
    (logs,) = gcloud_lines(launch("logs", *WHERE, "--worker", "3", "--dry-run").stdout)
    assert "--worker=3" in logs and logs[-1].startswith("tail -n 100 -F")


OK = "--name ok --zone us-west4-a"
V5E, V5P = "configs/launch/v5e-8.yaml", "configs/launch/v5p-64.yaml"


@pytest.mark.parametrize(
    "argv, named",
    [
        ("create --name Bad_Name --zone us-west4-a --accelerator-type v5p-64", "--name"),
        ("create --name ok --zone uswest4 --accelerator-type v5p-64", "--zone"),
        (f"create {OK} --project X --accelerator-type v5p-64", "--project"),
        (f"create {OK} --accelerator-type v5e-8", "--accelerator-type"),
        (f"create {OK} --accelerator-type v6e-3", "--accelerator-type"),
        (f"run {OK} --config missing.yaml", "--config"),
        (f"run {OK}", "--config"),
        (f"run {OK} --config {V5E} steps", "override"),
        (f"run {OK} --cmd generate --config {V5E}", "--config"),
        (f"up {OK} --accelerator-type v6e-256 --config {V5P}", "mesh"),
        (f"run {OK} --accelerator-type v5p-64 --config {V5P} data.global_batch=12", "global_batch"),
    ],
)
def test_bad_input_is_an_error_naming_the_argument(argv, named):
    proc = launch(*argv.split(), "--dry-run")
    assert proc.returncode == 2 and proc.stdout == ""  # nothing printed, nothing run
    assert proc.stderr.startswith("error: ") and named in proc.stderr, proc.stderr


def test_unknown_accelerator_lists_the_choices():
    proc = launch("create", *WHERE, "--accelerator-type", "v5e-8", "--dry-run")
    assert "--accelerator-type 'v5e-8'" in proc.stderr and "v5litepod" in proc.stderr


@pytest.mark.parametrize(
    "name, chips, workers",
    [("v5litepod-8", 8, 1), ("v5litepod-16", 16, 4), ("v5p-8", 4, 1), ("v5p-64", 32, 8)]
    + [("v6e-8", 8, 1), ("v6e-256", 256, 64)],
)
def test_accelerator_chips_and_workers(name, chips, workers):
    acc = tpu.accelerator(name)
    assert (acc.chips, acc.workers) == (chips, workers)


def _fake_gcloud(tmp_path: Path) -> dict:
    """A `gcloud` that logs its argv as JSON lines, fails (status 3) when FAKE_GCLOUD_FAIL is in
    its command line, and reports queued resources ACTIVE."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "gcloud"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "with open(os.environ['FAKE_GCLOUD_LOG'], 'a') as f:\n"
        "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "if os.environ.get('FAKE_GCLOUD_FAIL', '\\0') in ' '.join(sys.argv[1:]):\n"
        "    sys.exit(3)\n"
        "if 'describe' in sys.argv:\n"
        "    print('ACTIVE')\n"
    )
    script.chmod(0o755)
    return dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        FAKE_GCLOUD_LOG=str(tmp_path / "gcloud.log"),
        TMPDIR=str(tmp_path),
    )


def _logged(env) -> list[list[str]]:
    path = Path(env["FAKE_GCLOUD_LOG"])
    return [["gcloud", *json.loads(line)] for line in path.read_text().splitlines()]


def test_real_run_executes_exactly_the_dry_run_commands(tmp_path):
    env = _fake_gcloud(tmp_path)
    argv = ["up", *WHERE, "--accelerator-type", "v5litepod-8", "--queued"]
    argv += ["--config", "configs/launch/v5e-8.yaml", "steps=10"]
    dry = launch(*argv, "--dry-run", env=env)
    real = launch(*argv, env=env)
    assert real.returncode == 0, real.stderr
    ran = _logged(env)
    describe = [c for c in ran if "describe" in c]
    assert len(describe) == 1 and "--format=value(state.state)" in describe[0]
    assert [c for c in ran if "describe" not in c] == gcloud_lines(dry.stdout)

    with tarfile.open(tmp_path / "jreason-jr-test.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"jreason/cli.py", "pyproject.toml", "configs/launch/v5e-8.yaml"} <= names
    assert not any(n.split("/")[0] in (".venv", ".git", "runs") for n in names)
    assert not any("__pycache__" in n or ".egg-info" in n for n in names)


def test_a_failing_command_stops_with_its_exit_status(tmp_path):
    env = _fake_gcloud(tmp_path)
    env["FAKE_GCLOUD_FAIL"] = "launch-v5e-8.yaml"  # the config copy fails
    proc = launch("run", *WHERE, "--config", "configs/launch/v5e-8.yaml", env=env)
    assert proc.returncode == 1
    assert "exit status 3" in proc.stderr and "gcloud compute tpus tpu-vm scp" in proc.stderr
    assert len(_logged(env)) == 1  # nothing after the failed command ran

    env["PATH"] = str(tmp_path / "empty")  # no gcloud at all
    proc = launch("stop", *WHERE, env=env)
    assert proc.returncode == 1 and "gcloud not found" in proc.stderr


# --- configs/launch --------------------------------------------------------------------------

CONFIGS = sorted((ROOT / "configs" / "launch").glob("*.yaml"))


def _header(path: Path) -> dict[str, str]:
    """The `# key: value` claims at the top of a launch config (accelerator, devices, hosts)."""
    return dict(re.findall(r"^# (accelerator|devices|hosts): (\S+)", path.read_text(), re.M))


def test_there_is_a_config_per_target():
    claims = {_header(p)["accelerator"] for p in CONFIGS}
    assert {"v5litepod-8", "v5p-64", "v6e-256", "8xH100"} <= claims


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_launch_config_loads_and_its_mesh_fills_its_devices(path):
    from jreason.train.config import load_train_config

    claim = _header(path)
    devices, hosts = int(claim["devices"]), int(claim["hosts"])
    cfg = load_train_config(path)  # the project's own strict loader
    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    if -1 in sizes:
        sizes[sizes.index(-1)] = devices // math.prod(s for s in sizes if s != -1)
    assert math.prod(sizes) == devices, (sizes, devices)
    # every process gets whole microbatches, and a microbatch splits evenly over data x fsdp
    batch, accum = cfg.data.global_batch, cfg.optim.grad_accum
    assert batch % (hosts * accum) == 0
    assert (batch // accum) % (sizes[0] * sizes[1]) == 0
    if claim["accelerator"] in ("v5litepod-8", "v5p-64", "v6e-256"):
        acc = tpu.accelerator(claim["accelerator"])
        assert (acc.chips, acc.workers) == (devices, hosts)
        tpu.check_config(path, [], acc)  # the launcher's own pre-flight check agrees
