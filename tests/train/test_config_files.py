"""Every shipped experiment config validates, and bad keys/values are named in the error."""

import pytest

from jreason.config import ConfigError, repo_root
from jreason.train.config import load_train_config

CONFIGS = sorted((repo_root() / "configs" / "sft").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_train_config(path)
    assert cfg.steps > 0 and cfg.data.global_batch % cfg.optim.grad_accum == 0


def test_errors_name_the_key_and_allowed_values():
    demo = repo_root() / "configs" / "sft" / "demo.yaml"
    with pytest.raises(ConfigError, match=r"unknown key optim\.lrr .*allowed keys: \[.*'lr'"):
        load_train_config(demo, ["optim.lrr=1e-3"])
    with pytest.raises(
        ConfigError, match=r"optim\.schedule: 'cosin' is not allowed; allowed values: \['cosine'"
    ):
        load_train_config(demo, ["optim.schedule=cosin"])
    with pytest.raises(ConfigError, match=r"steps: expected an integer, got 'many'"):
        load_train_config(demo, ["steps=many"])
    with pytest.raises(ConfigError, match="grad_accum"):
        load_train_config(demo, ["optim.grad_accum=3"])
    cfg = load_train_config(demo, ["optim.lr=3e-4", "mesh.fsdp=4"])
    assert cfg.optim.lr == 3e-4 and cfg.mesh.fsdp == 4
