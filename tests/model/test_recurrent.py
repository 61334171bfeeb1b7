"""Recurrent depth: truncated backprop against a hand-written loop, no recompiles over r,
cached decode against the full forward, adaptive exit against fixed depth, the depth
distribution against its closed-form moments, and a few SFT steps through the shared step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from compile_count import count_compiles

from jreason.config import ConfigError
from jreason.model import recurrent as rc
from jreason.train.step import make_train_step

V, T, R = 64, 8, 4
CFG = rc.RecurrentConfig(
    vocab_size=V,
    d_model=32,
    n_heads=2,
    n_kv_heads=1,
    d_ff=64,
    n_prelude=1,
    n_core=1,
    n_coda=1,
    mean_recurrence=3,
    backprop_depth=2,
    max_recurrence=R,
    # a larger init than the default, so iterations visibly change the logits
    init_std=0.2,
)
KEY = jax.random.key(7)


@pytest.fixture(scope="module")
def tiny():
    return rc.init_recurrent(CFG, jax.random.key(0))


def _batch(B=2, seed=0):
    rng = np.random.default_rng(seed)
    seg = np.ones((B, T), np.int32)
    seg[:, T // 2 :] = 2  # two packed documents per row
    pos = np.concatenate([np.arange(T // 2), np.arange(T - T // 2)])
    return {
        "inputs": rng.integers(0, V, (B, T)).astype(np.int32),
        "targets": rng.integers(0, V, (B, T)).astype(np.int32),
        "positions": np.broadcast_to(pos, (B, T)).astype(np.int32),
        "segment_ids": seg,
        "loss_mask": np.ones((B, T), np.float32),
    }


def _ce(logits_btv, targets_bt):
    return optax.softmax_cross_entropy_with_integer_labels(logits_btv, targets_bt).sum()


def test_gradients_flow_only_through_the_last_k_iterations(tiny):
    model, params = tiny
    b = _batch()
    args = (b["inputs"], b["positions"], None, b["segment_ids"])

    def truncated(p, k):
        return _ce(model.apply(p, *args, num_steps=5, key=KEY, backprop_depth=k)[0], b["targets"])

    def hand_loop(p, n_frozen):
        """The definition: 5 plain iterations, the first n_frozen cut off from the gradient."""
        dec = model.module(p)
        mask, rope = dec.context(b["positions"], b["segment_ids"])
        e, _ = dec.encode(b["inputs"], b["positions"], mask, rope)
        s = rc.initial_state(KEY, b["positions"], CFG.d_model, CFG.state_std, jnp.float32)
        for i in range(5):
            s, _ = dec.core(s, e, b["positions"], mask, rope)
            # (a traced n_frozen, so one compilation serves n_frozen = 3 and 0)
            s = jnp.where(i < n_frozen, jax.lax.stop_gradient(s), s)
        return _ce(dec.decode(s, b["positions"], mask, rope)[0], b["targets"])

    @jax.jit
    def grads(p, n_frozen):
        vg = jax.value_and_grad
        return vg(truncated)(p, 2), vg(hand_loop)(p, n_frozen)

    (l_k2, g_k2), (l_ref, g_ref) = grads(params, 3)
    _, (l_full, g_full) = grads(params, 0)
    np.testing.assert_allclose(l_k2, l_ref, rtol=1e-6)
    np.testing.assert_allclose(l_full, l_ref, rtol=1e-6)  # truncation never changes the forward
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_k2, g_ref)
    # and truncation does change the gradient: the core and the prelude feeding it differ
    for name in ("core", "prelude", "embed"):
        diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), g_k2[name], g_full[name])
        assert max(jax.tree.leaves(diff)) > 1e-4, name


@pytest.fixture(scope="module")
def train_step(tiny):
    """The shared jitted step over `recurrent_cross_entropy_loss`, compiled once for two tests."""
    model, params = tiny
    optimizer, schedule = optax.adam(1e-2), optax.constant_schedule(1e-2)
    step = jax.jit(make_train_step(model, optimizer, schedule, rc.recurrent_cross_entropy_loss))
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": optimizer.init(params),
        "rng": jax.random.key_data(jax.random.key(0)),
    }
    return step, state


def _train_batch(seed: int):
    """(A=1 microbatch, b=4 rows, T) leaves, plus the microbatch's key data as `rng` (A, 2)."""
    batch = jax.tree.map(lambda x: x.reshape(1, 4, T), _batch(B=4, seed=1))
    return {**batch, "rng": jax.random.key_data(jax.random.key(seed))[None]}


def test_varying_depth_never_recompiles_the_train_step(train_step):
    step, state = train_step
    step(state, _train_batch(0))  # warm-up: the one compilation
    depths = set()
    with count_compiles() as compiles:
        for seed in range(1, 17):
            _, metrics = step(state, _train_batch(seed))
            depths.add(int(metrics["recurrence_steps"]))
    assert compiles == [], f"{len(compiles)} compilations after warm-up"
    # the depths seen cover both r <= k (no frozen iterations) and r > k
    assert min(depths) <= CFG.backprop_depth < max(depths), depths
    assert len(depths) >= 3, depths


