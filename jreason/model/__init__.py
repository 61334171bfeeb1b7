"""Decoder models: Llama / Qwen2 / Qwen3 family, used functionally.

Shape letters (used in array names such as `x_btd`, `q_btnh`, `w_dnh` and einsum strings):

    B  batch                 T  query length            S  key / cache length
    D  model dim             F  MLP hidden dim          V  vocabulary
    N  query heads           K  key/value heads         H  head dim
    G  query heads per kv head (N // K)                 L  layers
    R  recurrence steps      C  chunk length (Markovian thinking)

Public names: `ModelConfig`, `load_config`, `Model`, `init_model`, `abstract_model`,
`init_cache`, `load_hf`, `save_hf`.
"""

from jreason.model.config import ModelConfig, RopeConfig, load_config
from jreason.model.kv_cache import init_cache
from jreason.model.transformer import Model, abstract_model, init_model

__all__ = [
    "Model",
    "ModelConfig",
    "RopeConfig",
    "abstract_model",
    "init_cache",
    "init_model",
    "load_config",
]
