"""The `jreason` CLI end to end: convert both ways, reload with transformers, inspect."""

import json
import os
import subprocess
import sys

import numpy as np
import torch
import transformers
from hf_fixtures import save_hf_model


def jreason(*args, check=True):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.run(
        [sys.executable, "-m", "jreason", *map(str, args)], capture_output=True, text=True, env=env
    )
    if check and proc.returncode:
        raise AssertionError(f"jreason {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_help_lists_subcommands():
    out = jreason("--help").stdout
    for cmd in ("convert", "inspect"):
        assert cmd in out


def test_convert_round_trip_through_jreason_format(tmp_path):
    hf_model, hf_dir = save_hf_model(tmp_path, "qwen3")
    (hf_dir / "tokenizer_config.json").write_text("{}")  # tokenizer files travel along
    jr_dir, back = tmp_path / "jr", tmp_path / "back"
    jreason("convert", "hf-to-jreason", hf_dir, jr_dir)
    assert (jr_dir / "model.yaml").is_file() and (jr_dir / "tokenizer_config.json").is_file()
    jreason("convert", "jreason-to-hf", jr_dir, back)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    for name, p in hf_model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], p, rtol=0, atol=0)

    # refusing to overwrite is an error, and the existing output is untouched
    before = sorted(p.name for p in back.iterdir())
    proc = jreason("convert", "jreason-to-hf", jr_dir, back, check=False)
    assert proc.returncode != 0 and "not empty" in proc.stderr
    assert sorted(p.name for p in back.iterdir()) == before

    info = json.loads(jreason("inspect", jr_dir, "--json").stdout)
    assert info["kind"] == "jreason"
    assert info["n_params"] == sum(p.numel() for p in hf_model.parameters())
    shapes = dict((name, shape) for name, shape, _ in info["tensors"])
    assert shapes["layers/attn/q_proj"] == [2, 64, 4, 24]


def test_inspect_hf_dir_and_preset(tmp_path):
    _, hf_dir = save_hf_model(tmp_path, "llama")
    out = jreason("inspect", hf_dir).stdout
    assert "[huggingface]" in out and "model.safetensors" in out
    info = json.loads(jreason("inspect", "llama-3.1-8b", "--json").stdout)
    assert info["kind"] == "preset" and info["n_params"] == 8_030_261_248


def test_bad_paths_are_clear_errors(tmp_path):
    proc = jreason("convert", "hf-to-jreason", tmp_path / "nope", tmp_path / "out", check=False)
    assert proc.returncode != 0 and "not a Hugging Face model dir" in proc.stderr
    proc = jreason("inspect", tmp_path, check=False)
    assert proc.returncode != 0 and "not a model directory" in proc.stderr
    assert not (tmp_path / "out").exists()
    np.testing.assert_equal(sorted(os.listdir(tmp_path)), [])
