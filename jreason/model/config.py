"""`ModelConfig`: one frozen dataclass that describes every supported decoder.

Llama 2/3, Qwen2/2.5, Qwen3 and Mistral-style models differ in a handful of switches (qkv bias,
q/k RMSNorm, tied embeddings, rope scaling, sliding window), so one config and one decoder cover
them; `family` only decides the Hugging Face architecture name written on export. Presets for
real and tiny sizes live in `configs/models/*.yaml` and load with `load_config("qwen2.5-0.5b")`.
A preset marked `family: recurrent` is a recurrent-depth `RecurrentConfig` instead
(model/recurrent.py); `preset_family` tells the two apart before loading.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from jreason import config as config_lib

ROPE_TYPES = ("default", "linear", "llama3", "yarn")
FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: base frequency plus an optional context-extension scheme."""

    theta: float = 10000.0
    type: Literal["default", "linear", "llama3", "yarn"] = "default"
    factor: float = 1.0
    # llama3: frequencies between these wavelength bounds are smoothly interpolated.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    head_dim: int | None = None  # None -> d_model // n_heads
    family: Literal["llama", "qwen2", "qwen3", "mistral"] = "llama"
    norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_seq_len: int = 4096
    qkv_bias: bool = False  # Qwen2
    o_bias: bool = False  # Llama `attention_bias` also biases o_proj
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k
    tie_embeddings: bool = False
    sliding_window: int | None = None
    init_std: float = 0.02
    # Dtype policy: parameters are stored in param_dtype and cast to dtype for compute.
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attention_impl: Literal["reference", "xla", "cudnn"] = "xla"
    # Rematerialization of each layer in the backward pass (see jax.checkpoint_policies).
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    # Training forward over the stacked layers: one `lax.scan` (compile time flat in depth, as
    # MaxText's scan_layers) or a Python loop (longer compiles, no stacked residual buffers:
    # ~10% faster steps for small models on CPU). Same math either way.
    scan_layers: bool = True
    # Training losses compute the output distribution this many positions at a time and never
    # hold the full (B, T, V) fp32 logits (model/vocab_head.py); 0 = all at once.
    logits_chunk: int = 0
    # Token ids recorded for export to config.json / generation_config.json.
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise config_lib.ConfigError(
                    f"head_dim: d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                    "set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise config_lib.ConfigError(
                f"n_kv_heads: n_heads={self.n_heads} must be a multiple of "
                f"n_kv_heads={self.n_kv_heads}"
            )
        if self.logits_chunk < 0:
            raise config_lib.ConfigError(f"logits_chunk: must be >= 0, got {self.logits_chunk}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
            if getattr(self, name) < 1:
                raise config_lib.ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")

    @property
    def n_params(self) -> int:
        """Parameter count (embeddings included), for reports and MFU."""
        D, F, N, K, H, V, L = (
            self.d_model,
            self.d_ff,
            self.n_heads,
            self.n_kv_heads,
            self.head_dim,
            self.vocab_size,
            self.n_layers,
        )
        attn = D * N * H * 2 + D * K * H * 2
        attn += (N * H + 2 * K * H) * self.qkv_bias + D * self.o_bias + 2 * H * self.qk_norm
        mlp = 3 * D * F + (2 * F + D) * self.mlp_bias
        per_layer = attn + mlp + 2 * D
        return L * per_layer + V * D * (1 if self.tie_embeddings else 2) + D

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)


def presets_dir() -> Path:
    return config_lib.repo_root() / "configs" / "models"


def list_presets() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def preset_path(name_or_path: str | Path) -> Path:
    """A preset name (`qwen2.5-0.5b`) or a YAML path -> the YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = presets_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise config_lib.ConfigError(
                f"unknown model preset {str(name_or_path)!r}; presets: {list_presets()}"
            )
    return path


def preset_family(name_or_path: str | Path) -> str:
    """The preset's `family` key: "recurrent" marks a RecurrentConfig (model/recurrent.py),
    anything else (or none) a ModelConfig."""
    return str(config_lib.load_yaml(preset_path(name_or_path)).get("family", "llama"))


def load_config(name_or_path: str | Path, overrides: list[str] = ()) -> ModelConfig:
    """A preset name (`qwen2.5-0.5b`) or a YAML path -> ModelConfig."""
    path = preset_path(name_or_path)
    if preset_family(path) == "recurrent":
        raise config_lib.ConfigError(
            f"{path}: family: recurrent is a recurrent-depth model, not a ModelConfig; load it "
            "with jreason.model.recurrent.load_recurrent_config"
        )
    return config_lib.load(ModelConfig, path, overrides)
