"""The decode step updates the KV cache in place and reads the weights where they are: no copy
of a cache buffer, and no copy or transpose of a weight, in the compiled step.

Not a timing: the compiled HLO is inspected for `copy` instructions whose shape is a cache
buffer's. Such copies came from XLA rewriting a one-slot cache write into an out-of-place
dynamic-update-slice (kv_cache.write); each costs a pass over the whole cache per layer per
token, which at long contexts outweighs reading the weights.
"""

import re

import jax
import numpy as np
import pytest
from tiny_recurrent import tiny_recurrent

from jreason.decode import slots
from jreason.decode.engine import Engine
from jreason.model.transformer import unstack_layers

MAX_LEN = 48


def _cache_copies(engine: Engine, n_steps: int, attend_len: int | None = None) -> list[str]:
    lowered = slots.generate.lower(engine.model, engine.params, engine.state, n_steps, attend_len)
    hlo = lowered.compile().as_text()
    shapes = {"[" + ",".join(map(str, x.shape)) + "]" for x in jax.tree.leaves(engine.state.cache)}
    copies = re.findall(r"= \w+(\[[0-9,]*\])\{[0-9,]*\} copy\(", hlo)
    return [c for c in copies if c in shapes]


@pytest.mark.parametrize("max_slots", [1, 3])
@pytest.mark.parametrize("n_steps", [1, 4])
@pytest.mark.parametrize("attend_len", [None, 16])  # the whole cache, or a prefix of it
def test_decode_step_writes_the_cache_in_place(tiny, max_slots, n_steps, attend_len):
    model, params = tiny
    engine = Engine(model, params, max_slots=max_slots, max_len=MAX_LEN)
    assert _cache_copies(engine, n_steps, attend_len) == []


def test_recurrent_one_slot_step_copies_no_more_than_three_slots():
    """The recurrent core's scan over its cache's iteration axis keeps one copy of each core
    and one of each prelude/coda buffer at any batch (a cost of the scan, not of the write);
    one slot used to add two more per layer and token."""
    model, params = tiny_recurrent()
    one, three = (
        _cache_copies(Engine(model, params, max_slots=b, max_len=MAX_LEN), 1) for b in (1, 3)
    )
    assert len(one) <= len(three)


def _weight_copies(engine: Engine, n_steps: int) -> list[str]:
    """copy/transpose instructions (fused or not) whose result has the shape of a projection
    or head weight, read as the 2-D matrix the matmul multiplies, either way round."""
    lowered = slots.generate.lower(engine.model, engine.params, engine.state, n_steps, None)
    hlo = lowered.compile().as_text()
    shapes = set()
    for w in jax.tree.leaves(engine.params):
        if w.ndim >= 2 and w.size >= 4096:
            for k in range(1, w.ndim):  # every split of its axes into (rows, cols)
                a, b = int(np.prod(w.shape[:k])), int(np.prod(w.shape[k:]))
                shapes |= {f"[{a},{b}]", f"[{b},{a}]", "[" + ",".join(map(str, w.shape)) + "]"}
    moved = re.findall(r"= \w+(\[[0-9,]*\])\{[0-9,]*\} (?:copy|transpose)\(", hlo)
    return [m for m in moved if m in shapes]


@pytest.mark.parametrize("out_major", [False, True])
@pytest.mark.parametrize("max_slots", [1, 4])
def test_decode_step_reads_the_weights_in_place(tiny, out_major, max_slots):
    """Either decode layout: no weight is copied or transposed per step. (Written as x @ w.T,
    the output-major product made XLA:CPU fuse a transposing copy of every weight into each
    1-row matmul: layers.dense_t.)"""
    model, params = tiny
    params = unstack_layers(params, out_major=out_major)
    assert ("head_vd" in params) == out_major
    engine = Engine(model, params, max_slots=max_slots, max_len=MAX_LEN)
    assert _weight_copies(engine, 1) == []
