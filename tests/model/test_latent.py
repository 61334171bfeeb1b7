"""Continuous thoughts (Coconut): the scanned latent forward against a hand-written loop of
uncached forwards, labels and curriculum rows worked out by hand, gradients through the latent
chain, cached latent decoding against the uncached forward, the stage loop's optimizer reset,
and bad values naming their key."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jreason.config import ConfigError
from jreason.decode.latent import generate_latent
from jreason.model import latent as lt
from jreason.model.config import ModelConfig
from jreason.model.transformer import abstract_model, init_model
from jreason.train.config import OptimConfig

V = 40
TOK = lt.LatentTokens.after_vocab(V - 3)  # 37, 38, 39
CFG = ModelConfig(
    vocab_size=V,
    d_model=32,
    n_layers=2,
    n_heads=2,
    n_kv_heads=1,
    d_ff=64,
    # a larger init than the default, so a latent visibly changes what follows it
    init_std=0.2,
)
MODEL = abstract_model(CFG)[0]


@pytest.fixture(scope="module")
def tiny():
    return init_model(CFG, jax.random.key(0))


def _rows():
    """Three problems: 3 latents, 1 latent, and a plain row without markers."""
    rng = np.random.default_rng(0)

    def ids(n):
        return rng.integers(4, 30, n).tolist()

    q0, q1, q2 = ids(5), ids(3), ids(6)
    steps = [ids(2), ids(3), ids(2)]
    return [
        lt.build_row(q0, steps, ids(2), n_skip=3, n_latent=3, tokens=TOK),
        lt.build_row(q1, steps, ids(2), n_skip=1, n_latent=1, tokens=TOK),
        lt.build_row(q2, steps, ids(2), n_skip=0, n_latent=0, tokens=None),
    ]


SEQ, M = 24, 4  # every batch here has this shape, so one compiled forward serves them all


def _batch(rows):
    return lt.collate(rows, seq_len=SEQ, max_latents=M)


@jax.jit
def _ours(params, b):
    return lt.latent_forward(
        MODEL, params, b["inputs"], b["positions"], b["latent_pos"], b["segment_ids"]
    )[0]


def _hand_forward(params, b, latent_pos, detach=False):
    """The definition, in Python loops: a full uncached forward, then every row with an i-th
    latent gets the hidden state before it written in as that latent's input embedding, for
    i = 0, 1, ...; then the logits. `detach` cuts the chain (for the gradient test)."""
    args = (b["inputs"], b["positions"], None, b["segment_ids"])
    x = MODEL.module(params).embed_tokens(b["inputs"])
    for i in range(max(map(len, latent_pos))):
        _, _, h = MODEL.apply(params, *args, inputs_embeds_btd=x, return_hidden=True)
        for r, pos in enumerate(latent_pos):
            if i < len(pos):
                fed = h[r, pos[i] - 1]
                x = x.at[r, pos[i]].set(jax.lax.stop_gradient(fed) if detach else fed)
    return MODEL.apply(params, *args, inputs_embeds_btd=x)[0]


def test_latent_forward_equals_hand_written_loop(tiny):
    model, params = tiny
    rows = _rows()
    b = _batch(rows)
    logits = _ours(params, b)
    pos = tuple(tuple(r["latent_pos"]) for r in rows)
    ref = jax.jit(_hand_forward, static_argnums=2)(params, b, pos)
    for r, row in enumerate(rows):
        n = len(row["ids"])
        np.testing.assert_allclose(logits[r, :n], ref[r, :n], atol=2e-5, rtol=1e-5)
    # not vacuous: with the <latent> token's own embedding, what follows the latents differs
    plain = model.apply(params, b["inputs"], b["positions"], None, b["segment_ids"])[0]
    assert float(jnp.abs(plain[0, 8:12] - logits[0, 8:12]).max()) > 1e-2
    np.testing.assert_allclose(plain[2], logits[2], atol=2e-5)  # no latents: the plain forward


def test_labels_masked_on_question_markers_and_latents():
    row = lt.build_row([5, 6, 7], [[8, 9], [10]], [11, 3], n_skip=1, n_latent=2, tokens=TOK)
    B_, L_, E_ = TOK.bot, TOK.latent, TOK.eot
    assert row["ids"] == [5, 6, 7, B_, L_, L_, E_, 10, 11, 3]
    assert row["latent_pos"] == [4, 5]
    b = lt.collate([row], seq_len=12, max_latents=3, pad_id=0)
    assert b["inputs"][0].tolist() == [5, 6, 7, B_, L_, L_, E_, 10, 11, 3, 0, 0]
    assert b["targets"][0].tolist() == [6, 7, B_, L_, L_, E_, 10, 11, 3, 0, 0, 0]
    # targets 10, 11, 3 (the step left and the answer) only: from <eot> (t=6) to t=8
    assert b["loss_mask"][0].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0]
    assert b["segment_ids"][0].tolist() == [1] * 10 + [0, 0]
    assert b["latent_pos"][0].tolist() == [4, 5, -1]
    cot = lt.build_row([5, 6, 7], [[8, 9], [10]], [11, 3], n_skip=0, n_latent=0, tokens=None)
    assert cot["ids"] == [5, 6, 7, 8, 9, 10, 11, 3]
    assert lt.collate([cot], 8, 1)["loss_mask"][0].tolist() == [0, 0, 1, 1, 1, 1, 1, 0]


def test_curriculum_rows_by_stage():
    q, steps, a = [5], [[10], [11, 12], [13]], [20]
    B_, L_, E_ = TOK.bot, TOK.latent, TOK.eot
    cfg = lt.CoconutConfig(c_thought=2, max_latent_stage=2)

    def ids(stage, cfg=cfg):
        return lt.stage_row(q, steps, a, stage, cfg, TOK)["ids"]

    assert ids(0) == [5, B_, E_, 10, 11, 12, 13, 20]
    assert ids(1) == [5, B_, L_, L_, E_, 11, 12, 13, 20]
    assert ids(2) == [5, B_, *[L_] * 4, E_, 13, 20]
    # past max_latent_stage: every step dropped, latents stay at max * c
    assert ids(3) == [5, B_, *[L_] * 4, E_, 20]
    one = lt.CoconutConfig(c_thought=1, max_latent_stage=5)
    assert ids(2, one) == [5, B_, L_, L_, E_, 13, 20]
    # a stage beyond the problem's steps still adds its latents (Coconut's schedule)
    assert ids(4, one) == [5, B_, *[L_] * 4, E_, 20]
    nopad = lt.CoconutConfig(c_thought=1, max_latent_stage=5, pad_latent_to_max=False)
    assert lt.stage_layout(3, 6, nopad) == (3, 3) and lt.stage_layout(3, 6, one) == (3, 5)
    assert one.max_latents == 5 and cfg.max_latents == 4
    assert cfg.eval_latents(1) == 2 and cfg.eval_latents(7) == 4


def test_gradient_flows_through_the_latent_chain(tiny):
    """d(answer CE)/d(question embeddings) has a part that only the latent chain carries."""
    _, params = tiny
    rows = _rows()
    b, pos = _batch(rows), tuple(tuple(r["latent_pos"]) for r in rows)
    ids = rows[0]["ids"]
    last = len(ids) - 2  # row 0's last answer token is the target at `last`

    def ce(logits_btv):
        return optax.softmax_cross_entropy_with_integer_labels(logits_btv[0, last], ids[-1])

    @jax.jit
    def grads(p):
        question = np.asarray(ids[: pos[0][0] - 1])  # row 0's question ids (before <bot>)
        return [
            jax.grad(lambda p, f=f: ce(f(p)))(p)["embed"][question]
            for f in (
                lambda p: lt.latent_forward(
                    MODEL, p, b["inputs"], b["positions"], b["latent_pos"], b["segment_ids"]
                )[0],  # fmt: skip
                lambda p: _hand_forward(p, b, pos),
                lambda p: _hand_forward(p, b, pos, detach=True),
            )
        ]

    g_ours, g_chain, g_cut = grads(params)
    np.testing.assert_allclose(g_ours, g_chain, atol=1e-5, rtol=1e-4)
    via_latents = float(jnp.linalg.norm(g_ours - g_cut))
    assert via_latents > 0.05 * float(jnp.linalg.norm(g_ours)) > 0


def test_cached_latent_generation_equals_uncached_forward(tiny):
    model, params = tiny
    questions = [[5, 9, 11, 4, 20], [7, 8]]
    n_latent, new = 3, 6
    outs = generate_latent(
        model, params, questions, tokens=TOK, n_latent=n_latent, max_new_tokens=new, bucket=8
    )
    rows = []
    for q, out in zip(questions, outs):
        assert out["n_latent"] == n_latent and len(out["tokens"]) == new
        rows.append(
            lt.build_row(q, [], out["tokens"][:-1], n_skip=0, n_latent=n_latent, tokens=TOK)
        )
    logits = _ours(params, _batch([*rows, rows[0]]))  # (3 rows: the shape _ours compiled for)
    for r, (q, out) in enumerate(zip(questions, outs)):
        first = len(q) + n_latent + 1  # the <eot> position predicts the first text token
        logp = jax.nn.log_softmax(logits[r, first : first + new])
        assert jnp.argmax(logp, -1).tolist() == out["tokens"]
        got = jnp.take_along_axis(logp, jnp.asarray(out["tokens"])[:, None], 1)[:, 0]
        np.testing.assert_allclose(got, out["logprobs"], atol=1e-4)


def test_engine_thinks_continuous_thoughts_like_the_batch_generator(tiny):
    """Coconut requests in the continuous-batching engine, each with its own number of
    thoughts and next to a token-only request, give generate_latent's text and log-probs."""
    from jreason.decode.engine import Engine, Request
    from jreason.decode.latent import Thoughts

    model, params = tiny
    questions, n_latents, new = [[5, 9, 11, 4, 20], [7, 8], [5, 9, 11, 4, 20]], [3, 1, 0], 6
    engine = Engine(model, params, max_slots=2, max_len=24, buckets=(8,))
    plain = engine.submit(Request([3, 4, 5], max_tokens=new))
    rids = [
        engine.submit(Request([*q, TOK.bot], max_tokens=new, thoughts=Thoughts(TOK, n)))
        for q, n in zip(questions, n_latents)
    ]
    results = engine.run_until_idle()
    for rid, q, n in zip(rids, questions, n_latents):
        (ref,) = generate_latent(
            model, params, [q], tokens=TOK, n_latent=n, max_new_tokens=new, bucket=8
        )
        got = results[rid]
        assert got.tokens == ref["tokens"], (n, got.tokens, ref["tokens"])
        np.testing.assert_allclose(got.logprobs, ref["logprobs"], atol=1e-4)
        assert got.chunks[0].context == [*q, TOK.bot, *[TOK.latent] * n, TOK.eot]
        assert got.peak_context == len(q) + 1 + n + 1 + new
    assert len(results[plain].tokens) == new
    assert len({tuple(results[r].tokens) for r in rids[::2]}) == 2  # 3 thoughts vs none differ
    with pytest.raises(ValueError, match="must end with <bot>"):
        engine.submit(Request([1, 2], thoughts=Thoughts(TOK, 2)))
    with pytest.raises(ValueError, match="n must be an integer >= 0"):
        Thoughts(TOK, -1)
    with pytest.raises(ValueError, match="leaves no room"):
        engine.submit(Request([1, TOK.bot], thoughts=Thoughts(TOK, 22)))


