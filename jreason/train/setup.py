"""What every trainer builds before its first step: mesh, tokenizer, model, and evaluation.

Shared by SFT and RL so both read the same config sections the same way. A run directory keeps
its tokenizer (`run_dir/tokenizer/`), so a resumed or exported run uses the exact same ids.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

from jreason import config as config_lib
from jreason import distributed, sharding
from jreason.data import pipeline
from jreason.data.tasks import get_task
from jreason.data.verify import score_math
from jreason.decode.sampler import generate
from jreason.model import config as model_config
from jreason.model import recurrent, transformer
from jreason.model.store import abstract, load_model
from jreason.model.transformer import init_model
from jreason.tokenizer import load_tokenizer, train_sentencepiece

log = logging.getLogger(__name__)


def make_mesh(mesh_cfg):
    return sharding.make_mesh(
        mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, dcn_data=mesh_cfg.dcn_data
    )


def tokenizer_dir(cfg, run_dir: Path) -> Path:
    """Where the run's tokenizer files live (copied next to exported checkpoints)."""
    if cfg.tokenizer.path:
        path = Path(cfg.tokenizer.path)
        return path if path.is_dir() else path.parent
    if cfg.model.init_from:
        return Path(cfg.model.init_from)
    return run_dir / "tokenizer"


def build_tokenizer(cfg, run_dir: Path):
    """The configured tokenizer, the checkpoint's own, or a BPE trained on the task's text.

    The trained one is trained once, by process 0, into `run_dir/tokenizer/`; every process waits
    at a barrier until it is there (the run dir is on a filesystem all processes share) and then
    reads it, so all processes use the same ids. A resumed run finds it and trains nothing.
    """
    if cfg.tokenizer.path:
        return load_tokenizer(cfg.tokenizer.path)
    if cfg.model.init_from:
        return load_tokenizer(cfg.model.init_from)
    tok_dir = run_dir / "tokenizer"
    model_file = tok_dir / "tokenizer.model"
    if cfg.data.source != "task" and not model_file.is_file():
        raise config_lib.ConfigError(
            "tokenizer.path: required unless data.source=task (a tokenizer is trained on "
            "generated task text only)"
        )
    if distributed.is_main() and not model_file.is_file():
        _train_task_tokenizer(cfg, tok_dir)
    distributed.barrier("run_dir_tokenizer")
    if not model_file.is_file():
        raise FileNotFoundError(
            f"{model_file} is missing after process 0 trained it: is run_dir on a filesystem "
            "that every process shares?"
        )
    return load_tokenizer(model_file)


def _train_task_tokenizer(cfg, tok_dir: Path) -> None:
    task = get_task(cfg.data.task, **cfg.data.task_knobs)
    lines = []
    for ex in task.generate(cfg.seed + 7919, cfg.tokenizer.train_examples):
        lines += [ex.prompt, task.reference_completion(ex)]
    # Trained under a temporary name and renamed: a run killed mid-write must not leave a
    # truncated tokenizer.model that the next run (or another process) takes for finished.
    tmp = tok_dir / f".tokenizer.tmp-{os.getpid()}"
    train_sentencepiece(
        lines, cfg.tokenizer.vocab_size, tmp, split_digits=cfg.tokenizer.split_digits
    )
    os.replace(tmp.with_name(tmp.name + ".vocab"), tok_dir / "tokenizer.vocab")
    os.replace(tmp.with_name(tmp.name + ".model"), tok_dir / "tokenizer.model")  # the marker


