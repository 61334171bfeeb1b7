"""The decode engine and sampler run a recurrent-depth model (model/recurrent.py).

Independent check: greedy decoding at a fixed depth r equals the argmax of the uncached full
forward at r, re-run for every token (the training forward, no cache, no engine). Adaptive exit
through the engine equals the sampler's adaptive run, threshold 0 equals fixed r = cap, and the
iterations recorded in the cache stay within [2, cap] and drop as the threshold grows.
"""

import jax
import numpy as np
import pytest
from greedy_reference import argmax_reference
from tiny_recurrent import tiny_recurrent

from jreason.decode import sampler
from jreason.decode.engine import Engine, Request
from jreason.model.recurrent import RecurrentConfig, init_recurrent

MAX_LEN = 32
PROMPTS = [[1, 5, 9], list(range(3, 14)), [2], [7, 7, 8, 30, 31]]
N_NEW = [8, 5, 9, 6]


@pytest.fixture(scope="module")
def rec():
    return tiny_recurrent()


def _run(model, params, max_slots=2):
    engine = Engine(model, params, max_slots=max_slots, max_len=MAX_LEN)
    ids = [engine.submit(Request(p, max_tokens=n)) for p, n in zip(PROMPTS, N_NEW)]
    results = engine.run_until_idle()
    return [results[i].tokens for i in ids]


def test_engine_greedy_at_fixed_depth_equals_the_uncached_forward(rec):
    model, params = rec
    model = model.with_depth(4)  # not the default depth (mean_recurrence 3)
    got = _run(model, params)
    for tokens, prompt, n in zip(got, PROMPTS, N_NEW):
        assert tokens == argmax_reference(model, params, prompt, n, length=MAX_LEN)


def test_adaptive_exit_in_the_engine(rec):
    model, params = rec
    cap = model.cfg.max_recurrence
    # threshold 0 never exits early: fixed r = cap
    assert _run(model.with_depth(cap, exit_threshold=0.0), params) == _run(
        model.with_depth(cap), params
    )
    adaptive = model.with_depth(cap, exit_threshold=1e-2)
    out = sampler.generate(adaptive, params, PROMPTS, max_new_tokens=max(N_NEW), bucket=16)
    assert _run(adaptive, params, max_slots=4) == [
        o["tokens"][:n] for o, n in zip(out, N_NEW)
    ]  # the engine (slots, admission) and the one-jit sampler: the same adaptive decode
    steps = [o["mean_steps"] for o in out]
    assert all(2 <= s <= cap for s in steps), steps
    fewer = sampler.generate(
        model.with_depth(cap, exit_threshold=1.0), params, PROMPTS, max_new_tokens=4, bucket=16
    )
    assert np.mean([o["mean_steps"] for o in fewer]) < np.mean(steps)


def test_with_depth_validates():
    cfg = RecurrentConfig(vocab_size=16, d_model=16, n_heads=2, n_kv_heads=2, d_ff=32)
    model, _ = init_recurrent(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match=r"recurrence: 0 is outside \[1, max_recurrence=64\]"):
        model.with_depth(0)
    with pytest.raises(ValueError, match="exit_threshold: must be >= 0"):
        model.with_depth(4, exit_threshold=-1.0)