def test_batch_key_without_rng_hashes_the_tokens():
    b = _batch()
    key_data = jax.random.key_data
    same = key_data(rc.batch_key({**b, "inputs": b["inputs"].copy()}))
    np.testing.assert_array_equal(key_data(rc.batch_key(b)), same)
    changed = b["inputs"].copy()
    changed[1, 3] = (changed[1, 3] + 1) % V
    assert not np.array_equal(key_data(rc.batch_key({**b, "inputs": changed})), same)
    swapped = b["inputs"][::-1].copy()  # same tokens, other rows: a different batch
    assert not np.array_equal(key_data(rc.batch_key({**b, "inputs": swapped})), same)


@pytest.fixture(scope="module")
def forward(tiny):
    """The uncached forward at a traced depth, jitted once for the tests below."""
    model, params = tiny
    return jax.jit(lambda t, p, r: model.apply(params, t, p, num_steps=r, key=KEY)[0])


def _prompt(B=2, seed=3):
    tokens = np.random.default_rng(seed).integers(0, V, (B, T)).astype(np.int32)
    return tokens, np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))


def test_cached_decode_matches_the_full_forward(tiny, forward):
    model, params = tiny
    tokens, pos = _prompt()
    step = jax.jit(lambda t, p, c, r: model.apply(params, t, p, c, num_steps=r, key=KEY))
    P = 5
    for r in (R, 2):
        full = forward(tokens, pos, r)
        cache = model.init_cache(2, 16)
        logits, cache = step(tokens[:, :P], pos[:, :P], cache, r)
        out = [logits]
        for t in range(P, T):
            logits, cache = step(tokens[:, t : t + 1], pos[:, t : t + 1], cache, r)
            out.append(logits)
        np.testing.assert_allclose(np.concatenate(out, axis=1), full, atol=1e-5)
        # iterations past r hold the latest computed one (r-1), for every written position
        k_core = np.asarray(cache["core"][0]["k"])  # (R, B, K, H, S)
        for i in range(r, R):
            np.testing.assert_array_equal(k_core[i, ..., :T], k_core[r - 1, ..., :T])
    assert not np.allclose(forward(tokens, pos, 2), forward(tokens, pos, R), atol=1e-3)


def test_inject_norm_feeds_the_core_a_unit_rms_e_and_keeps_cached_decode_exact(tiny):
    model, params = tiny  # inject_norm adds no parameters: the same params serve both configs
    normed, _ = rc.abstract_recurrent(CFG.replace(inject_norm=True))
    tokens, pos = _prompt()

    def e_of(m):
        dec = m.module(params)
        mask, rope = dec.context(pos)
        return np.asarray(dec.encode(tokens, pos, mask, rope)[0], np.float64)

    e, e_n = e_of(model), e_of(normed)
    rms = np.sqrt((e**2).mean(-1, keepdims=True) + CFG.norm_eps)
    assert not np.allclose(rms, 1.0, atol=0.1)  # without it e is not unit-scale
    np.testing.assert_allclose(e_n, e / rms, rtol=1e-5, atol=1e-6)

    full = normed.apply(params, tokens, pos, num_steps=3, key=KEY)[0]
    assert not np.allclose(full, model.apply(params, tokens, pos, num_steps=3, key=KEY)[0])
    cache = normed.init_cache(2, 16)
    logits, cache = normed.apply(params, tokens[:, :5], pos[:, :5], cache, num_steps=3, key=KEY)
    out = [logits]
    for t in range(5, T):
        logits, cache = normed.apply(
            params, tokens[:, t : t + 1], pos[:, t : t + 1], cache, num_steps=3, key=KEY
        )
        out.append(logits)
    np.testing.assert_allclose(np.concatenate(out, axis=1), full, atol=1e-5)


def test_sum_adapter_init_is_the_normal_init_plus_two_identities():
    _, p_normal = rc.init_recurrent(CFG, jax.random.key(0))
    _, p_sum = rc.init_recurrent(CFG.replace(adapter_init="sum"), jax.random.key(0))
    eye = np.eye(CFG.d_model, dtype=np.float32)
    want = np.asarray(p_normal["core"]["adapter"]) + np.concatenate([eye, eye])
    np.testing.assert_allclose(np.asarray(p_sum["core"]["adapter"]), want, rtol=1e-6)
    # every other parameter is untouched
    p_sum["core"]["adapter"] = p_normal["core"]["adapter"]
    jax.tree.map(np.testing.assert_array_equal, p_sum, p_normal)


