"""The RL experiment config: the SFT config plus `rollout` and `algo` sections.

`jreason rl --config configs/rl/grpo_demo.yaml algo.eps_high=0.28` loads like `jreason train`:
YAML, `key.sub=value` overrides, validation errors that name the key. The SFT sections keep
their meaning (model, tokenizer, optim, mesh, checkpoint, eval, export); `data` is the prompt
source (a procedural task or JSONL/Parquet problems with answers) and `data.seq_len` the length
of a training row (prompt + completion, or a Markovian chunk's context + its tokens).

One RL step = `rollout.prompts_per_step` prompts x `rollout.group_size` completions from the
decode engine with the current weights, rewards, advantages, then `algo.epochs` passes over
`algo.minibatches` minibatches, each one optimizer update through the shared train step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, Literal

from jreason import config as config_lib
from jreason.train.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class MarkovianRollout:
    """Delethink chunked rollouts; chunk_size 0 = off. carryover m = keep_head + keep_tail."""

    chunk_size: int = 0  # C
    carryover: int | None = None  # m; default C/2
    keep_head: int = 0
    max_chunks: int = 5  # I


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    prompts_per_step: int = 8  # P
    group_size: int = 8  # G completions per prompt
    max_tokens: int = 256  # per completion (whole trace in Markovian mode)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_slots: int = 64  # engine slots (concurrent sequences)
    markovian: MarkovianRollout = MarkovianRollout()
    # DAPO dynamic sampling: drop groups whose rewards are all equal (no signal) and generate
    # more prompts until P groups remain, for at most max_rounds rounds
    dynamic_sampling: bool = False
    max_rounds: int = 3


@dataclasses.dataclass(frozen=True)
class AlgoConfig:
    advantage: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = (
        "seq_mean_token_mean"
    )
    max_len_norm: int | None = None  # Dr. GRPO's constant; default rollout.max_tokens
    eps_low: float = 0.2
    eps_high: float = 0.2  # DAPO clip-higher: 0.28
    kl_coef: float = 0.0
    kl_estimator: Literal["k1", "k3"] = "k3"
    entropy_coef: float = 0.0
    # old log-probs: "engine" takes the rollout's own; "trainer" recomputes them with the
    # trainer's forward (then tis_cap can correct for the engine/trainer mismatch)
    old_logprobs: Literal["engine", "trainer"] = "trainer"
    tis_cap: float | None = None
    epochs: int = 1  # passes over the rollout batch
    minibatches: int = 1  # optimizer updates per pass
    rewards: dict[str, Any] = field(default_factory=lambda: {"correct": 1.0})


@dataclasses.dataclass(frozen=True)
class RLConfig(TrainConfig):
    run_dir: str = "runs/rl"
    steps: int = 100
    rollout: RolloutConfig = RolloutConfig()
    algo: AlgoConfig = AlgoConfig()

    def __post_init__(self):
        super().__post_init__()
        r, a = self.rollout, self.algo

        def bad(key: str, why: str):
            raise config_lib.ConfigError(f"{key}: {why}")

        for key, v in (
            ("rollout.prompts_per_step", r.prompts_per_step),
            ("rollout.group_size", r.group_size),
            ("rollout.max_tokens", r.max_tokens),
            ("rollout.max_slots", r.max_slots),
            ("rollout.max_rounds", r.max_rounds),
            ("algo.epochs", a.epochs),
            ("algo.minibatches", a.minibatches),
        ):
            if v < 1:
                bad(key, f"must be >= 1, got {v}")
        if r.group_size < 2:
            bad("rollout.group_size", f"group advantages need >= 2 completions, got {r.group_size}")
        rows = self.rows_per_step
        if rows % a.minibatches:
            bad("algo.minibatches", f"{rows} rows per step must divide into {a.minibatches}")
        if (rows // a.minibatches) % self.optim.grad_accum:
            bad(
                "optim.grad_accum",
                f"a minibatch of {rows // a.minibatches} rows must divide into "
                f"grad_accum={self.optim.grad_accum}",
            )
        if r.temperature <= 0:
            bad("rollout.temperature", "RL samples: must be > 0")
        mk = r.markovian
        if mk.chunk_size:
            m = mk.carryover if mk.carryover is not None else mk.chunk_size // 2
            if not 0 <= mk.keep_head <= m < mk.chunk_size:
                bad(
                    "rollout.markovian.carryover",
                    f"need 0 <= keep_head={mk.keep_head} <= carryover={m} < "
                    f"chunk_size={mk.chunk_size}",
                )
        if a.tis_cap is not None and a.old_logprobs != "trainer":
            bad("algo.tis_cap", "corrects engine vs trainer log-probs: needs old_logprobs=trainer")

    @property
    def rows_per_step(self) -> int:
        """Training rows per RL step: one per completion, or one per chunk slot (Markovian)."""
        r = self.rollout
        chunks = r.markovian.max_chunks if r.markovian.chunk_size else 1
        return r.prompts_per_step * r.group_size * chunks


def load_rl_config(path, overrides=()) -> RLConfig:
    return config_lib.load(RLConfig, path, list(overrides))
