"""The tiny random recurrent-depth model several test files check against their references."""

import jax

from jreason.model.recurrent import RecurrentConfig, init_recurrent

CONFIG = RecurrentConfig(
    vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64,
    n_prelude=1, n_core=1, n_coda=1, mean_recurrence=3, max_recurrence=6, init_std=0.3,
)  # fmt: skip


def tiny_recurrent():
    """(RecurrentModel, params): depth 3 by default, up to 6 iterations in a cache."""
    return init_recurrent(CONFIG, jax.random.key(2))
