"""Soft Thinking against independent references: plain greedy decoding (sampler.generate), and
an uncached numpy loop that builds each concept by hand and reruns the full forward pass with
the mixture inserted as an input embedding.

Every soft.generate call here uses the same batch shape (3 prompts, bucket 8, 12 new tokens,
top_k <= 8), so the module compiles the soft loop once per model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_count import count_compiles

from jreason.decode import sampler, soft
from jreason.model import load_config
from jreason.model.transformer import abstract_model

PROMPTS = [[1, 5, 9], [3, 4, 5, 6, 7, 8, 9, 10, 11], [2]]
N = 12  # max_new_tokens of every call
L = 32  # the reference's padded sequence length (one compilation)
THINK_END = 63
SHAPE = dict(max_new_tokens=N, bucket=8)


def _numpy_init(tie: bool):
    """A random tiny Qwen3 drawn with numpy (jax's init compiles for seconds on a busy CPU):
    norm scales 1, the rest N(0, 0.2) so greedy continuations are not all one token."""
    cfg = load_config("tiny-qwen3", ["vocab_size=64", f"tie_embeddings={str(tie).lower()}"])
    model, shapes = abstract_model(cfg)
    rng = np.random.default_rng(1)

    def draw(path, s):
        if "scale" in jax.tree_util.keystr(path):
            return jnp.ones(s.shape, s.dtype)
        return jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype)

    return model, jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def tiny():
    return _numpy_init(tie=True)


@pytest.fixture(scope="module")
def untied():
    return _numpy_init(tie=False)


_FORWARDS = {}


def _forward(model, params):
    """Uncached full forward over L input embeddings -> logits (L, V); causal, so positions
    past the real sequence do not change the logits before them. One jit per model."""
    if id(params) not in _FORWARDS:
        fwd = jax.jit(
            lambda x: model.apply(
                params, jnp.zeros((1, L), jnp.int32), jnp.arange(L)[None], inputs_embeds_btd=x
            )[0][0]
        )
        _FORWARDS[id(params)] = (
            params,  # keeps params alive so the id is not reused
            lambda xs: np.asarray(fwd(np.pad(np.stack(xs), ((0, L - len(xs)), (0, 0)))[None])),
        )
    return _FORWARDS[id(params)][1]


def np_concept(logits, k, top_p, min_p, temperature):
    """The concept by the paper's recipe, in numpy: (weights, token ids), most probable first."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    idx = np.argsort(-p, kind="stable")[:k]
    q = p[idx] / p[idx].sum()  # top-k, renormalized
    keep = (np.cumsum(q) - q < top_p) | (top_p >= 1)  # top-p on the renormalized top-k
    keep &= q >= min_p * q[0]
    w = np.where(keep, q, 0.0)
    return w / w.sum(), idx


def entropy(w):
    w = w[w > 0]
    return float(-(w * np.log(w)).sum())


def reference(model, params, prompt, steps, *, top_k=1, top_p=1.0, min_p=0.0, temperature=1.0):
    """Soft thinking by hand, ended only by the model (argmax `</think>`), then greedy answer
    tokens: (trace tokens, each soft step's entropy, each soft step's kept-token count)."""
    fwd = _forward(model, params)
    E = np.asarray(params["embed"], np.float32)
    xs = [E[t] for t in prompt]
    toks, ents, kept = [], [], []
    thinking = True
    for _ in range(steps):
        logits = fwd(xs)[len(xs) - 1]
        if thinking:
            w, idx = np_concept(logits, top_k, top_p, min_p, temperature)
            thinking = idx[0] != THINK_END
        if thinking:
            ents.append(entropy(w))
            kept.append(int((w > 0).sum()))
            toks.append(int(idx[0]))
            xs.append((w[:, None] * E[idx]).sum(0).astype(np.float32))
        else:  # `</think>` itself, then the greedy answer
            toks.append(THINK_END if len(toks) == len(ents) else int(np.argmax(logits)))
            xs.append(E[toks[-1]])
    return toks, ents, kept


def greedy_after(model, params, tokens, n):
    """Plain greedy continuation of a token sequence, uncached."""
    fwd = _forward(model, params)
    E = np.asarray(params["embed"], np.float32)
    seq = list(tokens)
    for _ in range(n):
        seq.append(int(np.argmax(fwd([E[t] for t in seq])[len(seq) - 1])))
    return seq[len(tokens) :]


@pytest.mark.parametrize("narrow", [dict(top_k=1), dict(top_k=8, top_p=1e-6)])
def test_one_token_concepts_are_greedy_decoding(tiny, narrow):
    """A concept of one token is that token's embedding: the whole trace, thinking and answer,
    is sampler.generate's greedy output; `</think>` (here a token the greedy trace of row 1
    writes) ends thinking where greedy wrote it, and rows without thinking just answer."""
    model, params = tiny
    greedy = [o["tokens"] for o in sampler.generate(model, params, PROMPTS, **SHAPE)]
    think_end = greedy[1][4]
    stop = greedy[0][6]
    assert think_end != stop
    greedy = [
        o["tokens"] for o in sampler.generate(model, params, PROMPTS, stop_ids=[stop], **SHAPE)
    ]
    thinking = [True, True, False]
    outs = soft.generate(
        model, params, PROMPTS, think_end_id=think_end, stop_ids=[stop], thinking=thinking,
        temperature=0.7, **narrow, **SHAPE,
    )  # fmt: skip
    for row, (out, ref) in enumerate(zip(outs, greedy)):
        assert out["tokens"] == ref
        if not thinking[row]:
            assert out["thinking_tokens"] is None and out["soft_steps"] == 0
            continue
        think = ref.index(think_end) if think_end in ref else len(ref)
        assert out["thinking_tokens"] == out["soft_steps"] == think
        assert out["end_reason"] == ("think_end" if think_end in ref else None)
        assert out["entropies"] == [0.0] * think
    assert outs[1]["end_reason"] == "think_end" and outs[1]["thinking_tokens"] == 4
    assert outs[0]["finish_reason"] == "stop" and outs[0]["tokens"][-1] == stop


def test_soft_steps_feed_the_hand_computed_mixture(tiny):
    """Each soft step's input is sum_i p_i embed[i] over the filtered, renormalized top-k: the
    numpy reference builds that mixture and reruns the uncached forward with it inserted; the
    argmax trace and the concept entropies of all 12 steps must agree, so every fed embedding
    was the mixture (to float tolerance)."""
    model, params = tiny
    knobs = dict(top_k=5, top_p=0.8, min_p=0.1, temperature=0.7)
    outs = soft.generate(model, params, PROMPTS, think_end_id=THINK_END, **knobs, **SHAPE)
    kept_all = []
    for prompt, out in zip(PROMPTS, outs):
        toks, ents, kept = reference(model, params, prompt, N, **knobs)
        assert out["tokens"] == toks
        np.testing.assert_allclose(out["entropies"], ents, rtol=1e-4, atol=1e-5)
        assert out["soft_steps"] == len(ents)
        assert out["end_reason"] == ("think_end" if len(ents) < N else None)
        kept_all += kept
    # the filters did something: mixtures of several tokens, and top-p / min-p cut below k
    assert max(kept_all) > 1 and any(1 < n < 5 for n in kept_all), kept_all


def test_concept_matches_numpy_per_row():
    """soft.concept on random logits, each row with its own knobs, against np_concept."""
    V, D = 40, 6
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, V)).astype(np.float32) * 2
    embed = rng.normal(size=(V, D)).astype(np.float32)
    rows = [  # k, top_p, min_p, temperature
        (3, 1.0, 0.0, 1.0),
        (6, 0.7, 0.0, 0.5),
        (8, 1.0, 0.2, 1.5),
        (5, 0.9, 0.05, 0.0),  # temperature 0: the argmax alone
    ]
    arrays = soft.SoftArrays(
        temperature=jnp.array([r[3] for r in rows], jnp.float32),
        top_k=jnp.array([r[0] for r in rows]),
        top_p=jnp.array([r[1] for r in rows], jnp.float32),
        min_p=jnp.array([r[2] for r in rows], jnp.float32),
        cold_entropy=jnp.zeros(4),
        cold_steps=jnp.ones(4, jnp.int32),
        max_thinking=jnp.ones(4, jnp.int32),
    )
    concept = jax.jit(soft.concept, static_argnums=(3, 4))
    x, top, ent = concept(jnp.asarray(logits), jnp.asarray(embed), arrays, 8, jnp.float32)
    for b, (k, top_p, min_p, temp) in enumerate(rows):
        if temp == 0:
            w, idx = np.ones(1), np.argsort(-logits[b], kind="stable")[:1]
        else:
            w, idx = np_concept(logits[b], k, top_p, min_p, temp)
        np.testing.assert_allclose(np.asarray(x[b]), w @ embed[idx], rtol=1e-5, atol=1e-6)
        assert int(top[b]) == idx[0]
        np.testing.assert_allclose(float(ent[b]), entropy(w), rtol=1e-5, atol=1e-6)