def build_model(cfg, tokenizer, mesh):
    """(Model, params sharded over mesh, ModelConfig) from a checkpoint or a preset.

    A preset marked `family: recurrent` gives (RecurrentModel, params, RecurrentConfig) instead,
    with `model.overrides` naming RecurrentConfig fields (`n_core`, `mean_recurrence`, ...).
    """
    spec = cfg.model
    dtype_kw = {
        k: getattr(spec, k)
        for k in ("param_dtype", "dtype", "remat", "attention_impl")
        if getattr(spec, k) is not None
    }
    if spec.init_from:
        model_cfg, params = load_model(spec.init_from, mesh)
        if spec.overrides or dtype_kw:
            model_cfg = model_cfg.replace(**spec.overrides, **dtype_kw)
            params = jax.tree.map(
                lambda x: x.astype(model_cfg.param_dtype), params
            )  # dtype policy may have changed
        model, _, _ = abstract(model_cfg)  # a transformer or a recurrent-depth model
        if model_cfg.vocab_size < tokenizer.vocab_size:
            raise config_lib.ConfigError(
                f"model.init_from: vocab_size {model_cfg.vocab_size} is smaller than the "
                f"tokenizer's {tokenizer.vocab_size}"
            )
        return model, params, model_cfg
    if not spec.preset:
        raise config_lib.ConfigError("model: set model.preset or model.init_from")
    overrides = {"vocab_size": tokenizer.vocab_size, **spec.overrides, **dtype_kw}
    if model_config.preset_family(spec.preset) == "recurrent":
        base = recurrent.load_recurrent_config(model_config.preset_path(spec.preset))
        data = {**config_lib.to_dict(base), **config_lib.to_dict(overrides)}
        model_cfg = config_lib.from_dict(recurrent.RecurrentConfig, data)
        model, params = recurrent.init_recurrent(model_cfg, jax.random.key(cfg.seed), mesh=mesh)
        return model, params, model_cfg
    base = model_config.load_config(spec.preset)
    data = {**config_lib.to_dict(base), **config_lib.to_dict(overrides)}
    data["eos_token_ids"] = [i for i in sorted(tokenizer.stop_ids)]
    data["bos_token_id"], data["pad_token_id"] = tokenizer.bos_id, tokenizer.pad_id
    model_cfg = config_lib.from_dict(model_config.ModelConfig, data)
    model, params = init_model(model_cfg, jax.random.key(cfg.seed), mesh=mesh)
    return model, params, model_cfg


def is_recurrent(model_cfg) -> bool:
    """Whether `build_model` made a recurrent-depth model (model/recurrent.py)."""
    return isinstance(model_cfg, recurrent.RecurrentConfig)


def param_axes(model_cfg) -> dict:
    """Logical axis names of the params `build_model` made, for either kind of model."""
    return (recurrent if is_recurrent(model_cfg) else transformer).param_axes(model_cfg)


def eval_prompts(cfg, tokenizer, examples) -> list[list[int]]:
    """Each example's prompt as token ids, through the chat template as training saw it."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": ex.prompt}],
            add_generation_prompt=True,
            enable_thinking=cfg.data.thinking,
            tokenize=True,
        )
        for ex in examples
    ]


def evaluate(cfg, model, params, tokenizer) -> dict:
    """Greedy held-out accuracy: generate for eval examples and score with the task verifier."""
    n = cfg.eval.num_examples
    if n <= 0:
        return {}
    examples = pipeline.eval_examples(cfg.data, n)
    if cfg.data.source == "task":
        task = get_task(cfg.data.task, **cfg.data.task_knobs)
        score = task.score
    else:
        score = score_math
    correct, lengths = 0.0, []
    for i in range(0, n, cfg.eval.batch):
        chunk = examples[i : i + cfg.eval.batch]
        prompts = eval_prompts(cfg, tokenizer, chunk)
        outs = generate(
            model,
            params,
            prompts,
            max_new_tokens=cfg.eval.max_new_tokens,
            stop_ids=sorted(tokenizer.stop_ids),
            pad_id=tokenizer.pad_id or 0,
        )
        for ex, out in zip(chunk, outs):
            correct += score(tokenizer.decode(out["tokens"]), ex.answer)
            lengths.append(len(out["tokens"]))
    return {"accuracy": correct / len(examples), "mean_length": sum(lengths) / len(lengths)}
