"""The random tiny model every decode test runs: one definition for the engine, Markovian and
budget tests."""

import jax
import pytest

from jreason.model import init_model, load_config


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("tiny-qwen3", ["vocab_size=64"])
    # scale up the init so greedy continuations are not all one token
    model, params = init_model(cfg.replace(init_std=0.2), jax.random.key(1))
    return model, params