def test_coconut_loss_in_the_train_step(tiny):
    """Step 1's reported loss is the CE of the (pre-update) forward, worked out from the
    logits; a few steps on one batch bring it down."""
    from jreason.train.coconut import train_stages

    model, params = tiny
    b = _batch(_rows())
    logp = jax.nn.log_softmax(_ours(params, b))
    ce = -jnp.take_along_axis(logp, jnp.asarray(b["targets"])[..., None], -1)[..., 0]
    expected = float((ce * b["loss_mask"]).sum() / b["loss_mask"].sum())
    cfg = lt.CoconutConfig(max_latent_stage=M, steps_per_stage=4)
    optim = OptimConfig(lr=1e-2, schedule="constant", warmup_steps=0, weight_decay=0.0)
    losses = []
    batch = {k: v[None] for k, v in b.items()}  # (A=1, b, T)
    train_stages(
        model, params, cfg, optim, lambda s, i: batch, [1],
        on_step=lambda s, i, m: losses.append(float(m["loss"])),
    )  # fmt: skip
    np.testing.assert_allclose(losses[0], expected, rtol=1e-5)
    assert losses[-1] < losses[0]
    assert jnp.all(params["embed"] == tiny[1]["embed"])  # the caller's params survive donation


@pytest.mark.parametrize("reset", [True, False])
def test_stage_loop_resets_the_optimizer_if_configured(reset):
    """A reset restarts the schedule and zeroes the moments at each stage (a quadratic loss:
    the loop does not care what it trains)."""
    from jreason.train.coconut import train_stages

    def loss(model, p, mb):
        return ((p["w"] - mb["target"][0]) ** 2).sum(), {"n_tokens": jnp.float32(1)}

    cfg = lt.CoconutConfig(steps_per_stage=3, reset_optimizer=reset)
    optim = OptimConfig(lr=0.1, schedule="linear", warmup_steps=0, weight_decay=0.0, b1=0.9)
    seen = []
    _, history = train_stages(
        None, {"w": jnp.zeros(2)}, cfg, optim, lambda s, i: {"target": jnp.ones((1, 1, 2))},
        [1, 2], loss_fn=loss, on_step=lambda s, i, m: seen.append(float(m["lr"])),
    )  # fmt: skip
    assert (seen[3] == seen[0]) is reset and seen[1] < seen[0]
    assert [h["stage"] for h in history] == [1, 2]


