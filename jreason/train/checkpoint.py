"""Orbax checkpoints that resume exactly: state, data-iterator position and config together.

Each checkpoint `run_dir/checkpoints/<step>/` holds three items written by one
`orbax.checkpoint.CheckpointManager` save (async, atomic commit, `max_to_keep`):

    state   params, optimizer state, step, RNG    (StandardSave: tensorstore, sharded)
    data    each process's grain iterator state    (JSON, one file per process)
    config  the resolved experiment config         (JSON)

Multi-process runs: every process calls `save` and `restore_latest` (orbax coordinates them and
each writes its own shards). The data item is per process because each process reads its own
rows: process i writes `data/process_<i>-of-<n>.json` (grain's convention), where orbax's
JsonSave would keep only process 0's. A run therefore resumes with the same number of processes;
another number is an error, not a silent restart.

Restoring places every array directly into the sharding of the *current* mesh, so a run saved
on fsdp=8 resumes on data=2/fsdp=2/tensor=2. A checkpoint that fails to restore (a corrupt or
truncated file) is skipped with a warning naming it, and the previous one is used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jreason import distributed

log = logging.getLogger(__name__)


class IncompatibleCheckpoint(ValueError):
    """The checkpoint is readable but was written by a different process layout."""


class ProcessJsonHandler(ocp.CheckpointHandler):
    """Orbax handler for a small JSON value per process: `process_<i>-of-<n>.json`."""

    @staticmethod
    def _name() -> str:
        return f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory, args: ProcessJsonSave) -> None:
        (Path(directory) / self._name()).write_text(json.dumps(args.item))

    def restore(self, directory, args: ProcessJsonRestore | None = None) -> Any:
        path = Path(directory) / self._name()
        if path.is_file():
            return json.loads(path.read_text())
        legacy = Path(directory) / "metadata"  # written by JsonSave before data was per process
        if legacy.is_file() and jax.process_count() == 1:
            return json.loads(legacy.read_text())
        saved = sorted(p.name for p in Path(directory).glob("process_*-of-*.json"))
        if saved:
            raise IncompatibleCheckpoint(
                f"{Path(directory).parent} holds data-iterator state {saved}, not {path.name}: "
                f"it was saved by a different number of processes; resume with that number"
            )
        raise FileNotFoundError(f"{path} not found")


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
    pass


class Checkpointer:
    def __init__(self, run_dir: str | Path, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = Path(run_dir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,  # half-written saves from a killed run are removed
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config")
        )

    def save(self, step: int, state, data_state: dict, config: dict, *, force: bool = True) -> bool:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ProcessJsonSave(data_state),
            config=ocp.args.JsonSave(config),
        )
        return self.manager.save(step, args=args, force=force)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state) -> tuple[int, dict, dict] | None:
        """(step, state, data_state) from the newest checkpoint every process can read, or None.

        A step that fails on any process is skipped on all of them (`distributed.any_process`),
        so the processes of a multi-host run never resume from different steps. The per-process
        data item is read and agreed on first because orbax's state restore ends in a collective
        sync: a process that failed inside it would leave the others waiting there. (The state
        item lives on the shared filesystem and fails alike on every process.)
        """
        for step in reversed(self.steps()):
            data, error = None, None
            try:
                data = ProcessJsonHandler().restore(self.directory / str(step) / "data")
            except IncompatibleCheckpoint:
                raise
            except Exception as e:  # noqa: BLE001 - any failure means: not usable, try older
                error = e
            if not self._usable(step, error):
                continue
            try:
                out = self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
                )
            except Exception as e:  # noqa: BLE001
                error = e
            if self._usable(step, error):
                return step, out["state"], data
        return None

    def _usable(self, step: int, error: Exception | None) -> bool:
        if not distributed.any_process(error is not None, "restore"):
            return True
        why = "unreadable on another process"
        if error is not None:
            first = str(error).splitlines()[0][:200] if str(error) else ""
            why = f"{type(error).__name__}: {first}"
        log.warning(
            "checkpoint %s is unreadable (%s); trying an earlier one",
            self.directory / str(step),
            why,
        )
        return False

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class PreemptionFlag:
    """Set by SIGTERM (a preemption notice): the loop saves and exits cleanly at the next step
    that all processes agree on (`agreed`)."""

    def __init__(self):
        self.event = threading.Event()
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self.event.set())
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def __bool__(self) -> bool:
        return self.event.is_set()

    def agreed(self) -> bool:
        """Whether to save and stop after this step: True on every process as soon as any
        process got SIGTERM (a preemption notice often reaches one host of a pod), so they all
        stop at the same step and write one checkpoint together. Call once per step."""
        return distributed.any_process(self.event.is_set(), "preempt")


def export_hf(path: Path, model_cfg, params, tokenizer_dir: Path) -> None:
    """Writes `params` as a Hugging Face checkpoint at `path` (replacing an older export); a
    recurrent-depth model, which has no HF form, as a jreason model directory (model/store.py).

    Params sharded over several processes are not readable by any one of them: every process
    must call this (it takes part in gathering a full host copy), then process 0 writes it.
    """
    from jax.experimental import multihost_utils

    from jreason.model.hf import save_hf
    from jreason.model.recurrent import RecurrentConfig
    from jreason.model.store import save_model

    host = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() != 0:
        return
    if isinstance(model_cfg, RecurrentConfig):  # no HF form: a jreason model directory
        save_model(path, model_cfg, host, tokenizer_dir=tokenizer_dir, overwrite=True)
    else:
        save_hf(path, model_cfg, host, tokenizer_dir=tokenizer_dir, overwrite=True)
