"""Random tiny Hugging Face models saved by transformers itself: the independent reference."""

from __future__ import annotations

import torch
import transformers

TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
}


def make_hf_model(family: str, seed: int = 0, **overrides):
    """A random model in fp32 with non-trivial norms and biases (so a dropped term shows)."""
    config_cls, model_cls = FAMILIES[family]
    kw = dict(TINY)
    if family == "qwen3":
        kw["head_dim"] = 24  # != hidden/heads: checks head_dim is read, not derived
    kw.update(overrides)
    torch.manual_seed(seed)
    config = config_cls(**kw)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))  # norms init to 1 and biases to 0 otherwise
    return model


def save_hf_model(tmp_path, family: str, seed: int = 0, **overrides):
    model = make_hf_model(family, seed, **overrides)
    path = tmp_path / f"hf-{family}"
    model.save_pretrained(path)
    return model, path
