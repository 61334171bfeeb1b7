"""Run jreason on a Cloud TPU slice with gcloud: create, set up, run, stream logs, clean up.

    python launch/tpu.py up --name jr-v5e --zone us-west4-a --project my-proj \\
        --accelerator-type v5litepod-8 --config configs/launch/v5e-8.yaml steps=100
    python launch/tpu.py logs|stop|delete --name jr-v5e --zone us-west4-a --project my-proj

A TPU slice is one VM per 4 or 8 chips ("workers"), and a JAX program on it is one process per
worker, all started with the same command. So the launcher does nothing clever: it copies the
code to every worker, installs it, and runs the same `jreason ...` line on all of them with
`--worker=all`; `jax.distributed` finds its peers from the TPU metadata on its own. Every step
is a plain `gcloud` command, and `--dry-run` prints them (one per line, `shlex.join`-quoted,
local steps as `#` comments) so they can be read, pasted or run by hand.

Deliberately left out: GKE / xpk (see launch/README.md), multislice, GPU clusters, and any state
of its own: a flag (`--queued`) says how the slice was made, nothing is remembered between calls.

Setup installs with uv into `~/jreason/.venv` on a Python it downloads, because the TPU runtime
images are Ubuntu 22.04 with Python 3.10 and jreason needs >= 3.11.

gcloud syntax checked against the Cloud SDK reference and TPU docs (cloud.google.com):
- sdk/gcloud/reference/compute/tpus/tpu-vm/create: `create TPU --zone --accelerator-type
  --version [--spot] [--reserved]` (synchronous unless --async)
- sdk/gcloud/reference/compute/tpus/queued-resources/create: `create QR --zone
  --accelerator-type --runtime-version --node-id [--spot] [--reserved]`; .../delete:
  `delete QR --zone [--force]` (--force deletes the QR's nodes first); `describe
  --format='value(state.state)'` reads WAITING_FOR_RESOURCES / PROVISIONING / ACTIVE / FAILED
  (tpu/docs/queued-resources)
- sdk/gcloud/reference/compute/tpus/tpu-vm/ssh and .../scp: `--worker` (default 0, or `all`),
  `--command`; scp `SRC TPU:DEST --worker=all`
- tpu/docs/runtimes: v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e)
- tpu/docs/v5e, v5p, v6e: v5e/v6e types count chips (8 chips on one VM, 4 per VM beyond that:
  v6e-256 = 256 chips on 64 VMs); v5p types count TensorCores, 2 per chip (v5p-64 = 2x4x4 =
  32 chips on 8 VMs), and JAX sees one device per v5p chip.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REMOTE = "~/jreason"  # the checkout on every worker
LOG = "logs/jreason-$(hostname).log"  # one per worker, relative to REMOTE; expanded remotely
PID = "logs/jreason.pid"
# Never shipped to the workers (the .gitignore list plus .git).
EXCLUDE = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", "runs"}
EXCLUDE |= {"build", "tmp"}


class LaunchError(Exception):
    """Bad input; the message names the argument (exit status 2, as argparse's own errors)."""


class CommandFailed(LaunchError):
    """A gcloud command failed; the message names it and its exit status (exit status 1)."""


# --- accelerators --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Family:
    runtime: str  # default --version
    cores_per_chip: int  # v5p's type number counts TensorCores (2 per chip)
    host_chips: int  # chips a single-host slice puts on its one VM; larger slices have 4 per VM
    sizes: Callable[[int], bool]  # which type numbers exist


_2D = (1, 4, 8, 16, 32, 64, 128, 256)  # v5e and v6e: 1x1 ... 16x16
FAMILIES = {
    "v5litepod": Family("v2-alpha-tpuv5-lite", 1, 8, lambda n: n in _2D),
    "v5p": Family("v2-alpha-tpuv5", 2, 4, lambda n: n % 8 == 0 and 8 <= n <= 12288),
    "v6e": Family("v2-alpha-tpuv6e", 1, 8, lambda n: n in _2D),
}


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str  # the --accelerator-type, e.g. v5p-64
    runtime: str
    chips: int  # = JAX devices
    workers: int  # VMs = JAX processes


def accelerator(name: str) -> Accelerator:
    family, _, number = name.rpartition("-")
    spec = FAMILIES.get(family)
    if spec is None or not number.isdigit() or not spec.sizes(int(number)):
        hint = " (the TPU API calls v5e 'v5litepod')" if family == "v5e" else ""
        raise LaunchError(
            f"--accelerator-type {name!r} is not a known TPU type{hint}; use one of "
            f"{', '.join(f'{f}-N' for f in FAMILIES)}, e.g. v5litepod-8, v5p-64, v6e-256"
        )
    chips = int(number) // spec.cores_per_chip
    workers = 1 if chips <= spec.host_chips else chips // 4
    return Accelerator(name, spec.runtime, chips, workers)


# --- validation ----------------------------------------------------------------------------

_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_ZONE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")
_PROJECT = re.compile(r"([a-z0-9.-]+:)?[a-z][-a-z0-9]{4,28}[a-z0-9]")


def validate(args) -> None:
    if not _NAME.fullmatch(args.name):
        raise LaunchError(
            f"--name {args.name!r}: use 1-63 lowercase letters, digits and hyphens, starting "
            "with a letter and not ending with a hyphen"
        )
    if not _ZONE.fullmatch(args.zone):
        raise LaunchError(f"--zone {args.zone!r} is not a zone name like us-west4-a")
    if args.project is not None and not _PROJECT.fullmatch(args.project):
        raise LaunchError(f"--project {args.project!r} is not a project id like my-project-123")
    if getattr(args, "accelerator_type", None):
        args.acc = accelerator(args.accelerator_type)
    if hasattr(args, "cmd"):
        validate_run(args)


def validate_run(args) -> None:
    if args.cmd == "generate":  # flags pass through: ... run --cmd generate -- --model ...
        if args.config:
            raise LaunchError("--config: `jreason generate` takes no experiment config")
        return
    if not args.config:
        raise LaunchError(f"--config is required for `jreason {args.cmd}`")
    if not Path(args.config).is_file():
        raise LaunchError(f"--config {args.config}: file not found")
    for text in args.args:
        if "=" not in text or text.startswith("-"):
            raise LaunchError(f"override {text!r}: expected key.sub=value")
    if getattr(args, "acc", None):
        check_config(Path(args.config), args.args, args.acc)


def check_config(path: Path, overrides: list[str], acc: Accelerator) -> None:
    """The two mistakes that otherwise surface only after minutes of setup on every worker: a
    mesh that does not cover the slice's chips, a global batch the workers cannot split."""
    try:
        import yaml
    except ImportError:  # no PyYAML on this machine: jreason still checks on the workers
        return
    cfg = yaml.safe_load(path.read_text()) or {}
    for text in overrides:  # the same dotted key=value form jreason applies
        key, _, value = text.partition("=")
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node[leaf] = yaml.safe_load(value)
    mesh = {"data": 1, "fsdp": -1, "tensor": 1, **(cfg.get("mesh") or {})}  # MeshConfig defaults
    sizes = [mesh.get(k) for k in ("data", "fsdp", "tensor")]
    if all(isinstance(s, int) and s != 0 for s in sizes):  # else jreason's loader names the key
        known = math.prod(s for s in sizes if s != -1)
        fits = acc.chips % known == 0 if -1 in sizes else known == acc.chips
        if not fits:
            raise LaunchError(
                f"--config {path}: mesh data*fsdp*tensor = {'*'.join(map(str, sizes))} does "
                f"not fit the {acc.chips} chips (JAX devices) of {acc.name}; set mesh.* to "
                "multiply to that, or use -1 for one of them"
            )
    batch = (cfg.get("data") or {}).get("global_batch", 16)
    if isinstance(batch, int) and batch % acc.workers:
        raise LaunchError(
            f"--config {path}: data.global_batch={batch} must divide by the {acc.workers} "
            f"workers (JAX processes) of {acc.name}"
        )


# --- the commands --------------------------------------------------------------------------


@dataclasses.dataclass
class Step:
    """One gcloud command, or local work (`action`) shown as a `# note` in a dry run."""

    argv: list[str] | None = None
    note: str = ""
    action: Callable[[], None] | None = None


def _where(args) -> list[str]:
    return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def _tpu_vm(args, verb: str, positional: list[str], *flags: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, *positional, *_where(args), *flags]


def _queued(args, verb: str, *flags: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "queued-resources", verb, args.name, *_where(args), *flags]


def _ssh(args, worker: str, command: str) -> list[str]:
    return _tpu_vm(args, "ssh", [args.name], f"--worker={worker}", "--command", command)


def _scp_to_all(args, src: str, dest: str) -> list[str]:
    return _tpu_vm(args, "scp", [src, f"{args.name}:{dest}"], "--worker=all")


def _tarball(args) -> Path:
    return Path(tempfile.gettempdir()) / f"jreason-{args.name}.tar.gz"


def plan_create(args) -> list[Step]:
    acc, version = args.acc, args.version or args.acc.runtime
    tier = ["--spot"] if args.spot else ["--reserved"] if args.reserved else []
    kind = f"--accelerator-type={acc.name}"
    if not args.queued:  # synchronous: returns once the VMs are READY
        return [Step(_tpu_vm(args, "create", [args.name], kind, f"--version={version}", *tier))]
    create = _queued(args, "create", f"--node-id={args.name}", kind)
    create += [f"--runtime-version={version}", *tier]
    describe = _queued(args, "describe", "--format=value(state.state)")
    return [
        Step(create),
        Step(
            note=f"every 30 s until ACTIVE: {shlex.join(describe)}",
            action=lambda: wait_active(describe),
        ),
    ]


def plan_setup(args) -> list[Step]:
    steps, uv = [], "~/.local/bin/uv"
    if args.git:
        fetch = [
            f"if [ ! -d {REMOTE}/.git ]; then git clone -q {shlex.quote(args.git)} {REMOTE}; fi",
            f"git -C {REMOTE} fetch -q origin {shlex.quote(args.ref)}",
            f"git -C {REMOTE} checkout -q --detach FETCH_HEAD",
        ]
    else:
        tarball = _tarball(args)
        steps.append(Step(note=f"pack {ROOT} into {tarball}", action=lambda: pack(ROOT, tarball)))
        steps.append(Step(_scp_to_all(args, str(tarball), "jreason.tar.gz")))
        fetch = [f"mkdir -p {REMOTE}", f"tar -xzf ~/jreason.tar.gz -C {REMOTE}"]
    install = [
        f"cd {REMOTE}",
        "python3 -m pip install -q --user uv",
        f"{{ [ -x .venv/bin/python ] || {uv} venv -q --python {args.python} .venv; }}",
        f'{uv} pip install -q --python .venv/bin/python -e ".[tpu]"',
    ]
    return steps + [Step(_ssh(args, "all", " && ".join(fetch + install)))]


def plan_run(args) -> list[Step]:
    steps, jreason = [], [".venv/bin/jreason", args.cmd]
    if args.config:
        remote = f"launch-{Path(args.config).name}"  # kept apart from the repo's own files
        steps.append(Step(_scp_to_all(args, args.config, f"{REMOTE.removeprefix('~/')}/{remote}")))
        jreason += ["--config", remote]
    # nohup + </dev/null: the run outlives the ssh session; the pid file is what `stop` kills.
    start = (
        f"cd {REMOTE} && mkdir -p logs && "
        f"{{ nohup {shlex.join(jreason + args.args)} > {LOG} 2>&1 < /dev/null & "
        f"echo $! > {PID}; }}"
    )
    steps.append(Step(_ssh(args, "all", start)))
    if not args.no_stream:
        steps.append(Step(_ssh(args, "0", f"tail -n +1 -F {REMOTE}/{LOG}")))
    return steps


def plan_logs(args) -> list[Step]:
    return [Step(_ssh(args, str(args.worker), f"tail -n {args.lines} -F {REMOTE}/{LOG}"))]


def plan_stop(args) -> list[Step]:
    # SIGTERM: jreason saves a checkpoint and exits, so `run` again resumes.
    pid = f"{REMOTE}/{PID}"
    kill = f"if [ -f {pid} ]; then kill -TERM $(cat {pid}) 2>/dev/null || true; rm -f {pid}; fi"
    return [Step(_ssh(args, "all", kill))]


def plan_delete(args) -> list[Step]:
    if args.queued:  # --force deletes the node first, then the request
        return [Step(_queued(args, "delete", "--force", "--quiet"))]
    return [Step(_tpu_vm(args, "delete", [args.name], "--quiet"))]


def plan_up(args) -> list[Step]:
    return plan_create(args) + plan_setup(args) + plan_run(args)


# --- doing it ------------------------------------------------------------------------------


def pack(root: Path, out: Path) -> None:
    """The working tree as a tar.gz, minus EXCLUDE (tarfile skips an excluded dir's contents)."""

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = Path(info.name).parts
        if any(p in EXCLUDE or p.endswith(".egg-info") for p in parts):
            return None
        return info

    with tarfile.open(out, "w:gz") as tar:
        for child in sorted(root.iterdir()):
            tar.add(child, arcname=child.name, filter=keep)
    print(f"packed {root} -> {out} ({out.stat().st_size / 1e6:.1f} MB)", flush=True)


def wait_active(describe: list[str]) -> None:
    last = None
    while True:
        proc = subprocess.run(describe, capture_output=True, text=True)
        if proc.returncode:
            raise CommandFailed(
                f"command failed (exit status {proc.returncode}): {shlex.join(describe)}\n"
                f"{proc.stderr.strip()}"
            )
        state = proc.stdout.strip()
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED"):
            raise CommandFailed(f"queued resource is {state}: {shlex.join(describe)}")
        if state != last:
            print(f"queued resource: {state or 'unknown'}; waiting", flush=True)
            last = state
        time.sleep(30)


def execute(steps: list[Step], dry_run: bool) -> None:
    for step in steps:
        if dry_run:
            print(f"# {step.note}" if step.argv is None else shlex.join(step.argv))
        elif step.action is not None:
            step.action()
        else:
            print(f"+ {shlex.join(step.argv)}", flush=True)
            try:
                rc = subprocess.run(step.argv).returncode
            except FileNotFoundError:
                raise CommandFailed(
                    "gcloud not found on PATH: install the Google Cloud CLI"
                ) from None
            if rc:
                raise CommandFailed(f"command failed (exit status {rc}): {shlex.join(step.argv)}")


# --- command line --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
    common.add_argument("--zone", required=True, help="e.g. us-west4-a")
    common.add_argument("--project", help="GCP project id (default: gcloud's configured one)")
    common.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")

    queued = argparse.ArgumentParser(add_help=False)
    queued.add_argument("--queued", action="store_true", help="a queued resource, not a plain VM")

    create = argparse.ArgumentParser(add_help=False)
    create.add_argument(
        "--accelerator-type", required=True, help="v5litepod-8, v5p-64, v6e-256, ..."
    )
    create.add_argument("--version", help="TPU runtime (default: the one for the TPU family)")
    tier = create.add_mutually_exclusive_group()
    tier.add_argument("--spot", action="store_true", help="Spot capacity (preemptible)")
    tier.add_argument("--reserved", action="store_true", help="use the project's reservation")

    setup = argparse.ArgumentParser(add_help=False)
    setup.add_argument("--git", metavar="URL", help="clone this repo instead of copying ./")
    setup.add_argument("--ref", default="HEAD", help="with --git: branch, tag or commit")
    setup.add_argument("--python", default="3.12", help="Python for the workers' venv (uv)")

    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("--cmd", choices=["train", "rl", "generate"], default="train")
    run.add_argument("--config", help="local experiment YAML, copied to every worker")
    run.add_argument("--no-stream", action="store_true", help="do not follow worker 0's log")
    run.add_argument("args", nargs="*", help="key=value overrides (generate: flags after --)")

    parser = argparse.ArgumentParser(
        prog="launch/tpu.py", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, parents, plan, help):
        p = sub.add_parser(name, parents=[common, *parents], help=help, allow_abbrev=False)
        p.set_defaults(plan=plan)
        return p

    add("create", [create, queued], plan_create, "create the TPU VM or queued resource")
    add("setup", [setup], plan_setup, "copy the code to every worker and install it")
    p = add("run", [run], plan_run, "run jreason on every worker, stream worker 0's log")
    p.add_argument("--accelerator-type", help="check the config's mesh against this slice")
    p = add("logs", [], plan_logs, "follow one worker's log")
    p.add_argument("--worker", type=int, default=0)
    p.add_argument("--lines", type=int, default=100)
    add("stop", [], plan_stop, "SIGTERM the run on every worker (it checkpoints first)")
    add("delete", [queued], plan_delete, "delete the TPU VM or queued resource")
    add("up", [create, queued, setup, run], plan_up, "create + setup + run")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        validate(args)
        execute(args.plan(args), args.dry_run)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, CommandFailed) else 2
    except KeyboardInterrupt:  # typically Ctrl-C while following a log
        print(
            f"\ninterrupted; a run already started on {args.name} goes on (`stop` ends it)",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
