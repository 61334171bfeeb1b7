"""The jreason model directory (orbax params + model.yaml) and one loader for any model path.

A jreason model directory is what `jreason convert hf-to-jreason` writes and what training
exports:

    OUT/model.yaml      the ModelConfig
    OUT/params/         orbax (tensorstore) checkpoint of the params pytree
    OUT/tokenizer.*     tokenizer files copied from the source, if any

Orbax restores each array straight into its target sharding, as `load_hf` does for safetensors.
`load_model(path)` accepts either kind of directory, so every command takes `--model PATH`
whether PATH came from the Hub or from a jreason run.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jreason import config as config_lib
from jreason.atomic import atomic_dir
from jreason.model.config import ModelConfig, preset_family
from jreason.model.hf import copy_tokenizer_files, load_hf

MODEL_YAML = "model.yaml"


def is_jreason_dir(path: str | Path) -> bool:
    return (Path(path) / MODEL_YAML).is_file() and (Path(path) / "params").is_dir()


def is_hf_dir(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def save_model(
    path: str | Path,
    cfg: ModelConfig,
    params,
    *,
    tokenizer_dir: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes a jreason model directory atomically (temp dir, then rename)."""
    with atomic_dir(path, overwrite=overwrite) as tmp:
        config_lib.save(cfg, tmp / MODEL_YAML)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", params)
            ckptr.wait_until_finished()
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
    return Path(path).absolute()


def load_config_file(path: str | Path):
    """The directory's ModelConfig, or RecurrentConfig when its model.yaml says
    `family: recurrent` (a recurrent-depth model has no Hugging Face form, only this one)."""
    from jreason.model import recurrent

    file = Path(path) / MODEL_YAML
    if preset_family(file) == "recurrent":
        return recurrent.load_recurrent_config(file)
    return config_lib.load(ModelConfig, file)


def abstract(cfg):
    """(model, param shapes, logical param axes) for either kind of config."""
    from jreason.model import recurrent, transformer

    if isinstance(cfg, recurrent.RecurrentConfig):
        model, shapes = recurrent.abstract_recurrent(cfg)
        return model, shapes, recurrent.param_axes(cfg)
    model, shapes = transformer.abstract_model(cfg)
    return model, shapes, transformer.param_axes(cfg)


def load_jreason(path: str | Path, mesh=None, **cfg_overrides) -> tuple[ModelConfig, dict]:
    from jreason import sharding

    path = Path(path).absolute()
    saved = load_config_file(path)
    cfg = saved.replace(**{k: v for k, v in cfg_overrides.items() if v is not None})
    _, shapes, axes = abstract(cfg)
    if mesh is None:
        device = jax.local_devices()[0]
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), shapes)
    else:
        shardings = sharding.param_shardings(axes, mesh, shapes)
    target = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(path / "params", target)
    return cfg, params


def load_model(
    path: str | Path,
    mesh=None,
    *,
    param_dtype: str | None = None,
    dtype: str | None = None,
    attention_impl: str | None = None,
) -> tuple[ModelConfig, dict]:
    """Any model directory (Hugging Face or jreason) -> (ModelConfig, params)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path not found: {path}")
    kw = dict(param_dtype=param_dtype, dtype=dtype, attention_impl=attention_impl)
    if is_jreason_dir(path):
        return load_jreason(path, mesh, **kw)
    if is_hf_dir(path):
        return load_hf(path, mesh, **kw)
    raise ValueError(
        f"{path} is neither a jreason model directory ({MODEL_YAML} + params/) "
        "nor a Hugging Face one (config.json + *.safetensors)"
    )
