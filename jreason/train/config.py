"""The experiment config: every knob of an SFT run, as frozen dataclasses loaded from YAML.

`jreason train --config configs/sft/demo.yaml optim.lr=3e-4 mesh.fsdp=4` loads the YAML, applies
the `key.sub=value` overrides and validates the result (unknown keys and wrong types are errors
that name the key). The resolved config is saved next to every checkpoint, so a run directory
says exactly what produced it. The RL config (train/rl/) extends this one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, Literal

from jreason import config as config_lib
from jreason.data.pipeline import DataConfig


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Where the model comes from: a preset (random init) or a checkpoint, plus overrides."""

    preset: str | None = "tiny"
    init_from: str | None = None  # HF or jreason model dir; wins over preset
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields
    # Dtype policy: float32 params + bfloat16 compute = fp32 master weights with bf16 math.
    param_dtype: Literal["float32", "bfloat16"] | None = None
    dtype: Literal["float32", "bfloat16"] | None = None
    remat: Literal["none", "full", "dots", "dots_no_batch"] | None = None
    attention_impl: Literal["reference", "xla", "cudnn"] | None = None


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """A tokenizer file/dir, or (path unset) a sentencepiece model trained on the task's text."""

    path: str | None = None
    vocab_size: int = 512
    train_examples: int = 2000
    split_digits: bool = True


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    # horizon of warmup + decay in optimizer steps; None = the run's steps. Longer than the run
    # stops partway down the schedule (MaxText's learning_rate_schedule_steps)
    schedule_steps: int | None = None
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    grad_accum: int = 1  # microbatches per optimizer step; global_batch must divide by it


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = -1  # -1 takes the remaining devices
    tensor: int = 1
    # How many slices (TPU multislice) or hosts (GPU) the data axis spans: fsdp and tensor stay
    # within one, only data-parallel reductions cross the data-center network. 1 = one slice.
    dcn_data: int = 1


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500
    max_to_keep: int = 3
    async_save: bool = True
    resume: bool = True  # resume from the latest complete checkpoint in run_dir


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every: int = 0  # 0 = only at the end
    num_examples: int = 64
    max_new_tokens: int = 256
    batch: int = 64


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    hf: bool = False  # write run_dir/export-hf at the end


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/sft"
    seed: int = 0
    steps: int = 1000
    log_every: int = 10
    profile_steps: tuple[int, ...] = ()  # [start, stop): a JAX profiler trace (profiling.py)
    model: ModelSpec = ModelSpec()
    tokenizer: TokenizerSpec = TokenizerSpec()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()

    def __post_init__(self):
        if self.data.global_batch % self.optim.grad_accum:
            raise config_lib.ConfigError(
                f"optim.grad_accum: data.global_batch={self.data.global_batch} must be divisible "
                f"by grad_accum={self.optim.grad_accum}"
            )
        if self.steps < 1:
            raise config_lib.ConfigError(f"steps: must be >= 1, got {self.steps}")
        p = self.profile_steps
        if p and (len(p) != 2 or not 1 <= p[0] < p[1]):
            raise config_lib.ConfigError(
                f"profile_steps: expected [start, stop] with 1 <= start < stop, got {list(p)}"
            )


def load_train_config(path, overrides=()) -> TrainConfig:
    return config_lib.load(TrainConfig, path, list(overrides))