def expected_cold_stop(ents, tau, steps):
    """By hand: the first step t whose preceding `steps` soft steps all had entropy < tau."""
    run = 0
    for t, h in enumerate(ents):
        if run >= steps:
            return t
        run = run + 1 if h < tau else 0
    return len(ents) if run >= steps else None


def test_cold_stop_fires_at_the_step_computed_from_entropies(tiny):
    model, params = tiny
    knobs = dict(top_k=4, temperature=1.0, top_p=1.0)
    refs = [reference(model, params, p, N, **knobs) for p in PROMPTS]
    # a threshold between two of row 0's entropies, 3 low steps in a row (here the rows fire at
    # steps 6, 3, 4; row 0 after a run broken by one high-entropy step)
    ents0 = sorted(refs[0][1])
    tau, steps = (ents0[4] + ents0[5]) / 2, 3
    margin = min(abs(h - tau) for _, ents, _ in refs for h in ents)
    assert margin > 1e-3, margin  # so float rounding cannot move the firing step
    expected = [expected_cold_stop(ents, tau, steps) for _, ents, _ in refs]
    assert expected[0] is not None and steps < expected[0] < N, expected
    outs = soft.generate(
        model, params, PROMPTS, think_end_id=THINK_END, cold_stop_entropy=tau,
        cold_stop_steps=steps, **knobs, **SHAPE,
    )  # fmt: skip
    for (toks, ents, _), out, fire in zip(refs, outs, expected):
        if fire is None or fire >= N:  # no Cold Stop: as the reference, ended by the model or not
            assert out["tokens"] == toks
            assert out["end_reason"] == ("think_end" if len(ents) < N else None)
            continue
        assert out["end_reason"] == "cold_stop" and out["cold_stop"]
        assert out["thinking_tokens"] == out["soft_steps"] == fire
        assert out["tokens"][:fire] == toks[:fire]
        assert out["tokens"][fire] == THINK_END
        np.testing.assert_allclose(out["entropies"], ents[:fire], rtol=1e-4, atol=1e-5)


