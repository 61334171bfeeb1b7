"""Rollouts: prompts -> G completions each from the decode engine -> scored, padded train rows.

The engine is the one users serve with (decode/engine.py); the trainer hands it the current
weights in memory (`Engine.set_params`, same shapes, so nothing recompiles) and submits every
completion of the step at once, so continuous batching keeps all slots busy while short
completions finish early. Each completion's seed is derived from (run seed, step, prompt index,
sample index): a resumed run draws the same completions as an uninterrupted one.

Rows. A completion is one row: its prompt then its tokens, `inputs = row[:-1]`,
`targets = row[1:]`, loss on the sampled completion tokens only. A Markovian (Delethink) trace
is one row *per chunk*: the chunk's context (query + carryover) then the chunk's tokens, the
loss on those tokens only (carried-over tokens are context, and forced tokens, whose logprob is
NaN, were not sampled by the policy), and every chunk row carries the trace's advantage and
sequence id, so the `delethink` aggregation divides by the whole trace's length. Rows are
padded to the fixed (rows_per_step, seq_len) so the train step compiles once; padding rows are
all-zero-mask and weigh nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from jreason.data.tasks.base import Example
from jreason.decode.engine import Engine, Request, Result
from jreason.decode.markovian import MarkovianConfig
from jreason.train.rl.config import RolloutConfig
from jreason.train.rl.losses import aggregation_weights
from jreason.train.rl.rewards import Reward

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Sample:
    """One completion of one prompt, scored."""

    prompt_ids: list[int]
    result: Result
    text: str
    reward: float
    parts: dict[str, float]  # unweighted reward terms, e.g. {"correct": 1.0}


def markovian_config(cfg: RolloutConfig) -> MarkovianConfig | None:
    mk = cfg.markovian
    if not mk.chunk_size:
        return None
    m = mk.carryover if mk.carryover is not None else mk.chunk_size // 2
    return MarkovianConfig(
        chunk_size=mk.chunk_size,
        keep_head=mk.keep_head,
        keep_tail=m - mk.keep_head,
        max_chunks=mk.max_chunks,
    )


def sample_seed(seed: int, step: int, prompt: int, sample: int) -> int:
    return int(np.random.default_rng([seed, step, prompt, sample]).integers(2**31))


def generate_groups(
    engine: Engine,
    tokenizer,
    examples: Sequence[Example],
    cfg: RolloutConfig,
    reward: Reward,
    *,
    task_name: str | None,
    seed: int,
    step: int,
    first_prompt: int = 0,
    thinking: bool = True,
) -> list[list[Sample]]:
    """G scored samples for each example, generated together on the engine. A problem the engine
    cannot take (a prompt too long for its context) is skipped with a warning: one bad record
    must not stop a long run."""
    markovian = markovian_config(cfg)
    stop_ids = sorted(tokenizer.stop_ids)
    submitted, skipped = [], set()
    for p, ex in enumerate(examples):
        prompt_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": ex.prompt}],
            add_generation_prompt=True,
            enable_thinking=thinking,
            tokenize=True,
        )
        for g in range(cfg.group_size):
            request = Request(
                prompt_ids,
                max_tokens=cfg.max_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                top_k=cfg.top_k,
                seed=sample_seed(seed, step, first_prompt + p, g),
                stop_ids=stop_ids,
                markovian=markovian,
            )
            try:
                engine.check(request)
            except ValueError as e:  # e.g. a prompt too long for the rows: skip, don't stop
                log.warning("rollout: skipping problem %s: %s", ex.id, e)
                skipped.add(p)
                break
            submitted.append((p, prompt_ids, engine.submit(request)))
    engine.run_until_idle()
    groups: list[list[Sample]] = [[] for _ in examples]
    for p, prompt_ids, rid in submitted:
        result = engine.results.pop(rid)
        tokens = [t for t in result.tokens if t not in tokenizer.stop_ids]
        text = tokenizer.decode(tokens)
        parts = reward.parts(
            text, len(result.tokens), {"answer": examples[p].answer, "task": task_name}
        )
        total = sum(weight * parts[name] for name, weight, _ in reward.terms)
        groups[p].append(Sample(prompt_ids, result, text, total, parts))
    return [g for p, g in enumerate(groups) if p not in skipped]


def build_rows(
    groups: Sequence[Sequence[Sample]],
    advantages_pg: np.ndarray,
    *,
    n_rows: int,
    seq_len: int,
    loss_agg: str,
    max_len_norm: int | None,
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
    """Training rows (n_rows, seq_len) for `rl.losses.ppo_clip_loss` (see the module docstring).

    `loss_agg` is "delethink" for Markovian rollouts (chunks of a trace share its sequence id).
    `engine_logprobs_bt` holds the engine's log-probs (NaN off the loss mask); the loop uses
    them as old log-probs or recomputes those with the trainer.
    """
    R, T = n_rows, seq_len
    out = {
        "inputs": np.full((R, T), pad_id, np.int32),
        "targets": np.full((R, T), pad_id, np.int32),
        "positions": np.zeros((R, T), np.int32),
        "segment_ids": np.zeros((R, T), np.int32),
        "loss_mask": np.zeros((R, T), np.float32),
        "engine_logprobs_bt": np.zeros((R, T), np.float32),
        "advantages_bt": np.zeros((R, T), np.float32),
    }
    seq_ids = np.full((R,), -1, np.int64)
    r = 0
    for p, group in enumerate(groups):
        for g, s in enumerate(group):
            for chunk in s.result.chunks:
                if not chunk.tokens:
                    continue
                row = list(chunk.context) + list(chunk.tokens)
                n = len(row) - 1
                if n > T:
                    raise ValueError(
                        f"data.seq_len={T} is too short for a rollout row of {n} tokens "
                        "(prompt + max_tokens, or query + markovian chunk_size): raise it"
                    )
                if r >= R:
                    raise ValueError(f"more than {R} rollout rows; raise rows per step")
                start = len(chunk.context) - 1  # target index of the chunk's first token
                lp = np.asarray(chunk.logprobs, np.float32)
                sampled = ~np.isnan(lp)
                out["inputs"][r, :n] = row[:-1]
                out["targets"][r, :n] = row[1:]
                out["positions"][r, :n] = np.arange(n)
                out["segment_ids"][r, :n] = 1
                out["loss_mask"][r, start : start + len(lp)] = sampled
                out["engine_logprobs_bt"][r, start : start + len(lp)] = np.where(sampled, lp, 0.0)
                out["advantages_bt"][r, :n] = advantages_pg[p, g]
                seq_ids[r] = p * len(group) + g
                r += 1
    # padding rows get their own ids; they have no loss tokens, so they count for nothing
    seq_ids[r:] = np.arange(r, R) + 10**9
    weights_bt, denom_bt = aggregation_weights(
        loss_agg, out["loss_mask"], seq_ids, max_len=max_len_norm
    )
    out["loss_weights_bt"] = np.asarray(weights_bt, np.float32)
    out["loss_denom_bt"] = np.asarray(denom_bt, np.float32)
    return out


def rollout_stats(groups: Sequence[Sequence[Sample]]) -> dict[str, float]:
    samples = [s for g in groups for s in g]
    lengths = np.array([len(s.result.tokens) for s in samples])
    stats = {
        "reward": float(np.mean([s.reward for s in samples])),
        "response_length": float(lengths.mean()),
        "response_length_max": float(lengths.max()),
        "clipped_fraction": float(np.mean([s.result.finish_reason == "length" for s in samples])),
    }
    for name in samples[0].parts:
        stats[f"reward_{name}"] = float(np.mean([s.parts[name] for s in samples]))
    stats["chunks_mean"] = float(np.mean([len(s.result.chunks) for s in samples]))
    stats["peak_context_max"] = float(max(s.result.peak_context for s in samples))
    return stats
