"""Bad checkpoints give errors that name the tensor or key; failed writes leave nothing behind."""

import json

import numpy as np
import pytest
from hf_fixtures import save_hf_model
from safetensors.numpy import load_file, save_file

from jreason.model.hf import CheckpointError, load_hf, save_hf


def _rewrite_tensors(path, fn):
    f = path / "model.safetensors"
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    _, path = save_hf_model(tmp_path, "llama")
    _rewrite_tensors(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"
    ):
        load_hf(path)


def test_shape_mismatch_names_tensor_and_expected_shape(tmp_path):
    _, path = save_hf_model(tmp_path, "qwen2")

    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][
            :-1
        ]

    _rewrite_tensors(path, shrink)
    with pytest.raises(
        CheckpointError, match=r"k_proj\.weight has shape \(31, 64\), expected \(32, 64\)"
    ):
        load_hf(path)


def test_unexpected_tensor_is_reported(tmp_path):
    _, path = save_hf_model(tmp_path, "llama")
    _rewrite_tensors(path, lambda t: t.__setitem__("model.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(CheckpointError, match="model.extra.weight"):
        load_hf(path)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda c: c.update(model_type="gpt2"), r"unknown architecture model_type='gpt2'"),
        (lambda c: c.update(rope_scaling={"rope_type": "longrope", "factor": 2.0}), "longrope"),
        (
            lambda c: c.update(
                rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
            ),
            "dynamic",
        ),
        (lambda c: c.update(hidden_act="gelu"), "hidden_act='gelu'"),
        (lambda c: c.pop("hidden_size"), "hidden_size"),
    ],
    ids=["architecture", "rope-longrope", "rope-dynamic", "activation", "missing-key"],
)
def test_bad_config_names_the_key(tmp_path, edit, match):
    _, path = save_hf_model(tmp_path, "llama")
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        load_hf(path)


def test_not_a_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf(tmp_path)


def test_save_refuses_to_clobber_and_failed_save_leaves_old_output(tmp_path):
    _, path = save_hf_model(tmp_path, "llama")
    cfg, params = load_hf(path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        save_hf(out, cfg, params)
    # A failure midway (a bad tensor) with overwrite must not touch the existing directory.
    bad = dict(params)
    bad["final_norm"] = {"scale": object()}
    with pytest.raises(Exception):  # noqa: B017 - whatever numpy raises for a non-array
        save_hf(out, cfg, bad, overwrite=True)
    assert (out / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []
    save_hf(out, cfg, params, overwrite=True)
    assert not (out / "precious.txt").exists() and (out / "config.json").is_file()