def test_adaptive_exit(tiny, forward):
    model, params = tiny
    tokens, pos = _prompt()
    adaptive = jax.jit(
        lambda c, thr: model.apply_adaptive(params, tokens, pos, c, key=KEY, threshold=thr)
    )
    cache = model.init_cache(2, 16)

    # threshold 0: exactly fixed r = max_recurrence
    logits, _, steps = adaptive(cache, 0.0)
    assert (np.asarray(steps) == R).all()
    np.testing.assert_allclose(logits, forward(tokens, pos, R), atol=1e-5)

    # a huge threshold: every token stops at the first KL it can measure, i.e. 2 iterations
    logits, _, steps = adaptive(cache, 1e9)
    assert (np.asarray(steps) == 2).all()
    np.testing.assert_allclose(logits, forward(tokens, pos, 2), atol=1e-5)

    # Position 0 attends only to itself, so its iterates are the fixed-depth forwards' and its
    # exit step follows from their KLs; find a threshold at which steps differ across tokens.
    logp = [jax.nn.log_softmax(forward(tokens, pos, r)[:, 0], -1) for r in range(1, R + 1)]
    kl = [jnp.sum(jnp.exp(logp[i]) * (logp[i] - logp[i - 1]), -1) for i in range(1, R)]
    kl_b = np.stack(kl, axis=1)  # (B, R-1): KL(p_r || p_{r-1}) for r = 2..R
    mixed = None
    for thr in (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5):
        _, cache_a, steps = adaptive(cache, thr)
        steps = np.asarray(steps)
        below = kl_b < thr
        expect = np.where(below.any(1), below.argmax(1) + 2, R)
        np.testing.assert_array_equal(steps[:, 0], expect)
        if mixed is None and 2 <= steps.min() < steps.max() <= R:
            mixed = steps, np.asarray(cache_a["core"][0]["v"])  # (R, B, K, S, H)
    assert mixed is not None, "no threshold gave mixed exit steps"
    # a token that stopped at n has its latest K/V (iteration n-1) in iterations n..R-1
    steps, v_core = mixed
    for b in range(2):
        for t in range(T):
            n = steps[b, t]
            for i in range(n, R):
                np.testing.assert_array_equal(v_core[i, b, :, t], v_core[n - 1, b, :, t])


def test_sample_recurrence_moments():
    n = 4000
    keys = jax.random.split(jax.random.key(0), n)
    sample = jax.jit(jax.vmap(rc.sample_recurrence, in_axes=(0, None, None)))
    mean, sigma = 8.0, 0.5
    r = np.asarray(sample(keys, mean, sigma))
    assert r.dtype == np.int32 and r.min() >= 1
    # E[tau] = exp(mu + sigma^2/2) = mean, so E[r] = mean + 1 (the +1 shift), and
    # Var[r] = E[tau] + Var[tau] = mean + mean^2 (exp(sigma^2) - 1)  (law of total variance)
    var = mean + mean**2 * np.expm1(sigma**2)
    assert abs(r.mean() - (mean + 1)) < 4 * np.sqrt(var / n)  # 0.32; without -sigma^2/2: +1.06
    assert abs(r.var() / var - 1) < 0.15
    # sigma = 0: tau = mean exactly, r - 1 is Poisson(mean)
    r0 = np.asarray(sample(keys, 3.0, 0.0))
    assert abs(r0.mean() - 4) < 0.15 and abs(r0.var() / 3 - 1) < 0.15


def test_sft_steps_through_make_train_step_reduce_the_loss(train_step):
    step, state = train_step
    batch = _train_batch(123)  # a fixed batch (and so a fixed depth)
    losses = []
    for _ in range(6):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        assert metrics["recurrence_steps"] >= 1 and metrics["recurrence_count"] == 1
    assert losses[-1] < 0.8 * losses[0], losses


def test_config_errors_name_the_field():
    base = dict(vocab_size=V, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64)
    with pytest.raises(ConfigError, match="n_core: must be >= 1"):
        rc.RecurrentConfig(**base, n_core=0)
    with pytest.raises(ConfigError, match="adapter_init: must be 'normal' or 'sum'"):
        rc.RecurrentConfig(**base, adapter_init="eye")
    with pytest.raises(ConfigError, match="exit_threshold"):
        rc.RecurrentConfig(**base, exit_threshold=-1.0)
    with pytest.raises(ConfigError, match="n_kv_heads"):
        rc.RecurrentConfig(**{**base, "n_kv_heads": 3})
    assert rc.RecurrentConfig(**base).head_dim == 16


def test_preset_loads_and_counts_its_params():
    from jreason.model.config import preset_path

    cfg = rc.load_recurrent_config(preset_path("tiny-recurrent"), ["n_core=3"])
    assert (cfg.family, cfg.n_core) == ("recurrent", 3)
    for c in (cfg, CFG, CFG.replace(tie_embeddings=True, qkv_bias=True)):
        _, shapes = rc.abstract_recurrent(c)
        assert sum(x.size for x in jax.tree.leaves(shapes)) == c.n_params