@pytest.mark.parametrize(
    "make,key",
    [
        (lambda: lt.CoconutConfig(c_thought=0), "c_thought"),
        (lambda: lt.CoconutConfig(max_latent_stage=-1), "max_latent_stage"),
        (lambda: lt.CoconutConfig(steps_per_stage="10"), "steps_per_stage"),
        (lambda: lt.CoconutConfig(reset_optimizer="yes"), "reset_optimizer"),
        (lambda: lt.stage_layout(3, -1, lt.CoconutConfig()), "stage"),
        (
            lambda: lt.collate(
                [lt.build_row([1] * 9, [], [2], n_skip=0, n_latent=0, tokens=None)],
                seq_len=8,
                max_latents=0,
            ),
            "seq_len",
        ),  # fmt: skip
        (
            lambda: lt.collate(
                [lt.build_row([1], [], [2], n_skip=0, n_latent=2, tokens=TOK)],
                seq_len=8,
                max_latents=1,
            ),
            "max_latents",
        ),  # fmt: skip
        (lambda: lt.build_row([1], [[2]], [3], n_skip=2, n_latent=0, tokens=TOK), "n_skip"),
        (lambda: lt.build_row([1], [], [3], n_skip=0, n_latent=1, tokens=None), "n_latent"),
        (lambda: lt.build_row([], [], [3], n_skip=0, n_latent=0, tokens=TOK), "question"),
    ],
)
def test_bad_values_name_their_key(make, key):
    with pytest.raises(ValueError, match=key):
        make()


