"""Procedural reasoning tasks with verifiers, registered by name.

`get_task("countdown", num_numbers=5)` builds a task from keyword knobs (as they come from a
YAML config or `key=value` overrides) and is strict: an unknown task, an unknown knob or a
knob of the wrong type is a ValueError that names it and lists what is allowed.

Adding a task: subclass `Task` in its own file and add the class to `_ALL` below.
"""

from __future__ import annotations

from typing import Any

from jreason.config import ConfigError, from_dict
from jreason.data.tasks.arithmetic import ArithmeticConfig, ArithmeticTask
from jreason.data.tasks.base import Example, Task
from jreason.data.tasks.countdown import CountdownConfig, CountdownTask
from jreason.data.tasks.perm_walk import PermWalkConfig, PermWalkTask
from jreason.data.tasks.prosqa import ProsQAConfig, ProsQATask
from jreason.data.tasks.running_sum import RunningSumConfig, RunningSumTask
from jreason.data.tasks.var_chain import VarChainConfig, VarChainTask

_ALL: tuple[type[Task], ...] = (
    ArithmeticTask,
    CountdownTask,
    PermWalkTask,
    ProsQATask,
    RunningSumTask,
    VarChainTask,
)
TASKS: dict[str, type[Task]] = {cls.name: cls for cls in _ALL}


def get_task(name: str, **knobs: Any) -> Task:
    """The task registered as `name`, configured with `knobs` (unset knobs keep defaults)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; allowed tasks: {sorted(TASKS)}")
    cls = TASKS[name]
    unknown = sorted(set(knobs) - set(cls.knobs()))
    if unknown:
        raise ValueError(
            f"unknown knob {unknown[0]!r} for task {name!r}; allowed knobs: {cls.knobs()}"
        )
    try:
        # from_dict converts and type-checks values (YAML lists -> tuples, Literal choices);
        # the Config's __post_init__ then checks ranges.
        config = from_dict(cls.Config, knobs, prefix=name)
    except ConfigError as e:
        raise ValueError(f"{e}; allowed knobs for {name}: {cls.knobs()}") from None
    return cls(config)


__all__ = [
    "TASKS",
    "ArithmeticConfig",
    "ArithmeticTask",
    "CountdownConfig",
    "CountdownTask",
    "Example",
    "PermWalkConfig",
    "PermWalkTask",
    "ProsQAConfig",
    "ProsQATask",
    "RunningSumConfig",
    "RunningSumTask",
    "Task",
    "VarChainConfig",
    "VarChainTask",
    "get_task",
]
