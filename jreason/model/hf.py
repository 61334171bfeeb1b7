"""Hugging Face checkpoints <-> jreason params, bit for bit.

`load_hf(dir, mesh)` reads `config.json` and single-file or index-sharded `*.safetensors` and
builds each parameter with `jax.make_array_from_callback`: every device asks only for its own
shard, and the callback reads only the rows and columns of the source tensors that shard needs
(safetensors slices are lazy), so a 70B load never holds a full host copy per device.

`save_hf(dir, cfg, params)` writes a directory that `transformers.AutoModelForCausalLM` loads:
config.json, generation_config.json, safetensors shards plus an index. It writes into a temporary
sibling directory and renames it into place, so a failure never leaves a half-written checkpoint
and never touches what was there before.

Layout differences handled here (HF -> jreason): linear weights are (out, in) in HF and (in, out)
here, with heads split out (`q_proj` (N*H, D) -> (D, N, H)); layers are stacked on a leading L
axis. Nothing else is renamed or rescaled.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jreason.atomic import atomic_dir
from jreason.model.config import ModelConfig, RopeConfig

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}


class CheckpointError(ValueError):
    """A checkpoint does not match what the config says; the message names tensor and shapes."""


# ----------------------------------------------------------------------------------------------
# config.json


def _get(hf: dict, key: str, default: Any = KeyError):
    if key in hf and hf[key] is not None:
        return hf[key]
    if default is KeyError:
        raise CheckpointError(f"config.json: missing required key {key!r}")
    return default


def config_from_hf(
    hf: dict, *, param_dtype: str | None = None, dtype: str | None = None
) -> ModelConfig:
    """config.json dict -> ModelConfig; unsupported features are errors that name the key."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CheckpointError(
            f"config.json: unknown architecture model_type={model_type!r}; "
            f"supported: {sorted(ARCHITECTURES)}"
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"config.json: hidden_act={act!r} is not supported; expected 'silu'")
    if hf.get("use_sliding_window") and model_type in ("qwen2", "qwen3"):
        raise CheckpointError(
            "config.json: use_sliding_window=true (per-layer sliding attention) is not supported"
        )
    rope_params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))

    # transformers >= 5 writes rope_parameters, older versions rope_scaling; both may be present.
    def kind(d):
        return d.get("rope_type", d.get("type", "default")) if d else "default"

    if scaling and rope_params and kind(scaling) != kind(rope_params):
        raise CheckpointError(
            f"config.json: rope_scaling (rope_type={kind(scaling)!r}) and rope_parameters "
            f"(rope_type={kind(rope_params)!r}) disagree"
        )
    merged = {**scaling, **{k: v for k, v in rope_params.items() if k != "rope_theta"}}
    rope_type = kind(merged)
    if rope_type not in ("default", "linear", "llama3", "yarn"):
        raise CheckpointError(
            f"config.json: rope_scaling rope_type={rope_type!r} is not supported; "
            "supported: default, linear, llama3, yarn"
        )
    rope_kw = {"theta": float(theta), "type": rope_type}
    for src, dst in [
        ("factor", "factor"),
        ("low_freq_factor", "low_freq_factor"),
        ("high_freq_factor", "high_freq_factor"),
        ("original_max_position_embeddings", "original_max_position_embeddings"),
        ("beta_fast", "beta_fast"),
        ("beta_slow", "beta_slow"),
        ("attention_factor", "attention_factor"),
        ("truncate", "truncate"),
    ]:
        if merged.get(src) is not None:
            rope_kw[dst] = merged[src]
    for unsupported in ("mscale", "mscale_all_dim"):
        if merged.get(unsupported):
            raise CheckpointError(f"config.json: rope_scaling {unsupported} is not supported")
    if rope_type == "yarn" and merged.get("factor") is None:
        raise CheckpointError("config.json: rope_scaling of type yarn needs 'factor'")

    n_heads = _get(hf, "num_attention_heads")
    attention_bias = bool(hf.get("attention_bias", False))
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    ckpt_dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    ckpt_dtype = _TORCH_DTYPES.get(ckpt_dtype, "float32")
    return ModelConfig(
        family=model_type,
        vocab_size=_get(hf, "vocab_size"),
        d_model=_get(hf, "hidden_size"),
        n_layers=_get(hf, "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_ff=_get(hf, "intermediate_size"),
        head_dim=hf.get("head_dim"),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope=RopeConfig(**rope_kw),
        max_seq_len=hf.get("max_position_embeddings", 4096),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type in ("llama", "qwen3") and attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
        param_dtype=param_dtype or ckpt_dtype,
        dtype=dtype or param_dtype or ckpt_dtype,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=hf.get("pad_token_id"),
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    if cfg.family == "qwen2" and cfg.o_bias:
        raise CheckpointError("qwen2 has no o_proj bias; set o_bias=false or family=llama")
    if cfg.family == "qwen2" and not cfg.qkv_bias:
        raise CheckpointError("qwen2 always has qkv bias; set qkv_bias=true or family=llama")
    if cfg.qk_norm != (cfg.family == "qwen3"):
        raise CheckpointError(f"qk_norm={cfg.qk_norm} does not match family={cfg.family!r}")
    if cfg.family in ("llama", "qwen3") and cfg.qkv_bias != cfg.o_bias:
        raise CheckpointError(
            f"{cfg.family}: attention_bias covers q/k/v and o alike; qkv_bias and o_bias must match"
        )
    rope = cfg.rope
    scaling = None
    if rope.type != "default":
        scaling = {"rope_type": rope.type, "factor": rope.factor}
        if rope.type == "llama3":
            scaling |= {
                "low_freq_factor": rope.low_freq_factor,
                "high_freq_factor": rope.high_freq_factor,
            }
        if rope.type == "yarn":
            scaling |= {"beta_fast": rope.beta_fast, "beta_slow": rope.beta_slow}
            if rope.attention_factor is not None:
                scaling["attention_factor"] = rope.attention_factor
            if not rope.truncate:
                scaling["truncate"] = False
        if rope.original_max_position_embeddings is not None:
            scaling["original_max_position_embeddings"] = rope.original_max_position_embeddings
    eos = list(cfg.eos_token_ids)
    out = {
        "architectures": [ARCHITECTURES[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": rope.theta,
        "rope_scaling": scaling,
        # transformers >= 5 reads rope_parameters; older versions read the two keys above.
        "rope_parameters": {"rope_theta": rope.theta, "rope_type": "default", **(scaling or {})},
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": cfg.param_dtype,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": cfg.pad_token_id,
        "use_cache": True,
    }
    if cfg.family in ("llama", "qwen3"):
        out["attention_bias"] = cfg.qkv_bias
    if cfg.family == "llama":
        out["mlp_bias"] = cfg.mlp_bias
    elif cfg.mlp_bias:
        raise CheckpointError(f"{cfg.family} has no mlp bias; set mlp_bias=false or family=llama")
    if cfg.family == "mistral":
        if cfg.qkv_bias or cfg.o_bias:
            raise CheckpointError("mistral has no attention bias")
        out["sliding_window"] = cfg.sliding_window
    elif cfg.sliding_window is not None:
        raise CheckpointError(
            f"sliding_window is only exported for family=mistral, not {cfg.family}"
        )
    if cfg.family in ("qwen2", "qwen3"):
        out["use_sliding_window"] = False
    return out


# ----------------------------------------------------------------------------------------------
# Tensor name and layout mapping. Each entry: params path, HF name (with {i} for stacked layers),
# and the layout transform from HF to jreason.


def _layout(cfg: ModelConfig) -> list[tuple[tuple[str, ...], str, str]]:
    L = "model.layers.{i}."
    rows = [(("embed",), "model.embed_tokens.weight", "copy")]
    a, m = ("layers", "attn"), ("layers", "mlp")
    rows += [
        (("layers", "attn_norm", "scale"), L + "input_layernorm.weight", "copy"),
        (("layers", "mlp_norm", "scale"), L + "post_attention_layernorm.weight", "copy"),
        ((*a, "q_proj"), L + "self_attn.q_proj.weight", "heads_in"),
        ((*a, "k_proj"), L + "self_attn.k_proj.weight", "heads_in"),
        ((*a, "v_proj"), L + "self_attn.v_proj.weight", "heads_in"),
        ((*a, "o_proj"), L + "self_attn.o_proj.weight", "heads_out"),
        ((*m, "gate_proj"), L + "mlp.gate_proj.weight", "transpose"),
        ((*m, "up_proj"), L + "mlp.up_proj.weight", "transpose"),
        ((*m, "down_proj"), L + "mlp.down_proj.weight", "transpose"),
    ]
    if cfg.qkv_bias:
        rows += [((*a, f"{x}_bias"), L + f"self_attn.{x}_proj.bias", "heads_bias") for x in "qkv"]
    if cfg.o_bias:
        rows += [((*a, "o_bias"), L + "self_attn.o_proj.bias", "copy")]
    if cfg.qk_norm:
        rows += [
            ((*a, f"{x}_norm", "scale"), L + f"self_attn.{x}_norm.weight", "copy") for x in "qk"
        ]
    if cfg.mlp_bias:
        rows += [
            ((*m, f"{x}_bias"), L + f"mlp.{x}_proj.bias", "copy") for x in ("gate", "up", "down")
        ]
    rows += [(("final_norm", "scale"), "model.norm.weight", "copy")]
    if not cfg.tie_embeddings:
        rows += [(("lm_head",), "lm_head.weight", "transpose")]
    return rows


def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape for one (unstacked) jreason parameter of `shape`."""
    if kind == "copy":
        return shape
    if kind == "transpose":
        return shape[::-1]
    if kind == "heads_in":  # (D, X, H) <- (X*H, D)
        return (shape[1] * shape[2], shape[0])
    if kind == "heads_out":  # (X, H, D) <- (D, X*H)
        return (shape[2], shape[0] * shape[1])
    if kind == "heads_bias":  # (X, H) <- (X*H,)
        return (shape[0] * shape[1],)
    raise AssertionError(kind)


def _read_block(read: Callable, kind: str, shape, index) -> np.ndarray:
    """Reads the block `index` (slices into the jreason layout `shape`) from an HF tensor."""
    idx = [slice(*s.indices(n)) for s, n in zip(index, shape)]
    if kind == "copy":
        return read(tuple(idx))
    if kind == "transpose":
        return read((idx[1], idx[0])).T
    if kind == "heads_in":
        d, x, h = idx
        H = shape[2]
        rows = slice(x.start * H, x.stop * H)
        block = read((rows, d))  # (x*H, d)
        return block.reshape(x.stop - x.start, H, -1).transpose(2, 0, 1)[:, :, h]
    if kind == "heads_out":
        x, h, d = idx
        H = shape[1]
        block = read((d, slice(x.start * H, x.stop * H)))  # (d, x*H)
        return block.reshape(block.shape[0], x.stop - x.start, H).transpose(1, 2, 0)[:, h, :]
    if kind == "heads_bias":
        x, h = idx
        H = shape[1]
        return read((slice(x.start * H, x.stop * H),)).reshape(x.stop - x.start, H)[:, h]
    raise AssertionError(kind)


def _to_hf(kind: str, w: np.ndarray) -> np.ndarray:
    if kind == "copy":
        return w
    if kind == "transpose":
        return w.T
    if kind == "heads_in":
        D, X, H = w.shape
        return w.transpose(1, 2, 0).reshape(X * H, D)
    if kind == "heads_out":
        X, H, D = w.shape
        return w.transpose(2, 0, 1).reshape(D, X * H)
    if kind == "heads_bias":
        return w.reshape(-1)
    raise AssertionError(kind)


# ----------------------------------------------------------------------------------------------
# Reading


class _SafetensorsReader:
    """Lazy, sliced reads of tensors spread over one or more safetensors files."""

    def __init__(self, path: Path, stack: contextlib.ExitStack):
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: path / f for name, f in weight_map.items()}
        else:
            shards = sorted(path.glob("*.safetensors"))
            if not shards:
                raise FileNotFoundError(f"{path}: no *.safetensors files and no index")
            files = {}
            for f in shards:
                with safe_open(f, framework="numpy") as h:
                    files.update({name: f for name in h.keys()})  # noqa: SIM118
        for f in set(files.values()):
            if not f.is_file():
                raise FileNotFoundError(f"{path}: the index names {f.name}, which is missing")
        self.files, self._stack, self._handles = files, stack, {}

    def _handle(self, name: str, framework: str):
        f = self.files[name]
        key = (f, framework)
        if key not in self._handles:
            self._handles[key] = self._stack.enter_context(safe_open(f, framework=framework))
        return self._handles[key]

    def has(self, name: str) -> bool:
        return name in self.files

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name, "numpy").get_slice(name).get_shape())

    def read(self, name: str, index) -> np.ndarray:
        sl = self._handle(name, "numpy").get_slice(name)
        dtype = sl.get_dtype()
        if dtype in ("BF16",):
            # numpy has no bfloat16; the flax backend returns it as a jax array (kept on CPU).
            with jax.default_device(jax.local_devices(backend="cpu")[0]):
                return np.asarray(self._handle(name, "flax").get_slice(name)[index])
        if dtype not in _ST_DTYPES:
            raise CheckpointError(f"{name}: unsupported dtype {dtype}")
        return sl[index]


def read_config(path: str | Path) -> dict:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
    return json.loads(cfg_file.read_text())


def load_hf(
    path: str | Path,
    mesh=None,
    *,
    param_dtype: str | None = None,
    dtype: str | None = None,
    attention_impl: str | None = None,
) -> tuple[ModelConfig, dict]:
    """Reads an HF model directory into (ModelConfig, params), sharded over `mesh` if given."""
    from jreason import sharding
    from jreason.model.transformer import abstract_model, param_axes

    path = Path(path)
    cfg = config_from_hf(read_config(path), param_dtype=param_dtype, dtype=dtype)
    if attention_impl:
        cfg = cfg.replace(attention_impl=attention_impl)
    _, shapes = abstract_model(cfg)
    axes = param_axes(cfg)
    if mesh is None:
        device = jax.local_devices()[0]
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), shapes)
    else:
        shardings = sharding.param_shardings(axes, mesh, shapes)

    params: dict = {}
    with contextlib.ExitStack() as stack:
        reader = _SafetensorsReader(path, stack)
        expected = set()
        for ppath, name, kind in _layout(cfg):
            target = _get_path(shapes, ppath)
            stacked = ppath[0] == "layers"
            layer_shape = target.shape[1:] if stacked else target.shape
            names = [name.format(i=i) for i in range(cfg.n_layers)] if stacked else [name]
            want = _hf_shape(kind, layer_shape)
            for n in names:
                expected.add(n)
                if not reader.has(n):
                    raise CheckpointError(f"{path}: missing tensor {n} (expected shape {want})")
                if reader.shape(n) != want:
                    raise CheckpointError(
                        f"{path}: tensor {n} has shape {reader.shape(n)}, expected {want}"
                    )
            callback = _block_reader(reader, names, kind, layer_shape, stacked, target.dtype)
            arr = jax.make_array_from_callback(
                target.shape, _get_path(shardings, ppath), callback, dtype=target.dtype
            )
            _set_path(params, ppath, arr)
        extra = sorted(
            n for n in set(reader.files) - expected if not n.endswith("rotary_emb.inv_freq")
        )
        if cfg.tie_embeddings:
            extra = [n for n in extra if n != "lm_head.weight"]
        if extra:
            raise CheckpointError(
                f"{path}: unexpected tensors not used by {cfg.family}: {extra[:5]}"
            )
    return cfg, params


def _block_reader(reader, names, kind, layer_shape, stacked, dtype):
    """The make_array_from_callback callback: one device's block of one parameter."""
    np_dtype = np.dtype(dtype)

    def read_layer(name, index):
        return _read_block(lambda ix: reader.read(name, ix), kind, layer_shape, index)

    def callback(index):
        if not stacked:
            return read_layer(names[0], index).astype(np_dtype)
        layers = range(*index[0].indices(len(names)))
        return np.stack([read_layer(names[i], index[1:]) for i in layers]).astype(np_dtype)

    return callback


def _get_path(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set_path(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


# ----------------------------------------------------------------------------------------------
# Writing


def save_hf(
    path: str | Path,
    cfg: ModelConfig,
    params: dict,
    *,
    max_shard_bytes: int = 4 << 30,
    tokenizer_dir: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes an HF directory transformers can load; atomic (temp dir + rename)."""
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        # checked before the (possibly long) gather of the params to host
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it")
    hf_config = config_to_hf(cfg)  # validate before writing anything
    tensors: dict[str, np.ndarray] = {}
    for ppath, name, kind in _layout(cfg):
        arr = np.asarray(jax.device_get(_get_path(params, ppath)))
        if ppath[0] == "layers":
            for i in range(cfg.n_layers):
                tensors[name.format(i=i)] = np.ascontiguousarray(_to_hf(kind, arr[i]))
        else:
            tensors[name] = np.ascontiguousarray(_to_hf(kind, arr))

    with atomic_dir(path, overwrite=overwrite) as tmp:
        shards, size = [[]], 0
        for name, t in tensors.items():
            if shards[-1] and size + t.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += t.nbytes
        weight_map = {}
        for k, names in enumerate(shards):
            fname = (
                "model.safetensors"
                if len(shards) == 1
                else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            )
            save_file({n: tensors[n] for n in names}, tmp / fname, metadata={"format": "pt"})
            weight_map.update({n: fname for n in names})
        if len(shards) > 1:
            total = sum(t.nbytes for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": hf_config["eos_token_id"]}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
    return path


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    src = Path(src)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, Path(dst) / name)
            copied.append(name)
    return copied