def test_bad_generation_arguments_name_their_key(tiny):
    model, params = tiny
    with pytest.raises(ValueError, match="n_latent"):
        generate_latent(model, params, [[1]], tokens=TOK, n_latent=-1, max_new_tokens=2)
    with pytest.raises(ValueError, match="questions"):
        generate_latent(model, params, [[]], tokens=TOK, n_latent=1, max_new_tokens=2)
    with pytest.raises(ValueError, match="vocab_size"):
        big = lt.LatentTokens.after_vocab(V)
        generate_latent(model, params, [[1]], tokens=big, n_latent=1, max_new_tokens=2)


def test_latent_tokens_from_a_tokenizer():
    class Vocab:
        vocab_size = 100

        def __init__(self, pieces):
            self.pieces = pieces

        def token_to_id(self, t):
            return self.pieces.get(t)

    assert lt.LatentTokens.for_tokenizer(Vocab({})) == lt.LatentTokens(100, 101, 102)
    own = Vocab({"<bot>": 7, "<latent>": 8, "<eot>": 9})
    assert lt.LatentTokens.for_tokenizer(own) == lt.LatentTokens(7, 8, 9)
    assert lt.LatentTokens(100, 101, 102).vocab_size == 103
    assert issubclass(ConfigError, ValueError)


def test_layering_model_and_decode_never_import_train():
    import ast
    from pathlib import Path

    import jreason

    root = Path(jreason.__file__).parent
    for rel, banned in (("model/latent.py", ("train", "decode")), ("decode/latent.py", ("train",))):
        tree = ast.parse((root / rel).read_text())
        names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        ours = [m.split(".")[1] for m in names if m.startswith("jreason.")]
        assert ours and not set(ours) & set(banned), (rel, ours)
