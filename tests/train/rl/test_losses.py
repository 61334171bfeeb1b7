"""The clipped policy loss: hand-computed values for every aggregation, zero gradient where the
clip is active, accumulation invariance through the shared step, and trainer log-probs that
match the decode engine's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jreason.decode.engine import Engine, Request
from jreason.decode.markovian import MarkovianConfig
from jreason.model import load_config, vocab_head
from jreason.model.transformer import abstract_model
from jreason.train.rl.losses import aggregation_weights, make_loss, token_logprobs
from jreason.train.step import make_train_step

LOG_HALF = np.log(0.5)


class Bigram:
    """A stand-in model: the logits at a position are the table row of its input token. With a
    zero table every target has probability 1/2 (V = 2), so logp = log 0.5 and entropy = log 2."""

    def apply(self, params, inputs, positions, cache=None, segment_ids=None):
        return params["table"][inputs], None

    def token_stats(self, params, inputs, positions, segment_ids, targets, **kw):
        return vocab_head.logit_stats(self.apply(params, inputs, positions)[0], targets, **kw)


def _hand_batch(aggregation, **agg_kw):
    """3 rows x 3 tokens. Rows 0 and 1 are two chunks of one trace (id 7, A = +1), row 2 a trace
    of its own (id 9, A = -1). old = log 0.5 - log(ratio), so exp(logp - old) = ratio."""
    ratio = np.array([[1.0, 1.5, 0.5], [0.5, 1.0, 1.0], [1.0, 0.5, 1.0]])
    mask = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 0]], np.float32)
    adv = np.array([1.0, 1.0, -1.0])[:, None] * mask
    w, d = aggregation_weights(aggregation, mask, **agg_kw)
    return {
        "inputs": np.arange(9, dtype=np.int32).reshape(3, 3),  # one table row per token
        "targets": np.zeros((3, 3), np.int32),
        "positions": np.tile(np.arange(3, dtype=np.int32), (3, 1)),
        "segment_ids": np.ones((3, 3), np.int32),
        "loss_mask": mask,
        "old_logprobs_bt": (LOG_HALF - np.log(ratio)).astype(np.float32),
        "advantages_bt": adv.astype(np.float32),
        "loss_weights_bt": w,
        "loss_denom_bt": d,
    }


ZERO_TABLE = {"table": jnp.zeros((9, 2))}

# Per-token pg = -min(r A, clip(r, 1 - 0.2, 1 + 0.28) A) for the hand batch:
#   row 0 (A=+1): r=1 -> -1;  r=1.5 -> -min(1.5, 1.28) = -1.28 (clipped);  r=0.5 -> -0.5
#                 row sum -2.78 over 3 tokens
#   row 1 (A=+1): r=0.5 -> -0.5;  r=1 -> -1;                      row sum -1.5 over 2 tokens
#   row 2 (A=-1): r=1 -> 1;  r=0.5 -> -min(-0.5, -0.8) = 0.8 (clipped);  row sum 1.8 over 2
# All tokens: -2.78 - 1.5 + 1.8 = -2.48 over 7 tokens.
HAND = {
    # DAPO: -2.48 / 7
    "token_mean": (-2.48 / 7, 7),
    # GRPO: (-2.78/3 - 1.5/2 + 1.8/2) / 3 = (-0.926667 - 0.75 + 0.9) / 3 = -0.258889
    "seq_mean_token_mean": (-0.258889, 3),
    # Dr. GRPO, L = 4: (-2.78/4 - 1.5/4 + 1.8/4) / 3 = -2.48 / 12 = -0.206667
    "seq_mean_token_sum_norm": (-0.206667, 3),
    # Delethink: trace 7 = rows 0, 1: (-2.78 - 1.5) / (3 + 2) = -0.856; trace 9: 1.8 / 2 = 0.9;
    # mean over 2 traces: (-0.856 + 0.9) / 2 = 0.022
    "delethink": (0.022, 2),
}
AGG_KW = {"seq_mean_token_sum_norm": {"max_len": 4}, "delethink": {"seq_ids": [7, 7, 9]}}
DAPO = {"eps_low": 0.2, "eps_high": 0.28}


@pytest.mark.parametrize("aggregation", sorted(HAND))
def test_aggregations_match_hand_computation(aggregation):
    mb = _hand_batch(aggregation, **AGG_KW.get(aggregation, {}))
    loss_sum, aux = make_loss("ppo_clip", **DAPO)(Bigram(), ZERO_TABLE, mb)
    value, denominator = HAND[aggregation]
    assert float(aux["n_tokens"]) == denominator
    np.testing.assert_allclose(float(loss_sum / aux["n_tokens"]), value, atol=1e-6)
    # token metrics are sums over the 7 loss tokens, whatever the aggregation
    assert float(aux["token_count"]) == 7
    assert float(aux["token_clip_high"]) == 1  # row 0, r = 1.5 > 1.28 with A > 0
    assert float(aux["token_clip_low"]) == 1  # row 2, r = 0.5 < 0.8 with A < 0
    # ratios 1 + 1.5 + 0.5 + 0.5 + 1 + 1 + 0.5 = 6
    np.testing.assert_allclose(float(aux["token_ratio"]), 6.0, rtol=1e-6)
    np.testing.assert_allclose(float(aux["token_entropy"]), 7 * np.log(2), rtol=1e-6)


@functools.cache
def _sgd_step(**options):
    """The jitted shared step for the Bigram model, plain SGD with lr 1 (the update is -grad);
    cached so every aggregation reuses one compilation per batch shape (only data differs)."""
    step = make_train_step(
        Bigram(), optax.sgd(1.0), lambda s: 1.0, make_loss("ppo_clip", **options)
    )
    return jax.jit(step)


_KEY_DATA = jax.random.key_data(jax.random.key(0))


def _state(params):
    opt_state = optax.sgd(1.0).init(params)
    # rng: key data, as state.init_state makes it (the step splits it into microbatch keys)
    return {"step": 0, "params": params, "opt_state": opt_state, "rng": _KEY_DATA}


def _split(batch, accum):
    return {k: jnp.asarray(v).reshape(accum, -1, *np.shape(v)[1:]) for k, v in batch.items()}


@pytest.mark.parametrize("aggregation", sorted(HAND))
def test_step_metrics_one_row_per_microbatch(aggregation):
    """Through the step with 3 microbatches of 1 row: loss and token metrics divided right."""
    mb = _hand_batch(aggregation, **AGG_KW.get(aggregation, {}))
    _, m = _sgd_step(**DAPO)(_state(ZERO_TABLE), _split(mb, 3))
    value, denominator = HAND[aggregation]
    np.testing.assert_allclose(float(m["loss"]), value, atol=1e-6)
    np.testing.assert_allclose(float(m["policy_loss"]), value, atol=1e-6)
    assert float(m["tokens"]) == denominator and float(m["token_count"]) == 7
    np.testing.assert_allclose(float(m["token_clip_high"]), 1 / 7, rtol=1e-6)
    np.testing.assert_allclose(float(m["token_clip_low"]), 1 / 7, rtol=1e-6)
    np.testing.assert_allclose(float(m["token_ratio"]), 6 / 7, rtol=1e-6)


def test_kl_entropy_and_tis_terms_match_hand_computation():
    mb = _hand_batch("token_mean")
    # ref = logp - log 2 on every token: k1 = log 2 = 0.693147,
    # k3 = exp(-log 2) - (-log 2) - 1 = 0.5 + 0.693147 - 1 = 0.193147
    mb["ref_logprobs_bt"] = np.full((3, 3), LOG_HALF - np.log(2), np.float32)
    base = -2.48 / 7  # the token_mean hand value
    for est, kl in (("k1", 0.693147), ("k3", 0.193147)):
        loss_sum, aux = make_loss("ppo_clip", **DAPO, kl_coef=0.1, kl_estimator=est)(
            Bigram(), ZERO_TABLE, mb
        )
        # every token adds 0.1 * kl; token_mean weights sum to the denominator
        np.testing.assert_allclose(float(loss_sum) / 7, base + 0.1 * kl, atol=1e-6)
        np.testing.assert_allclose(float(aux["token_kl"]) / 7, kl, atol=1e-6)
    # entropy bonus: every token's entropy is log 2, so the loss drops by 0.01 * 0.693147
    loss_sum, _ = make_loss("ppo_clip", **DAPO, entropy_coef=0.01)(Bigram(), ZERO_TABLE, mb)
    np.testing.assert_allclose(float(loss_sum) / 7, base - 0.00693147, atol=1e-6)
    # TIS: old - engine = log 3 on row 2 token 0 (weight min(3, cap 2) = 2) and log 1.5 on
    # row 1 token 0 (weight 1.5); 1 elsewhere. Their pg terms 1 -> 2 and -0.5 -> -0.75:
    # (-2.48 + 1 - 0.25) / 7 = -1.73 / 7; mean weight (5 * 1 + 2 + 1.5) / 7 = 8.5 / 7
    engine = mb["old_logprobs_bt"].copy()
    engine[2, 0] -= np.log(3.0)
    engine[1, 0] -= np.log(1.5)
    engine[1, 2] = engine[2, 2] = np.nan  # off the mask (like forced tokens): ignored
    mb["engine_logprobs_bt"] = engine
    loss_sum, aux = make_loss("ppo_clip", **DAPO, tis_cap=2.0)(Bigram(), ZERO_TABLE, mb)
    np.testing.assert_allclose(float(loss_sum) / 7, -1.73 / 7, atol=1e-6)
    np.testing.assert_allclose(float(aux["token_tis_weight"]) / 7, 8.5 / 7, rtol=1e-6)


def test_gradient_is_zero_exactly_where_the_clip_is_active():
    # one row, one table row per token; (ratio, advantage) with eps_low 0.2, eps_high 0.28
    cases = [
        (1.5, +1.0, True),  # r > 1.28 with A > 0: clipped
        (0.5, -1.0, True),  # r < 0.8 with A < 0: clipped
        (1.5, -1.0, False),  # r > 1.28 but A < 0: min picks the unclipped r A
        (0.5, +1.0, False),  # r < 0.8 but A > 0: min picks r A
        (1.1, +1.0, False),  # inside the clip range
        (0.9, -1.0, False),
    ]
    ratio = np.array([[c[0] for c in cases]])
    adv = np.array([[c[1] for c in cases]], np.float32)
    mb = {
        "inputs": np.arange(6, dtype=np.int32)[None],
        "targets": np.zeros((1, 6), np.int32),
        "positions": np.arange(6, dtype=np.int32)[None],
        "segment_ids": np.ones((1, 6), np.int32),
        "loss_mask": np.ones((1, 6), np.float32),
        "old_logprobs_bt": (LOG_HALF - np.log(ratio)).astype(np.float32),
        "advantages_bt": adv,
        "loss_weights_bt": np.ones((1, 6), np.float32),
        "loss_denom_bt": np.ones((1, 6), np.float32),
    }
    loss_fn = make_loss("ppo_clip", **DAPO)
    grad = jax.jit(jax.grad(lambda p: loss_fn(Bigram(), p, mb)[0]))({"table": jnp.zeros((6, 2))})
    g_tv = np.asarray(grad["table"])
    for t, (_, _, clipped) in enumerate(cases):
        assert (np.all(g_tv[t] == 0)) == clipped, (t, g_tv[t])
    # unclipped, loss -r A with r = p / p_old: d/d logit_target = -A r (1 - p); p = 1/2.
    # Case 3 (r = 0.5, A = +1): -1 * 0.5 * 0.5 = -0.25 on the target, +0.25 on the other logit
    np.testing.assert_allclose(g_tv[3], [-0.25, 0.25], rtol=1e-6)


def _random_batch(aggregation, B=4, T=6, V=5, seed=0):
    """Rows of different lengths (so a mean of microbatch means would differ) with every
    optional field; old/ref/engine log-probs near the current ones so some ratios clip."""
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(V, V)).astype(np.float32)
    inputs = rng.integers(0, V, (B, T)).astype(np.int32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    logp = np.asarray(jax.nn.log_softmax(table[inputs]))
    logp = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    prompt = [1, 2, 1, 3]
    ends = [6, 3, 5, 4]  # completion tokens [prompt, end) per row; the rest is padding
    mask = np.zeros((B, T), np.float32)
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        mask[b, prompt[b] : ends[b]] = 1
        seg[b, : ends[b]] = 1
    kw = {"seq_ids": [0, 1, 0, 2]} if aggregation == "delethink" else {}  # rows 0, 2: one trace
    w, d = aggregation_weights(aggregation, mask, max_len=T, **kw)
    noise = lambda: rng.normal(scale=0.3, size=(B, T))  # noqa: E731
    batch = {
        "inputs": inputs,
        "targets": targets,
        "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
        "segment_ids": seg,
        "loss_mask": mask,
        "old_logprobs_bt": (logp + noise()).astype(np.float32),
        "engine_logprobs_bt": (logp + noise()).astype(np.float32),
        "ref_logprobs_bt": (logp + noise()).astype(np.float32),
        "advantages_bt": (rng.normal(size=(B, 1)) * mask).astype(np.float32),
        "loss_weights_bt": w,
        "loss_denom_bt": d,
    }
    return {"table": jnp.asarray(table)}, batch


@pytest.mark.parametrize("aggregation", sorted(HAND))
def test_two_microbatches_give_the_same_update_as_one(aggregation):
    params, batch = _random_batch(aggregation)
    step = _sgd_step(**DAPO, kl_coef=0.05, entropy_coef=0.01, tis_cap=2.0, temperature=0.8)
    s1, m1 = step(_state(params), _split(batch, 1))
    s2, m2 = step(_state(params), _split(batch, 2))
    assert float(m1["token_clip_low"] + m1["token_clip_high"]) > 0  # the clip is exercised
    # sgd(1): new params = params - grad, so this compares the gradients
    np.testing.assert_allclose(s2["params"]["table"], s1["params"]["table"], atol=1e-6)
    assert not np.allclose(s1["params"]["table"], params["table"])
    for k in m1:
        np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_nan_old_logprobs_mean_the_current_policy():
    """NaN old log-probs (the first update at the rollout's weights) give the same loss, metrics
    and gradient as old log-probs recomputed by a separate forward pass at those weights."""
    params, batch = _random_batch("seq_mean_token_mean")
    logp, _ = token_logprobs(
        Bigram(), params, batch["inputs"], None, None, batch["targets"], temperature=0.8
    )
    step = _sgd_step(**DAPO, tis_cap=2.0, temperature=0.8)
    recomputed = step(_state(params), _split(batch | {"old_logprobs_bt": np.asarray(logp)}, 1))
    nan = step(_state(params), _split(batch | {"old_logprobs_bt": np.full_like(logp, np.nan)}, 1))
    np.testing.assert_allclose(
        nan[0]["params"]["table"], recomputed[0]["params"]["table"], atol=1e-7
    )
    assert not np.allclose(nan[0]["params"]["table"], params["table"])
    for k in recomputed[1]:
        np.testing.assert_allclose(nan[1][k], recomputed[1][k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert float(nan[1]["token_ratio"]) == 1.0  # the mean ratio: exactly 1 on every token


def test_aggregation_weights_and_errors():
    mask = np.array([[0, 1, 1, 1], [0, 1, 0, 0], [1, 1, 0, 0]], np.float32)
    w, d = aggregation_weights("seq_mean_token_mean", mask)
    np.testing.assert_allclose(w[0], [0, 1 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(d, [[0, 1, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]])
    # packed: two sequences in row 0 (ids per token), rows 1 and 2 one trace
    ids = np.array([[5, 5, 6, 6], [8, 8, 8, 8], [8, 8, 8, 8]])
    w, d = aggregation_weights("delethink", mask, seq_ids=ids)
    # row 0: sequence 5 has one loss token, sequence 6 two; trace 8 three, over rows 1 and 2
    np.testing.assert_allclose(w, [[0, 1, 1 / 2, 1 / 2], [0, 1 / 3, 0, 0], [1 / 3, 1 / 3, 0, 0]])
    assert d.sum() == 3  # sequences 5, 6 and trace 8
    with pytest.raises(ValueError, match="allowed"):
        aggregation_weights("mean_of_means", mask)
    with pytest.raises(ValueError, match="max_len"):
        aggregation_weights("seq_mean_token_sum_norm", mask)
    with pytest.raises(ValueError, match="seq_ids"):
        aggregation_weights("delethink", mask)
    with pytest.raises(ValueError, match="allowed"):
        make_loss("ppo_clip", eps=0.2)
    with pytest.raises(ValueError, match="allowed"):
        make_loss("ppo_clip", kl_estimator="k2")


# ---- trainer log-probs == engine log-probs ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("tiny-qwen3", ["vocab_size=64"])
    model, shapes = abstract_model(cfg)
    rng = np.random.default_rng(1)  # numpy init: no init compile; N(0, 0.2) gives varied tokens

    def draw(path, s):
        if "scale" in jax.tree_util.keystr(path):
            return jnp.ones(s.shape, s.dtype)
        return jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype)

    return model, jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def recurrent():
    from tiny_recurrent import tiny_recurrent

    model, params = tiny_recurrent()
    return model.with_depth(4), params  # the trainer must score at the engine's depth, not 3


@pytest.mark.parametrize("kind", ["tiny", "recurrent"])
def test_token_logprobs_match_engine_logprobs(kind, request):
    """RL's trainer recomputes the rollout's log-probs: the same numbers as the engine's, for
    plain and Markovian requests, and for a recurrent-depth model at its decode depth."""
    model, params = request.getfixturevalue(kind)
    engine = Engine(model, params, max_slots=2, max_len=32, buckets=(8,))
    markov = MarkovianConfig(chunk_size=12, keep_tail=4, max_chunks=3)
    requests = [
        Request([1, 5, 9, 2], max_tokens=24, temperature=1.0, seed=3),
        Request(list(range(3, 11)), max_tokens=16, temperature=0.7, seed=4),
        Request([7, 8, 30], max_tokens=30, temperature=1.0, seed=5, markovian=markov),
    ]
    ids = [engine.submit(r) for r in requests]
    results = engine.run_until_idle()
    # one row per context the engine sampled from (each Markovian chunk is its own row)
    rows, T = [], 32
    for rid, req in zip(ids, requests):
        for chunk in results[rid].chunks:
            rows.append((chunk.context, chunk.tokens, chunk.logprobs, req.temperature))
    assert len(results[ids[2]].chunks) == 3  # the Markovian request did reset
    B = len(rows)
    inputs, targets = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    seg, temp = np.zeros((B, T), np.int32), np.zeros((B, 1, 1), np.float32)
    for b, (context, tokens, _, t) in enumerate(rows):
        seq = context + tokens
        inputs[b, : len(seq) - 1], targets[b, : len(seq) - 1] = seq[:-1], seq[1:]
        seg[b, : len(seq) - 1], temp[b] = 1, t
    positions = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    fn = jax.jit(functools.partial(token_logprobs, model))
    logp, _ = fn(params, inputs, positions, seg, targets, temp)
    n_checked = 0
    for b, (context, tokens, engine_lp, _) in enumerate(rows):
        ours = np.asarray(logp[b, len(context) - 1 : len(context) - 1 + len(tokens)])
        sampled = ~np.isnan(engine_lp)  # NaN: forced tokens the policy did not sample
        np.testing.assert_allclose(ours[sampled], np.asarray(engine_lp)[sampled], atol=1e-4)
        n_checked += sampled.sum()
    assert n_checked >= 24 + 16 + 20
