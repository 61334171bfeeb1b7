"""Rollout rows: what each training row holds for plain and Markovian (chunked) traces, checked
against the engine's own records by hand."""

import math

import numpy as np
import pytest

from jreason.decode.engine import Chunk, Result
from jreason.train.rl.rollout import Sample, build_rows


def _sample(chunks, reward=1.0):
    tokens = [t for c in chunks for t in c.tokens]
    lps = [lp for c in chunks for lp in c.logprobs]
    result = Result(tokens, lps, "stop", len(chunks[0].context), chunks, None, 0)
    return Sample(list(chunks[0].context), result, "", reward, {})


def test_plain_rows_put_the_loss_on_sampled_completion_tokens_only():
    # prompt [5, 6, 7], completion [8, 9] with logprobs -0.1, -0.2
    s = _sample([Chunk([5, 6, 7], [8, 9], [-0.1, -0.2])])
    t = _sample([Chunk([5, 6], [4], [-0.3])])
    adv = np.array([[0.5, -0.5]])
    rows = build_rows(
        [[s, t]], adv, n_rows=3, seq_len=6, loss_agg="seq_mean_token_mean", max_len_norm=None
    )
    # row 0: inputs 5 6 7 8, targets 6 7 8 9; the loss is on targets 8 and 9 (indices 2, 3)
    np.testing.assert_array_equal(rows["inputs"][0], [5, 6, 7, 8, 0, 0])
    np.testing.assert_array_equal(rows["targets"][0], [6, 7, 8, 9, 0, 0])
    np.testing.assert_array_equal(rows["loss_mask"][0], [0, 0, 1, 1, 0, 0])
    np.testing.assert_allclose(rows["engine_logprobs_bt"][0, 2:4], [-0.1, -0.2])
    np.testing.assert_array_equal(rows["segment_ids"][0], [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(rows["positions"][0, :4], [0, 1, 2, 3])
    assert rows["advantages_bt"][0, 2] == 0.5 and rows["advantages_bt"][1, 1] == -0.5
    # row 1: inputs 5 6, targets 6 4, loss on target 4 only
    np.testing.assert_array_equal(rows["loss_mask"][1], [0, 1, 0, 0, 0, 0])
    # GRPO weights: 1/|o| per token (1/2 for row 0, 1/1 for row 1); one denominator per row
    np.testing.assert_allclose(rows["loss_weights_bt"][0, 2:4], [0.5, 0.5])
    np.testing.assert_allclose(rows["loss_weights_bt"][1, 1], 1.0)
    assert rows["loss_denom_bt"].sum() == 2  # two sequences; the padding row counts nothing
    assert rows["loss_mask"][2].sum() == 0


def test_markovian_rows_are_one_per_chunk_and_share_the_trace_weight():
    # query [1, 2]; chunk 1 samples [3, 4, 5]; a reset carries [5] (context [1, 2, 5]); chunk 2
    # gets a forced token 9 (NaN logprob: not sampled) then samples [6]
    nan = math.nan
    trace = _sample(
        [Chunk([1, 2], [3, 4, 5], [-1.0, -1.0, -1.0]), Chunk([1, 2, 5], [9, 6], [nan, -2.0])]
    )
    other = _sample([Chunk([1, 2], [7, 8], [-0.5, -0.5])])
    adv = np.array([[1.0, -1.0]])
    rows = build_rows(
        [[trace, other]], adv, n_rows=4, seq_len=6, loss_agg="delethink", max_len_norm=None
    )
    # chunk 2's row: inputs 1 2 5 9, targets 2 5 9 6; the forced 9 is context, 6 is trained
    np.testing.assert_array_equal(rows["targets"][1, :4], [2, 5, 9, 6])
    np.testing.assert_array_equal(rows["loss_mask"][1, :4], [0, 0, 0, 1])
    assert rows["advantages_bt"][1, 3] == 1.0  # the trace's advantage on every chunk
    # Delethink: each token of the trace weighs 1 / (sampled tokens of the whole trace) = 1/4,
    # the trace counts once in the denominator, however many chunks it has
    np.testing.assert_allclose(rows["loss_weights_bt"][0, 1:4], [0.25] * 3)
    np.testing.assert_allclose(rows["loss_weights_bt"][1, 3], 0.25)
    np.testing.assert_allclose(rows["loss_weights_bt"][2, 1:3], [0.5, 0.5])
    assert rows["loss_denom_bt"].sum() == 2


def test_a_row_longer_than_seq_len_is_an_error_naming_it():
    s = _sample([Chunk([1, 2, 3], [4, 5, 6], [-1.0] * 3)])
    with pytest.raises(ValueError, match="data.seq_len=4"):
        build_rows(
            [[s]], np.zeros((1, 1)), n_rows=1, seq_len=4, loss_agg="token_mean", max_len_norm=None
        )
