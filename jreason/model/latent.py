"""Continuous thoughts (Coconut: Hao et al. 2024, "Training Large Language Models to Reason in
a Continuous Latent Space", arXiv:2412.06769): reasoning steps replaced by hidden states fed
back as input embeddings.

A Coconut sequence is

    question  <bot>  <latent> x n  <eot>  remaining reasoning steps  answer

and every `<latent>` is not a token at all: its input embedding is the last hidden state of
the position before it. The first latent gets the hidden state of `<bot>`, the second the
hidden state of the first latent, and so on, so the model reasons for n steps in its own
continuous space instead of writing tokens. "Last hidden state" here is the final-norm'd
state, the lm_head's input (`Decoder(..., return_hidden=True)`): that is what Coconut's code
reads (`outputs.hidden_states[-1]` of a Hugging Face GPT-2, whose last entry is after `ln_f`),
and it keeps the fed-back vector at a fixed scale however deep the model.

The pass structure (`latent_forward`). Latent i's input depends on a forward up to the position
before it, which depends on latent i-1's input, so a sequence with n latents needs n + 1
forwards: pass i (i = 0 .. n-1) runs the whole row with latents < i filled in, reads the hidden
state at `latent_pos[i] - 1` and writes it as latent i's embedding; pass n gives the logits.
Causality makes this exact: a position's hidden state depends only on embeddings at positions
<= its own, so filling latent i never changes what earlier passes read. For `jit` the number
of passes is the static M of the `latent_pos` array (B, M), run as a `lax.scan`; rows with
fewer latents pad with -1, and a pass that fills nobody is skipped with `lax.cond` (a stage-0
batch costs one forward). Gradients flow back through every pass, from the answer tokens
through the chain of hidden states into the question, which is what trains the latents: they
have no labels of their own. Coconut's code saves recompute with a KV cache between passes;
recomputing full rows is (M + 1)x a forward, simple and exact, and fine at M <= ~8.

Labels (`build_row`): as in Coconut, the question, `<bot>`, the latents and `<eot>` are never
targets; the remaining steps and the answer are. Inference inserts `<bot>`, the latents and
`<eot>` itself (decode/latent.py).

Curriculum (`stage_layout`, Coconut section 3): stage k replaces the first k reasoning steps by
k * c latent thoughts (c = `c_thought`); stages past `max_latent_stage` drop every step and use
`max_latent_stage * c` latents (or, with `pad_latent_to_max=False`, min(steps, max) * c, as
Coconut's default; that leaks the step count into inference, which cannot know it). Each stage
trains with a fresh optimizer if `reset_optimizer` (train/coconut.py runs the stages).

Special tokens: `<bot>`, `<latent>`, `<eot>` are the tokenizer's own pieces if it has them as
single tokens, else three ids appended after its vocabulary (`LatentTokens.for_tokenizer`), the
way Coconut adds them to GPT-2 and resizes the embeddings; the model's vocab_size must then
cover them (`LatentTokens.vocab_size`).

Left out: Coconut's mixing of earlier-stage data ("uniform_prob"), the KV-cache reuse between
passes, and packing several problems in one row (one problem per row keeps the latent
positions simple).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jreason.config import ConfigError

BOT, LATENT, EOT = "<bot>", "<latent>", "<eot>"


@dataclasses.dataclass(frozen=True)
class LatentTokens:
    bot: int
    latent: int
    eot: int

    @classmethod
    def after_vocab(cls, vocab_size: int) -> LatentTokens:
        """The three ids right after a vocabulary of `vocab_size` (Coconut's `add_tokens`)."""
        return cls(vocab_size, vocab_size + 1, vocab_size + 2)

    @classmethod
    def for_tokenizer(cls, tokenizer) -> LatentTokens:
        """The tokenizer's own `<bot>`/`<latent>`/`<eot>` pieces, else ids after its vocab."""
        ids = [tokenizer.token_to_id(t) for t in (BOT, LATENT, EOT)]
        if all(i is not None for i in ids):
            return cls(*ids)
        return cls.after_vocab(tokenizer.vocab_size)

    @property
    def vocab_size(self) -> int:
        """The smallest model vocab_size that has these ids."""
        return max(self.bot, self.latent, self.eot) + 1


@dataclasses.dataclass(frozen=True)
class CoconutConfig:
    c_thought: int = 1  # latent thoughts per replaced step (the paper: 1 ProsQA, 2 GSM8k)
    max_latent_stage: int = 3  # stages past it add no latents and drop all remaining steps
    steps_per_stage: int = 100  # optimizer steps per curriculum stage (train/coconut.py)
    reset_optimizer: bool = True  # fresh optimizer state (and schedule) at every stage
    pad_latent_to_max: bool = True  # past max_latent_stage: always max * c latents

    def __post_init__(self):
        for name, lo in (("c_thought", 1), ("max_latent_stage", 0), ("steps_per_stage", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ConfigError(f"coconut.{name}: must be an integer >= {lo}, got {value!r}")
        for name in ("reset_optimizer", "pad_latent_to_max"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"coconut.{name}: must be true or false, got {getattr(self, name)!r}"
                )

    @property
    def max_latents(self) -> int:
        """M: the most latents any stage uses (the static width of `latent_pos`)."""
        return self.max_latent_stage * self.c_thought

    def eval_latents(self, stage: int) -> int:
        """Latent thoughts to generate at inference for a model trained up to `stage`."""
        _check_stage(stage)
        return min(stage, self.max_latent_stage) * self.c_thought


def _check_stage(stage: int) -> None:
    if isinstance(stage, bool) or not isinstance(stage, int) or stage < 0:
        raise ConfigError(f"coconut.stage: must be an integer >= 0, got {stage!r}")


def stage_layout(n_steps: int, stage: int, cfg: CoconutConfig) -> tuple[int, int]:
    """(steps dropped, latent thoughts) for a problem with `n_steps` steps at curriculum `stage`.

    Coconut's schedule (its `get_cot_latent_dataset`): up to max_latent_stage, stage k drops k
    steps and adds k * c latents (even past the problem's own step count); beyond it, every
    step is dropped and the latents stay at max (see `pad_latent_to_max`).
    """
    _check_stage(stage)
    if stage > cfg.max_latent_stage:
        k = cfg.max_latent_stage if cfg.pad_latent_to_max else min(n_steps, cfg.max_latent_stage)
        return n_steps, k * cfg.c_thought
    return min(stage, n_steps), stage * cfg.c_thought


def build_row(
    question: Sequence[int],
    steps: Sequence[Sequence[int]],
    answer: Sequence[int],
    *,
    n_skip: int,
    n_latent: int,
    tokens: LatentTokens | None,
) -> dict:
    """One problem as ids: question [<bot> <latent>*n_latent <eot>] steps[n_skip:] answer.

    Returns {"ids", "supervised" (per id: is it a target), "latent_pos"}. `tokens=None` leaves
    the markers out (the no-CoT / CoT baselines; then n_latent must be 0). Supervised are the
    ids after `<eot>` (after the question without markers): Coconut's labels.
    """
    if not question:
        raise ValueError("build_row: question: needs at least one token")
    if not 0 <= n_skip <= len(steps):
        raise ValueError(f"build_row: n_skip={n_skip} must be in [0, {len(steps)}] (the steps)")
    if n_latent < 0 or (tokens is None and n_latent):
        raise ValueError(f"build_row: n_latent={n_latent}: must be >= 0, and 0 without tokens")
    ids = list(question)
    latent_pos = []
    if tokens is not None:
        ids.append(tokens.bot)
        latent_pos = list(range(len(ids), len(ids) + n_latent))
        ids += [tokens.latent] * n_latent + [tokens.eot]
    start = len(ids)
    for step in steps[n_skip:]:
        ids += list(step)
    ids += list(answer)
    return {
        "ids": ids,
        "supervised": [i >= start for i in range(len(ids))],
        "latent_pos": latent_pos,
    }


def stage_row(question, steps, answer, stage: int, cfg: CoconutConfig, tokens: LatentTokens):
    """`build_row` for curriculum `stage` (see `stage_layout`)."""
    n_skip, n_latent = stage_layout(len(steps), stage, cfg)
    return build_row(question, steps, answer, n_skip=n_skip, n_latent=n_latent, tokens=tokens)


def collate(rows: Sequence[dict], seq_len: int, max_latents: int, pad_id: int = 0) -> dict:
    """`build_row` rows -> the trainer's (b, T) arrays plus `latent_pos` (b, M), -1 padded.

    inputs/targets/loss_mask/positions/segment_ids mean what they do in data/pipeline.py
    (targets[t] = ids[t+1], loss_mask[t] = 1 iff ids[t+1] is supervised, one document per row).
    """
    b, T, M = len(rows), seq_len, max_latents
    out = {
        "inputs": np.full((b, T), pad_id, np.int32),
        "targets": np.full((b, T), pad_id, np.int32),
        "loss_mask": np.zeros((b, T), np.float32),
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (b, T)).copy(),
        "segment_ids": np.zeros((b, T), np.int32),
        "latent_pos": np.full((b, max(M, 1)), -1, np.int32),
    }
    for r, row in enumerate(rows):
        ids, n, pos = row["ids"], len(row["ids"]), row["latent_pos"]
        if n > T:
            raise ValueError(f"collate: seq_len={T} is shorter than a row of {n} ids")
        if len(pos) > M:
            raise ValueError(f"collate: max_latents={M} is fewer than a row's {len(pos)} latents")
        if any(p < 1 or p >= n for p in pos) or list(pos) != sorted(set(pos)):
            raise ValueError(f"collate: latent_pos {pos} must be increasing, in [1, {n})")
        out["inputs"][r, :n] = ids
        out["targets"][r, : n - 1] = ids[1:]
        out["loss_mask"][r, : n - 1] = row["supervised"][1:]
        out["segment_ids"][r, :n] = 1
        out["latent_pos"][r, : len(pos)] = pos
    return out


def latent_forward(model, params, tokens_bt, positions_bt, latent_pos_bm, segment_ids_bt=None):
    """(logits_btv, h_btd) of rows whose `<latent>` positions take the previous position's
    last hidden state as input embedding; `latent_pos_bm` increasing per row, -1 = none."""
    B, T = tokens_bt.shape
    rows_b = jnp.arange(B)
    x_btd = model.module(params).embed_tokens(tokens_bt)

    def run(x_btd):
        logits_btv, _, h_btd = model.apply(
            params, tokens_bt, positions_bt, None, segment_ids_bt,
            inputs_embeds_btd=x_btd, return_hidden=True,
        )  # fmt: skip
        return logits_btv, h_btd

    def fill(x_btd, pos_b):
        _, h_btd = run(x_btd)
        src_bd = h_btd[rows_b, jnp.maximum(pos_b - 1, 0)]  # (B, D): the state before latent i
        dst_b = jnp.where(pos_b >= 0, pos_b, T)  # a row without latent i writes out of range
        return x_btd.at[rows_b, dst_b].set(src_bd.astype(x_btd.dtype), mode="drop")

    def one_pass(x_btd, pos_b):
        # skipped, not masked, when no row has latent i (e.g. a whole stage-0 batch)
        return jax.lax.cond(jnp.any(pos_b >= 0), fill, lambda x, _: x, x_btd, pos_b), None

    x_btd, _ = jax.lax.scan(one_pass, x_btd, latent_pos_bm.T)  # M passes, one per latent
    return run(x_btd)  # pass M + 1: every latent filled


def coconut_loss(model, params, mb):
    """The trainer's loss contract: (sum of CE over supervised targets, {n_tokens, accuracy})."""
    logits_btv, _ = latent_forward(
        model, params, mb["inputs"], mb["positions"], mb["latent_pos"], mb["segment_ids"]
    )
    ce_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, mb["targets"])
    mask_bt = mb["loss_mask"]
    correct_bt = (jnp.argmax(logits_btv, axis=-1) == mb["targets"]) * mask_bt
    return (ce_bt * mask_bt).sum(), {"n_tokens": mask_bt.sum(), "accuracy": correct_bt.sum()}


LOSSES = {"coconut_cross_entropy": coconut_loss}
