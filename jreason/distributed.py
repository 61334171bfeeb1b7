"""Multi-process runs: `jax.distributed` start-up, process-0 logging, barriers that time out.

Every CLI entry point calls `initialize(...)` once, before anything touches a jax backend. Where
the process layout comes from, first match wins:

    1. explicit values: --coordinator HOST:PORT --num-processes N --process-id I, or the env vars
       JREASON_COORDINATOR / JREASON_NUM_PROCESSES / JREASON_PROCESS_ID (a flag beats its env
       var); all three or none, checked here so a typo fails with the flag's name instead of a
       hang or an error from deep inside jax;
    2. a cluster that `jax.distributed.initialize()` can read by itself (SLURM, Open MPI, Cloud
       TPU VMs and pods, GKE TPU, Kubernetes indexed Jobs): it is called with no arguments. Only
       there: called bare elsewhere it fails, and on any Kubernetes pod it queries the API server;
    3. otherwise one process, and nothing to do.

JREASON_DISTRIBUTED=off skips step 2 (a single-process debug run inside a SLURM allocation),
=on forces the bare call (a cluster jax knows that the table below does not).

`barrier(name, timeout_s)` waits for every process and, when one does not come, says which: each
process records its arrival in the coordinator's key-value store before waiting, so the error
names the missing process ids instead of leaving every host hung. `any_process(flag, name)` turns
a local event (a SIGTERM on one host) into the same decision on all. `setup_logging()` gives
process 0 the INFO log and the others warnings only, so N hosts do not print N copies.

Left out: elastic membership and restarts of failed processes (a failed process fails the run;
resuming is the checkpoint's job), and launching the processes (that is launch/ or the cluster).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import time
from collections.abc import Sequence

log = logging.getLogger(__name__)

ENV_COORDINATOR = "JREASON_COORDINATOR"
ENV_NUM_PROCESSES = "JREASON_NUM_PROCESSES"
ENV_PROCESS_ID = "JREASON_PROCESS_ID"
ENV_MODE = "JREASON_DISTRIBUTED"  # auto (default) | on | off

DEFAULT_TIMEOUT_S = 600.0  # long enough for process 0 to train a run's tokenizer

# Environment variables that jax's own cluster detection (jax/_src/clusters/) keys on; a cluster
# is present when every variable of one of its sets is. Cloud TPU VMs created on GCE carry their
# topology in the metadata server instead, see _on_cloud_tpu_vm().
CLUSTER_ENV_VARS: dict[str, tuple[tuple[str, ...], ...]] = {
    "SLURM": (
        ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"),
    ),
    "Open MPI": (("OMPI_MCA_orte_hnp_uri",),),
    "Cloud TPU (GKE / multislice)": (
        ("TPU_WORKER_HOSTNAMES",),
        ("TPU_PROCESS_ADDRESSES",),
        ("MEGASCALE_COORDINATOR_ADDRESS",),
    ),
    # an Indexed Job: jax reads the rest from the API server (needs the `kubernetes` package)
    "Kubernetes": (("KUBERNETES_SERVICE_HOST", "JOB_COMPLETION_INDEX"),),
}

_FLAGS = {
    "coordinator": f"--coordinator ({ENV_COORDINATOR})",
    "num_processes": f"--num-processes ({ENV_NUM_PROCESSES})",
    "process_id": f"--process-id ({ENV_PROCESS_ID})",
}


class BarrierTimeout(RuntimeError):
    """A barrier failed; the message names the barrier and the processes that did not arrive."""


def _jax_distributed_state():
    """jax's `jax.distributed` state: process id, process count, coordinator and its client.

    Private jax API (`jax._src.distributed.global_state`; orbax reads it the same way): jax has no
    public handle on the coordination service's key-value store and barriers. Every private access
    in jreason goes through this one function, so a jax release that moves it breaks one place.
    """
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state


def _on_cloud_tpu_vm() -> bool:
    """True on a Cloud TPU VM; set by jax at import from the TPU chips it finds (private too)."""
    from jax._src import cloud_tpu_init

    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def detect_cluster(environ=None) -> str | None:
    """The name of the cluster `jax.distributed.initialize()` can configure itself for, or None."""
    environ = os.environ if environ is None else environ
    for name, var_sets in CLUSTER_ENV_VARS.items():
        if any(all(v in environ for v in vs) for vs in var_sets):
            return name
    if environ is os.environ and _on_cloud_tpu_vm():
        return "Cloud TPU VM"
    return None


def _int_from(value, what: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected an integer, got {value!r}") from None


def resolve(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ=None,
) -> tuple[str, int, int] | None:
    """(coordinator, num_processes, process_id) from the arguments, else the env vars; or None.

    Raises ValueError naming the flag when only some are given or a value is out of range.
    """
    environ = os.environ if environ is None else environ
    values = {
        "coordinator": coordinator or environ.get(ENV_COORDINATOR) or None,
        "num_processes": _int_from(
            num_processes if num_processes is not None else environ.get(ENV_NUM_PROCESSES),
            _FLAGS["num_processes"],
        ),
        "process_id": _int_from(
            process_id if process_id is not None else environ.get(ENV_PROCESS_ID),
            _FLAGS["process_id"],
        ),
    }
    given = [k for k, v in values.items() if v is not None]
    if not given:
        return None
    if len(given) < 3:
        missing = [_FLAGS[k] for k in values if k not in given]
        raise ValueError(
            f"multi-process runs need --coordinator, --num-processes and --process-id together; "
            f"got {', '.join(_FLAGS[k] for k in given)} but not {', '.join(missing)}"
        )
    coord, n, i = values["coordinator"], values["num_processes"], values["process_id"]
    host, _, port = coord.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"{_FLAGS['coordinator']}: expected HOST:PORT (e.g. 10.0.0.1:1234), got {coord!r}"
        )
    if n < 1:
        raise ValueError(f"{_FLAGS['num_processes']}: must be >= 1, got {n}")
    if not 0 <= i < n:
        raise ValueError(
            f"{_FLAGS['process_id']}: must be in [0, {n}) for --num-processes {n}, got {i}"
        )
    return coord, n, i


def is_initialized() -> bool:
    """True once jax.distributed runs in this process (started by us, or by the caller)."""
    return _jax_distributed_state().client is not None


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> str:
    """Starts `jax.distributed` if this is a multi-process run; returns how the layout was found.

    Returns "explicit", a cluster name, or "single" (nothing started). Idempotent: a second call
    with the same (or no) values does nothing; with different explicit values it raises.
    Must run before the first jax computation (jax's rule). `local_device_ids` restricts this
    process to some of the host's accelerators (one process per GPU).
    """
    import jax

    spec = resolve(coordinator, num_processes, process_id)
    mode = os.environ.get(ENV_MODE, "auto").lower()
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"{ENV_MODE}: expected auto, on or off, got {mode!r}")

    if is_initialized():
        st = _jax_distributed_state()
        if spec is not None and spec != (st.coordinator_address, st.num_processes, st.process_id):
            raise RuntimeError(
                f"jax.distributed is already initialized as process {st.process_id} of "
                f"{st.num_processes} (coordinator {st.coordinator_address}); cannot re-initialize "
                f"as process {spec[2]} of {spec[1]} (coordinator {spec[0]})"
            )
        return "explicit" if spec is not None else "already initialized"

    kw = {"local_device_ids": list(local_device_ids)} if local_device_ids is not None else {}
    if spec is not None:
        how = "explicit"
        if spec[1] > 1:
            _use_gloo_on_cpu(jax)
        jax.distributed.initialize(spec[0], spec[1], spec[2], **kw)
    else:
        how = {"on": "forced", "off": None, "auto": detect_cluster()}[mode]
        if how is None:
            return "single"
        jax.distributed.initialize(**kw)  # jax reads the cluster's own description
    st = _jax_distributed_state()
    log.info(
        "jax.distributed: process %d of %d, coordinator %s (%s)",
        st.process_id,
        st.num_processes,
        st.coordinator_address,
        how,
    )
    return how


def _use_gloo_on_cpu(jax) -> None:
    """Cross-process collectives on the CPU backend need an implementation; gloo is built in.

    The default is already gloo in jax 0.10+, "none" (collectives fail across processes) in older
    releases; a user's explicit choice (mpi) is kept. Harmless on GPU/TPU: it configures only the
    CPU client.
    """
    name = "jax_cpu_collectives_implementation"
    with contextlib.suppress(AttributeError):
        if getattr(jax.config, name) in (None, "none"):
            jax.config.update(name, "gloo")


def is_main() -> bool:
    """True on process 0, the one that writes logs, metrics, reports and exports."""
    import jax

    return jax.process_index() == 0


# How often each barrier name has been used in this process, so a name can be reused (a barrier
# per checkpoint, say) while every use gets its own key. Every process calls barriers in the same
# order, so the counts agree across processes.
_barrier_uses: collections.Counter[str] = collections.Counter()


def barrier(name: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Blocks until every process has called `barrier(name)`; a no-op in a single process.

    Raises BarrierTimeout after `timeout_s` naming `name` and the process ids that never arrived.
    """
    st = _jax_distributed_state()
    client = st.client
    if client is None:
        import jax

        if jax.process_count() > 1:  # a TPU pod started without jax.distributed: no key-value store
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(name)
        return
    _barrier_uses[name] += 1
    key = f"jreason/barrier/{name}/{_barrier_uses[name]}"
    me, n = st.process_id, st.num_processes
    client.key_value_set(f"{key}/arrived/{me}", "1")
    start = time.monotonic()
    try:
        client.wait_at_barrier(key, int(timeout_s * 1000))
    except Exception as e:  # jax raises JaxRuntimeError: DEADLINE_EXCEEDED, or a peer's failure
        arrived = _arrivals(client, f"{key}/arrived/")
        if arrived is None:
            who = "could not read which processes arrived"
        elif missing := [p for p in range(n) if p not in arrived]:
            who = f"process(es) {missing} of {n} did not arrive (arrived: {sorted(arrived)})"
        else:
            who = f"all {n} processes arrived, but the barrier had already failed elsewhere"
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BarrierTimeout(
            f"barrier {name!r} failed on process {me} after {time.monotonic() - start:.1f}s "
            f"(timeout {timeout_s:g}s): {who} [jax: {first_line}]"
        ) from e
    with contextlib.suppress(Exception):  # only needed for the error above; keep the store small
        client.key_value_delete(f"{key}/arrived/{me}")


def any_process(flag: bool, name: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """True on every process when `flag` is True on at least one; `flag` in a single process.

    For decisions that must be unanimous, such as stopping on a SIGTERM that reached only some
    hosts, or skipping a checkpoint one host cannot read: a process acting alone would leave the
    others waiting in a collective. Through the coordinator's key-value store and one barrier, so
    it costs a round trip on the host and never waits for the accelerators. Every process must
    call it the same number of times in the same order (each use of `name` is its own vote).
    """
    st = _jax_distributed_state()
    if st.client is None:
        import jax

        if jax.process_count() > 1:
            import numpy as np
            from jax.experimental import multihost_utils

            return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
        return bool(flag)
    key = f"jreason/any/{name}/{_barrier_uses[f'any/{name}'] + 1}"
    if flag:
        st.client.key_value_set(f"{key}/{st.process_id}", "1")
    barrier(f"any/{name}", timeout_s)  # every vote is in the store before anyone reads
    return bool(flag) or bool(_arrivals(st.client, f"{key}/"))


def _arrivals(client, prefix: str) -> set[int] | None:
    try:
        return {int(k.rsplit("/", 1)[-1]) for k, _ in client.key_value_dir_get(prefix)}
    except Exception:  # noqa: BLE001 - the coordinator may be gone; the caller says so
        return None


def setup_logging(level: int = logging.INFO) -> None:
    """Root logging for a CLI run: `level` on process 0, warnings only elsewhere.

    Call after `initialize` (it needs the process index; it does not start a jax backend). With
    several processes each line carries `[pN]`, so interleaved output from many hosts can be told
    apart.
    """
    st = _jax_distributed_state()
    index, count = (st.process_id, st.num_processes) if st.client is not None else (0, 1)
    tag = f" [p{index}]" if count > 1 else ""
    logging.basicConfig(
        level=level if index == 0 else max(level, logging.WARNING),
        format=f"%(asctime)s{tag} %(levelname)s %(name)s: %(message)s",
        force=True,  # an import may already have given root a default handler
    )
    for noisy in ("absl", "orbax", "jax._src", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
