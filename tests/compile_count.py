"""Counting XLA compilations: how the steady-state tests prove nothing recompiles."""

import contextlib

import jax


@contextlib.contextmanager
def count_compiles():
    """Yields a list that gains one entry per backend compilation inside the block."""
    compiles = []

    def listener(event, duration, **kw):
        if event.endswith("backend_compile_duration"):
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        # private in jax 0.10; absent elsewhere, where the listener stays (it only appends)
        unregister = getattr(
            jax._src.monitoring, "_unregister_event_duration_listener_by_callback", None
        )
        if unregister is not None:
            unregister(listener)
