"""`profile_steps` / `--profile START:STOP`: a trace of exactly the window, stopped on any exit."""

import jax
import jax.numpy as jnp
import pytest

from jreason.cli import main as cli_main
from jreason.config import ConfigError, repo_root
from jreason.train.config import load_train_config
from jreason.train.profiling import StepProfiler

DEMO = repo_root() / "configs" / "sft" / "demo.yaml"


def _traces(directory):
    return sorted(directory.rglob("*.xplane.pb"))


def test_window_writes_one_trace_and_stops(tmp_path):
    step = jax.jit(lambda x: x @ x.T)
    x = jnp.ones((64, 64))
    profiler = StepProfiler((2, 4), tmp_path / "profile")
    for s in range(1, 6):
        profiler.before(s)
        assert profiler.active == (2 <= s < 4)
        x = step(x) / 64
        profiler.after(s, x)
        assert profiler.active == (2 <= s < 3)
    assert len(_traces(tmp_path / "profile")) == 1
    # stopped: a second window in the same process starts a new trace
    with StepProfiler((1, 2), tmp_path / "again") as again:
        again.before(1)
    assert not again.active  # closed on exit, even without reaching `after`
    assert len(_traces(tmp_path / "again")) == 1


def test_an_error_inside_the_window_still_stops_the_trace(tmp_path):
    with pytest.raises(RuntimeError), StepProfiler((1, 10), tmp_path / "p") as profiler:
        profiler.before(1)
        raise RuntimeError("step failed")
    assert not profiler.active
    with StepProfiler((1, 2), tmp_path / "q") as profiler:  # the profiler is free again
        profiler.before(1)
        profiler.after(1, None)
    assert _traces(tmp_path / "q")


def test_bad_windows_are_errors_naming_the_key(capsys):
    for bad in ("[3]", "[5, 5]", "[0, 2]", "[4, 2]"):
        with pytest.raises(ConfigError, match="profile_steps"):
            load_train_config(DEMO, [f"profile_steps={bad}"])
    assert load_train_config(DEMO, ["profile_steps=[3, 5]"]).profile_steps == (3, 5)
    with pytest.raises(SystemExit):
        cli_main(["train", "--config", str(DEMO), "--profile", "3-5"])
    assert "expected START:STOP" in capsys.readouterr().err
