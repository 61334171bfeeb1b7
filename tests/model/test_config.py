"""ModelConfig presets against transformers' own parameter counts; config validation messages."""

import pytest
import torch
import transformers

from jreason.config import ConfigError, apply_overrides, from_dict
from jreason.model.config import ModelConfig, list_presets, load_config, preset_family
from jreason.model.hf import config_from_hf, config_to_hf

# recurrent-depth presets (`family: recurrent`) are RecurrentConfigs: tests/model/test_recurrent.py
DECODER_PRESETS = [n for n in list_presets() if preset_family(n) != "recurrent"]


@pytest.mark.parametrize("name", DECODER_PRESETS)
def test_preset_param_count_matches_transformers(name):
    cfg = load_config(name)
    hf_cfg = transformers.AutoConfig.for_model(**config_to_hf(cfg))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.n_params
    # and the config survives a trip through config.json
    assert config_from_hf(hf_cfg.to_dict(), param_dtype=cfg.param_dtype, dtype=cfg.dtype) == cfg


def test_unknown_key_and_wrong_type_are_named():
    base = dict(vocab_size=10, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=16)
    with pytest.raises(ConfigError, match=r"unknown key rope\.thetta .*allowed keys"):
        from_dict(ModelConfig, {**base, "rope": {"thetta": 1.0}})
    with pytest.raises(ConfigError, match=r"n_layers: expected an integer, got 'two'"):
        from_dict(ModelConfig, {**base, "n_layers": "two"})
    with pytest.raises(
        ConfigError, match=r"attention_impl: 'flash' is not allowed; allowed values"
    ):
        from_dict(ModelConfig, {**base, "attention_impl": "flash"})
    with pytest.raises(ConfigError, match="n_kv_heads"):
        from_dict(ModelConfig, {**base, "n_kv_heads": 3, "n_heads": 4})


def test_overrides_and_unknown_preset():
    cfg = load_config("tiny", ["n_layers=2", "rope.theta=5e5", "dtype=bfloat16"])
    assert (cfg.n_layers, cfg.rope.theta, cfg.dtype) == (2, 5e5, "bfloat16")
    assert apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]"]) == {"a": {"b": 1, "c": [1, 2]}}
    with pytest.raises(ConfigError, match="unknown model preset 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="recurrent-depth model.*load_recurrent_config"):
        load_config("tiny-recurrent")
