"""Group-relative advantages: G completions of one prompt are each other's baseline.

Rewards come in shaped (P, G), P prompts x G completions each, or flat (P * G,) with
`group_size=G` (completions of one prompt adjacent); the advantages have the input's shape.
One scalar per completion: the loss broadcasts it over the completion's tokens (and over every
chunk of a Delethink trace).

- `grpo` (DeepSeekMath, Shao et al. 2024): (r - mean) / (std + eps) within the group.
  std is the *sample* std (ddof=1), as in TRL (`Tensor.std()`) and verl
  (`torch.std`, unbiased by default): the paper only says "std", and those are the
  implementations GRPO results are usually reproduced with. (tunix uses `jnp.std`, ddof=0;
  for G=8 the two differ by a factor sqrt(8/7), i.e. a rescaled learning rate.) eps=1e-6 as
  in verl (TRL uses 1e-4); it only matters for a group whose rewards are all equal, where
  r - mean is 0 anyway. A group of one has no baseline, so its advantage is 0 (verl instead
  passes the raw reward through).
- `dr_grpo` (Liu et al. 2025, "Understanding R1-Zero-Like Training", Dr. GRPO): r - mean.
  Dividing by std up-weights prompts that are nearly all right or all wrong (small std), a
  question-difficulty bias; drop it (pair with the `seq_mean_token_sum_norm` aggregation).
- `rloo` (Ahmadian et al. 2024, REINFORCE Leave-One-Out): r_i - mean_{j != i} r_j, an
  unbiased baseline, = G/(G-1) (r_i - mean). Needs G >= 2.

Left out: value-function baselines (PPO/GAE) and per-token (process) rewards.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _grouped(rewards, group_size: int | None) -> tuple[jax.Array, tuple[int, ...]]:
    """((P, G) float32 view of the rewards, their shape as given)."""
    r = jnp.asarray(rewards, jnp.float32)
    if r.ndim == 2 and group_size in (None, r.shape[1]):
        return r, r.shape
    if r.ndim == 1 and group_size is not None:
        if group_size < 1 or r.shape[0] % group_size:
            raise ValueError(
                f"{r.shape[0]} rewards do not split into groups of group_size={group_size}"
            )
        return r.reshape(-1, group_size), r.shape
    raise ValueError(
        f"rewards must be (P, G), or flat with group_size; got shape {r.shape} and "
        f"group_size={group_size}"
    )


def grpo(rewards, group_size: int | None = None, eps: float = 1e-6) -> jax.Array:
    r_pg, shape = _grouped(rewards, group_size)
    G = r_pg.shape[1]
    centered_pg = r_pg - r_pg.mean(axis=1, keepdims=True)
    if G == 1:
        return centered_pg.reshape(shape)  # zeros
    std_p1 = jnp.sqrt((centered_pg**2).sum(axis=1, keepdims=True) / (G - 1))  # sample std
    return (centered_pg / (std_p1 + eps)).reshape(shape)


def dr_grpo(rewards, group_size: int | None = None) -> jax.Array:
    r_pg, shape = _grouped(rewards, group_size)
    return (r_pg - r_pg.mean(axis=1, keepdims=True)).reshape(shape)


def rloo(rewards, group_size: int | None = None) -> jax.Array:
    r_pg, shape = _grouped(rewards, group_size)
    G = r_pg.shape[1]
    if G < 2:
        raise ValueError("rloo needs at least 2 completions per prompt (group_size >= 2)")
    others_pg = (r_pg.sum(axis=1, keepdims=True) - r_pg) / (G - 1)  # mean of the other G-1
    return (r_pg - others_pg).reshape(shape)


ADVANTAGES = {"grpo": grpo, "dr_grpo": dr_grpo, "rloo": rloo}


def compute_advantages(name: str, rewards, group_size: int | None = None, **kwargs) -> jax.Array:
    """`ADVANTAGES[name](rewards, group_size, **kwargs)`, with an error naming the choices."""
    if name not in ADVANTAGES:
        raise ValueError(f"unknown advantage {name!r}; allowed: {sorted(ADVANTAGES)}")
    return ADVANTAGES[name](rewards, group_size, **kwargs)
