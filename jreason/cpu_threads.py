"""How many threads XLA:CPU runs each op on: sized once, when the backend starts.

XLA:CPU executes a jitted program op by op on one intra-op thread pool (`tf_XLAEigen` threads),
sized from the calling thread's CPU affinity when the backend starts. Neither jax nor XLA has an
option for it; narrowing the affinity is the documented way (jax-ml/jax#1539). More threads is
right for big matmuls, but a tiny model's decode step is ~100 ops of 5-30 us each, and splitting
every one of them across cores costs more in hand-offs than it saves: on a 2-core Xeon the demo
model's batch-16 decode step takes 0.73 ms with one pool thread against 0.95 ms with two, while
the 100M model needs both cores (BENCHMARKS.md has the side-by-side runs).

`start_backend(n)` starts jax's backends with an n-thread pool: it narrows the calling thread's
affinity to n of its cores, starts the backends, then gives the calling thread and every thread
the backends started all of the original cores back. So the pool is n threads wide without being
pinned, and nothing else in the process (torch, data loaders, the HTTP server) loses a core.
Only the CPU backend's pool size is affected; on a GPU or TPU host it changes nothing that
matters. Linux only (`os.sched_setaffinity`); elsewhere a value is refused rather than ignored.

`jreason --cpu-threads N ...` (or JREASON_CPU_THREADS=N) calls it before any command's first
computation; library users call it before theirs.
"""

from __future__ import annotations

import contextlib
import os

ENV = "JREASON_CPU_THREADS"


def resolve(n: int | str | None = None) -> int | None:
    """The thread count asked for: `n`, else $JREASON_CPU_THREADS, else None (jax's default)."""
    where = "--cpu-threads"
    if n is None:
        n, where = os.environ.get(ENV) or None, ENV
    if n is None:
        return None
    try:
        value = int(n)
    except ValueError:
        raise ValueError(f"{where}: expected a whole number of threads, got {n!r}") from None
    if value < 1:
        raise ValueError(f"{where}: expected at least 1 thread, got {value}")
    return value


def _backends_started() -> bool:
    try:  # private, so imported defensively; without it a late call goes unnoticed
        from jax._src.xla_bridge import backends_are_initialized
    except ImportError:  # pragma: no cover - depends on jax internals
        return False
    return backends_are_initialized()


def start_backend(n: int | str | None = None) -> int | None:
    """Starts jax's backends with an n-thread XLA:CPU pool (n from `resolve`); returns n, or None
    when nothing was asked (the backends are then left to start as usual)."""
    n = resolve(n)
    if n is None:
        return None
    if not hasattr(os, "sched_setaffinity"):
        raise RuntimeError(
            f"--cpu-threads / {ENV} needs Linux (os.sched_setaffinity); unset it on this platform"
        )
    if _backends_started():
        raise RuntimeError(
            f"--cpu-threads / {ENV}={n} must be applied before the first jax computation: the "
            "backend has already started with its own thread pool"
        )
    import jax

    cores = os.sched_getaffinity(0)
    if n > len(cores):
        raise ValueError(
            f"--cpu-threads / {ENV}={n}: this process may run on only {len(cores)} cores"
        )
    os.sched_setaffinity(0, set(sorted(cores)[:n]))
    try:
        jax.devices()
    finally:
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(ProcessLookupError):  # a thread that has ended since
                os.sched_setaffinity(int(tid), cores)
    return n
