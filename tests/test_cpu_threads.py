"""--cpu-threads / JREASON_CPU_THREADS: the size of XLA:CPU's op thread pool, read from the OS."""

import os
import subprocess
import sys

import pytest

from jreason import cpu_threads

# Counts the pool's threads by name in the OS's thread list after a jitted matmul has run.
PROBE = """
import collections, os, sys
from jreason import cpu_threads
cores = os.sched_getaffinity(0)
cpu_threads.start_backend()
import jax, jax.numpy as jnp
x = jnp.ones((256, 256))
assert float((x @ x)[0, 0]) == 256.0
names = collections.Counter(
    open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")
)
same = all(os.sched_getaffinity(int(t)) == cores for t in os.listdir("/proc/self/task"))
print(names["tf_XLAEigen"], len(cores), same)
"""


def probe(threads: str | None) -> tuple[int, int, bool]:
    env = {k: v for k, v in os.environ.items() if k != cpu_threads.ENV}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="")
    if threads is not None:
        env[cpu_threads.ENV] = threads
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    return int(out[0]), int(out[1]), out[2] == "True"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_pool_has_the_asked_threads_and_every_thread_keeps_every_core():
    default, cores, _ = probe(None)
    assert default == cores  # jax's own sizing: one pool thread per core it may run on
    one, _, same = probe("1")
    assert one == 1
    assert same  # the calling thread and the pool get their cores back (not pinned)


def test_bad_values_name_the_setting(monkeypatch):
    monkeypatch.delenv(cpu_threads.ENV, raising=False)
    assert cpu_threads.resolve() is None
    with pytest.raises(ValueError, match="--cpu-threads: expected at least 1"):
        cpu_threads.resolve(0)
    monkeypatch.setenv(cpu_threads.ENV, "two")
    with pytest.raises(ValueError, match="JREASON_CPU_THREADS: expected a whole number"):
        cpu_threads.resolve()
    assert cpu_threads.resolve(3) == 3  # the flag beats the environment


def test_refused_once_the_backend_has_started():
    import jax.numpy as jnp

    jnp.ones(2).block_until_ready()  # this test process's backend is up
    with pytest.raises(RuntimeError, match="before the first jax computation"):
        cpu_threads.start_backend(1)
