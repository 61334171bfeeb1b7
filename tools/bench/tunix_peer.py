"""tunix as a benchmark peer: its own Qwen2 on the same safetensors, and a word tokenizer.

The bench protocol names tunix (google-tunix, a JAX stack) as the peer wherever it does the same
job: `rl_step.py` runs its GRPO learner, `decode.py --tunix` its `Sampler`. Both load the
checkpoint the benchmark wrote for transformers and jreason
(`tunix.models.qwen2.params.create_model_from_safe_tensors`), so all sides run the very same
weights. tunix lives in its own virtualenv (it pins older transformers/safetensors; setup in
`rl_step.py`'s docstring), so this module is imported only there.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

PAD = 0  # pad id on every side; prompts never contain it


class WordTokenizer:
    """Token id i <-> the word "t<i>": encode/decode are exact, so both sides see the same ids.

    Has what tunix's TokenizerAdapter wants (encode, decode, bos_id, eos_id, pad_id) and what
    jreason's rollout wants (apply_chat_template(tokenize=True), stop_ids, decode, pad_id).
    bos_id 0 is falsy, so tunix adds no BOS; eos is an id outside the vocab, never sampled.
    """

    def __init__(self, vocab: int):
        self.vocab = vocab
        self.stop_ids = frozenset()  # jreason: no stop token, every completion runs to budget

    def encode(self, text: str, **_) -> list[int]:
        return [int(w[1:]) for w in text.split()]

    def decode(self, ids, **_) -> str:
        return " ".join(f"t{int(i)}" for i in ids)

    def bos_id(self) -> int:
        return 0

    def eos_id(self) -> int:
        return self.vocab  # out of the vocab: never sampled

    def pad_id(self) -> int:
        return PAD

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False, **_):
        text = messages[-1]["content"]
        return self.encode(text) if tokenize else text


def cpu_mesh():
    """tunix's one-device (fsdp, tp) = (1, 1) mesh, Auto axes, as rl_step.py runs it."""
    return jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def load_qwen2(path: Path, jcfg, mesh):
    """(tunix Qwen2 module, its ModelConfig) from the HF directory `path`, shaped like `jcfg`."""
    from tunix.models.qwen2 import model as qwen2_model
    from tunix.models.qwen2 import params as qwen2_params

    config = qwen2_model.ModelConfig(
        num_layers=jcfg.n_layers,
        vocab_size=jcfg.vocab_size,
        embed_dim=jcfg.d_model,
        hidden_dim=jcfg.d_ff,
        num_heads=jcfg.n_heads,
        head_dim=jcfg.head_dim,
        num_kv_heads=jcfg.n_kv_heads,
        rope_theta=int(jcfg.rope.theta),
        norm_eps=jcfg.norm_eps,
        use_tied_embedding=jcfg.tie_embeddings,
    )
    return qwen2_params.create_model_from_safe_tensors(str(path), config, mesh), config


class TunixGreedy:
    """tunix's `Sampler` over its Qwen2 `model`, greedy, prompts of `prompt_len` ids +
    `new_tokens` (`load`: the model from a checkpoint directory first)."""

    def __init__(self, model, config, tok: WordTokenizer, prompt_len: int, new_tokens: int):
        from tunix.generate import sampler as sampler_lib

        self.tok, self.prompt_len, self.new_tokens = tok, prompt_len, new_tokens
        self.sampler = sampler_lib.Sampler(
            model,
            self.tok,
            sampler_lib.CacheConfig(
                cache_size=prompt_len + new_tokens,
                num_layers=config.num_layers,
                num_kv_heads=config.num_kv_heads,
                head_dim=config.head_dim,
            ),
        )

    @classmethod
    def load(cls, path: Path, jcfg, prompt_len: int, new_tokens: int) -> TunixGreedy:
        model, config = load_qwen2(path, jcfg, cpu_mesh())
        return cls(model, config, WordTokenizer(jcfg.vocab_size), prompt_len, new_tokens)

    def generate(self, prompts: np.ndarray) -> np.ndarray:
        """(B, new_tokens) ids; a row tunix ended early (it reads a sampled pad id as the end)
        is padded with -1, so it never agrees with a real token."""
        out = self.sampler(
            [self.tok.decode(p) for p in prompts],
            max_generation_steps=self.new_tokens,
            max_prompt_length=self.prompt_len,
            eos_tokens=[self.tok.eos_id()],
            temperature=0.0,
        )
        rows = np.full((len(prompts), self.new_tokens), -1, np.int64)
        for i, t in enumerate(out.tokens):  # host arrays: the device work is done
            t = np.asarray(t)[: self.new_tokens]
            rows[i, : len(t)] = t
        return rows