def test_budget_inserts_think_end_then_answers(tiny):
    """max_thinking_tokens (one per row here, None = no budget): `</think>` is inserted after
    exactly that many soft steps and the answer is the greedy continuation of what was fed."""
    model, params = tiny
    budgets = [3, None, 5]
    outs = soft.generate(
        model, params, PROMPTS, think_end_id=THINK_END, top_k=1, max_thinking_tokens=budgets,
        **SHAPE,
    )  # fmt: skip
    for prompt, out, budget in zip(PROMPTS, outs, budgets):
        toks, _, _ = reference(model, params, prompt, N)
        if budget is None:
            assert out["tokens"] == toks and out["end_reason"] is None
            continue
        assert THINK_END not in toks[:budget]  # the budget, not the model, ends the thinking
        trace = toks[:budget] + [THINK_END]
        assert out["tokens"][: budget + 1] == trace
        assert out["thinking_tokens"] == budget and out["end_reason"] == "budget"
        rest = greedy_after(model, params, prompt + trace, N - budget - 1)
        assert out["tokens"][budget + 1 :] == rest
    # with real mixtures too, and other knob values reuse the compiled loop
    with count_compiles() as compiles:
        outs = soft.generate(
            model, params, PROMPTS, think_end_id=THINK_END, top_k=6, top_p=0.9,
            max_thinking_tokens=4, cold_stop_entropy=0.01, cold_stop_steps=7, **SHAPE,
        )  # fmt: skip
    assert compiles == []
    for out in outs:
        assert out["tokens"][4] == THINK_END and out["soft_steps"] == 4
        assert out["end_reason"] == "budget" and len(out["entropies"]) == 4


def test_untied_embeddings_mix_the_input_table(untied):
    """With a separate lm_head the mixture still uses the input embedding table."""
    model, params = untied
    assert "lm_head" in params
    knobs = dict(top_k=3, top_p=0.9, temperature=0.8)
    outs = soft.generate(model, params, PROMPTS, think_end_id=THINK_END, **knobs, **SHAPE)
    for prompt, out in zip(PROMPTS, outs):
        toks, ents, _ = reference(model, params, prompt, N, **knobs)
        assert out["tokens"] == toks
        np.testing.assert_allclose(out["entropies"], ents, rtol=1e-4, atol=1e-5)
        assert out["end_reason"] == ("think_end" if len(ents) < N else None)


@pytest.mark.parametrize(
    "bad, name",
    [
        (dict(top_k=0), "top_k"),
        (dict(top_k=65), "top_k"),
        (dict(top_k=[2, 3]), "top_k"),  # 2 values for 3 prompts
        (dict(top_p=0.0), "top_p"),
        (dict(min_p=1.5), "min_p"),
        (dict(temperature=-1.0), "temperature"),
        (dict(cold_stop_entropy=-0.1), "cold_stop_entropy"),
        (dict(cold_stop_steps=0), "cold_stop_steps"),
        (dict(max_thinking_tokens=0), "max_thinking_tokens"),
        (dict(think_end_id=64), "think_end_id"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(stop_ids=[THINK_END]), "stop_ids"),
        (dict(stop_ids=[99]), "stop_ids"),
        (dict(answer_temperature=-1.0), "answer_temperature"),
        (dict(answer_top_p=2.0), "answer_top_p"),
        (dict(thinking=[True, 1, True]), "thinking"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_arguments_are_validated(tiny, bad, name):
    model, params = tiny
    kwargs = {"think_end_id": THINK_END, "max_new_tokens": N, **bad}
    with pytest.raises(ValueError, match=name):
        soft.generate(model, params, PROMPTS, **kwargs)


def test_prompts_are_validated(tiny):
    model, params = tiny
    for prompts in ([], [[1], []], [[1, 64]]):
        with pytest.raises(ValueError, match="prompt"):
            soft.generate(model, params, prompts, think_end_id=THINK_END, max_new_tokens=N)
