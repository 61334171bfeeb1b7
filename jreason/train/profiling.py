"""`profile_steps: [start, stop]` (CLI `--profile START:STOP`): a JAX profiler trace of steps
start..stop-1 in `run_dir/profile/`, for TensorBoard's profile plugin or Perfetto.

Why a window and not the whole run: the first steps compile and the trace of a long run is too
big to open, so a user profiles a few steady-state steps (MaxText's `profiler_steps`). The
trace stops after blocking on the last profiled step's outputs, so the device work of every
step in the window is in it, and it is stopped on any exit (preemption, an error), so a
half-written trace never blocks the next `start_trace` in the same process.
"""

from __future__ import annotations

from pathlib import Path

import jax


class StepProfiler:
    def __init__(self, profile_steps, directory: Path, enabled: bool = True):
        self.window = tuple(profile_steps) if profile_steps else None
        self.directory, self.enabled = Path(directory), enabled
        self.active = False

    def before(self, step: int) -> None:
        if self.enabled and self.window and step == self.window[0] and not self.active:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after(self, step: int, outputs) -> None:
        if self.active and step + 1 >= self.window[1]:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
