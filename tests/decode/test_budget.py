"""Thinking budgets in the engine, against a from-scratch reference of the s1 / Elastic rules.

The reference is one small loop over the plain full forward pass (no cache, greedy argmax):
before each token it applies the budgets, in the order a reader would (the trace cap, then the
thinking budget, then the answer budget, then a full Markovian chunk), and after each token it
handles `</think>` (replace an early one with the continuation, or accept it). The engine does
the same between device segments, with forced tokens fed into a live slot by `extend` and
Markovian resets re-prefilled, so a disagreement in either shows up as a different trace.

`think_end_id` is picked from what the random model actually emits, so the rules fire.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_count import count_compiles

from jreason.decode.budget import ThinkingBudget
from jreason.decode.engine import Engine, Request
from jreason.decode.markovian import MarkovianConfig

MAX_LEN = 64
BUCKETS = (8, 16, 32, 64)
MAX_SLOTS = 2  # one slot count for the whole file: every engine shares the compiled steps
PROMPT = [1, 5, 9]
WAIT = [7, 8]  # the continuation ("Wait") and answer prefix tokens: ids the model rarely emits
PREFIX = [11, 12]


@pytest.fixture(scope="module")
def next_token(tiny):
    """seq -> greedy next token by the plain forward pass (no cache, stacked layers).

    Right-padded to MAX_LEN so one compilation serves every call (causal attention).
    """
    model, params = tiny
    forward = jax.jit(lambda t_1s: model.apply(params, t_1s, jnp.arange(MAX_LEN)[None])[0])

    def greedy(seq):
        assert len(seq) <= MAX_LEN
        padded_1s = np.zeros((1, MAX_LEN), np.int32)
        padded_1s[0, : len(seq)] = seq
        return int(np.argmax(np.asarray(forward(padded_1s))[0, len(seq) - 1]))

    return greedy


def _engine(tiny):
    model, params = tiny
    return Engine(model, params, max_slots=MAX_SLOTS, max_len=MAX_LEN, buckets=BUCKETS)


@pytest.fixture(scope="module")
def free(tiny):
    """The unconstrained greedy trace of PROMPT: where to pick think_end_id from."""
    engine = _engine(tiny)
    rid = engine.submit(Request(PROMPT, max_tokens=30))
    return engine.run_until_idle()[rid].tokens


def budget_reference(next_token, prompt, tb, max_tokens, mk=None):
    """Greedy trace under a ThinkingBudget (and optional Markovian chunks with explicit
    keep_head/keep_tail), one full forward per token.

    Returns (trace, forced positions, thinking tokens, finish reason, chunk contexts).
    """
    assert mk is None or mk.keep_tail is not None, "give the reference an explicit keep_tail"
    query, trace, forced = list(prompt), [], []
    seq = list(query)  # what the model sees now
    contexts = [list(query)]
    thinking = answer_start = None  # set when </think> is accepted or forced
    unlimited = math.inf
    max_thinking = unlimited if tb.max_thinking_tokens is None else tb.max_thinking_tokens
    max_answer = unlimited if tb.max_answer_tokens is None else tb.max_answer_tokens

    def finish(reason):
        return trace, forced, len(trace) if thinking is None else thinking, reason, contexts

    def force(tokens):
        forced.extend(range(len(trace), len(trace) + len(tokens)))
        trace.extend(tokens)
        seq.extend(tokens)

    while True:
        if len(trace) >= max_tokens:
            return finish("length")
        if thinking is None and len(trace) >= max_thinking:  # out of budget: force the end
            thinking = len(trace)
            force([tb.think_end_id, *tb.answer_prefix_ids])
            answer_start = len(trace)
            continue
        if thinking is not None and len(trace) - answer_start >= max_answer:
            return finish("length")
        if mk is None and len(seq) >= MAX_LEN:
            return finish("length")
        if mk is not None and len(seq) >= len(query) + mk.chunk_size:
            if len(contexts) == mk.max_chunks:
                return finish("length")
            head, tail = mk.keep_head, mk.keep_tail
            kept = trace if len(trace) <= head + tail else trace[:head] + trace[len(trace) - tail :]
            seq[:] = query + kept
            contexts.append(list(seq))
            continue
        tok = next_token(seq)
        trace.append(tok)
        seq.append(tok)
        if thinking is None and tok == tb.think_end_id:
            if len(trace) - 1 < tb.min_thinking_tokens:  # too early: "Wait" instead
                trace.pop()
                seq.pop()
                force(list(tb.continuation_ids))
            else:
                thinking, answer_start = len(trace) - 1, len(trace)


def _cases(free):
    """name -> (ThinkingBudget, max_tokens, MarkovianConfig or None), think_end_id from `free`."""
    early = free[3]  # a token the greedy trace emits at once (and again soon after "Wait")
    assert free.index(early) == 3 and early not in WAIT
    late = next(t for t in free if free.index(t) > 10)  # not emitted within 10 tokens
    chunks = MarkovianConfig(chunk_size=8, keep_tail=4, max_chunks=8)
    return {
        "min_thinking": (
            ThinkingBudget(early, min_thinking_tokens=8, continuation_ids=WAIT),
            24,
            None,
        ),
        "max_thinking": (
            ThinkingBudget(
                late, max_thinking_tokens=10, answer_prefix_ids=PREFIX, max_answer_tokens=5
            ),
            40,
            None,
        ),
        "min_and_max": (
            ThinkingBudget(
                early,
                min_thinking_tokens=6,
                max_thinking_tokens=12,
                continuation_ids=WAIT[:1],
                answer_prefix_ids=PREFIX[:1],
                max_answer_tokens=6,
            ),
            40,
            None,
        ),
        # with Markovian chunks of 8 after a 3-token prompt: thinking is counted over chunks
        "markovian": (
            ThinkingBudget(
                free[2],
                min_thinking_tokens=5,
                max_thinking_tokens=14,
                continuation_ids=WAIT,
                answer_prefix_ids=PREFIX[:1],
                max_answer_tokens=10,
            ),
            60,
            chunks,
        ),
        # </think> + prefix forced exactly as the first chunk fills: they open the next context
        "markovian_forced_at_reset": (
            ThinkingBudget(
                free[2],
                min_thinking_tokens=3,
                max_thinking_tokens=8,
                continuation_ids=WAIT,
                answer_prefix_ids=PREFIX[:1],
            ),
            60,
            MarkovianConfig(chunk_size=8, keep_tail=4, max_chunks=5),
        ),
        # three forced tokens with room for one: they overflow into the next context
        "markovian_forced_overflow": (
            ThinkingBudget(
                free[2],
                min_thinking_tokens=3,
                max_thinking_tokens=7,
                continuation_ids=WAIT,
                answer_prefix_ids=PREFIX,
            ),
            60,
            MarkovianConfig(chunk_size=8, keep_tail=4, max_chunks=5),
        ),
    }


CASE_NAMES = [
    "min_thinking",
    "max_thinking",
    "min_and_max",
    "markovian",
    "markovian_forced_at_reset",
    "markovian_forced_overflow",
]


@pytest.fixture(scope="module")
def batched(tiny, free, next_token):
    """Every case through one 2-slot engine (continuous batching), with its reference."""
    cases = _cases(free)
    assert list(cases) == CASE_NAMES
    engine = _engine(tiny)
    ids = {
        name: engine.submit(Request(PROMPT, max_tokens=n, thinking=tb, markovian=mk))
        for name, (tb, n, mk) in cases.items()
    }
    results = engine.run_until_idle()
    refs = {
        name: budget_reference(next_token, PROMPT, tb, n, mk) for name, (tb, n, mk) in cases.items()
    }
    return cases, {name: results[rid] for name, rid in ids.items()}, refs


@pytest.mark.parametrize("name", CASE_NAMES)
def test_trace_equals_full_forward_reference(batched, name):
    cases, results, refs = batched
    _, _, mk = cases[name]
    got, (trace, _, thinking, finish, contexts) = results[name], refs[name]
    assert got.tokens == trace
    assert got.thinking_tokens == thinking
    assert got.finish_reason == finish
    if mk is not None:
        assert [c.context for c in got.chunks] == contexts
        assert got.peak_context <= len(PROMPT) + mk.chunk_size


def test_forced_tokens_and_only_they_have_nan_logprobs(batched):
    _, results, refs = batched
    for name in CASE_NAMES:
        forced = np.zeros(len(refs[name][0]), bool)
        forced[refs[name][1]] = True
        got = np.asarray(results[name].logprobs)
        np.testing.assert_array_equal(np.isnan(got), forced, err_msg=name)
        assert np.all(got[~forced] <= 0), name


def test_cases_exercise_the_rules(batched, free):
    """The hand-checkable shape of each case, so none of the comparisons above is vacuous."""
    cases, results, refs = batched

    # early </think> twice replaced by "Wait" (2 tokens each), then accepted with exactly
    # min_thinking_tokens = 8 tokens before it: the boundary is accepted, not replaced
    got, (_, forced, _, _, _) = results["min_thinking"], refs["min_thinking"]
    assert len(forced) == 4 and got.tokens[forced[0] : forced[0] + 2] == WAIT
    assert got.thinking_tokens == 8
    assert got.tokens[got.thinking_tokens] == cases["min_thinking"][0].think_end_id

    # thinking cut at 10 tokens, then </think> + prefix, then exactly 5 answer tokens
    got, end = results["max_thinking"], cases["max_thinking"][0].think_end_id
    assert got.tokens[:13] == free[:10] + [end, *PREFIX]
    assert len(got.tokens) == 18 and got.thinking_tokens == 10
    assert got.finish_reason == "length"

    # both: "Wait"s while under 6 tokens, </think> forced at 12, answer budget 6
    got, forced = results["min_and_max"], refs["min_and_max"][1]
    assert forced[0] < 6 and forced[-2:] == [12, 13]
    assert got.thinking_tokens == 12 and len(got.tokens) == 14 + 6

    # across chunks of 8: the forced </think> lands in a later chunk, thinking counts them all
    for name in ("markovian", "markovian_forced_at_reset", "markovian_forced_overflow"):
        got, tb = results[name], cases[name][0]
        assert got.thinking_tokens == tb.max_thinking_tokens and len(got.chunks) > 2, name
    # forced at the reset itself, or overflowing it: </think> + prefix open the next context
    for name, n_forced in (("markovian_forced_at_reset", 2), ("markovian_forced_overflow", 3)):
        got, tb = results[name], cases[name][0]
        assert got.chunks[1].context[-n_forced:] == [tb.think_end_id, *tb.answer_prefix_ids]


def test_thinking_budget_validation():
    with pytest.raises(ValueError, match="min_thinking_tokens=5 exceeds max_thinking_tokens=4"):
        ThinkingBudget(3, min_thinking_tokens=5, max_thinking_tokens=4, continuation_ids=[7])
    with pytest.raises(ValueError, match="continuation_ids"):
        ThinkingBudget(3, min_thinking_tokens=2)
    with pytest.raises(ValueError, match="continuation_ids must not contain think_end_id"):
        ThinkingBudget(3, min_thinking_tokens=2, continuation_ids=[7, 3])
    with pytest.raises(ValueError, match="max_thinking_tokens"):
        ThinkingBudget(3, max_thinking_tokens=0)
    with pytest.raises(ValueError, match="max_answer_tokens"):
        ThinkingBudget(3, max_answer_tokens=0)


@pytest.mark.parametrize("kind", ["forced_end", "continuation"])
def test_max_tokens_caps_the_trace_with_forced_tokens(tiny, free, kind):
    if kind == "forced_end":  # budget spent at 6 of max_tokens=7: </think> + 2 prefix tokens
        tb, max_tokens = ThinkingBudget(63, max_thinking_tokens=6, answer_prefix_ids=PREFIX), 7
    else:  # early </think> as token 3 of 3, replaced by the 2 tokens of WAIT
        tb = ThinkingBudget(free[2], min_thinking_tokens=5, continuation_ids=WAIT)
        max_tokens = 3
    engine = _engine(tiny)
    rid = engine.submit(Request(PROMPT, max_tokens=max_tokens, thinking=tb))
    got = engine.run_until_idle()[rid]
    assert got.finish_reason == "length"
    assert len(got.tokens) <= max_tokens, got.tokens


def test_peak_context_bound_holds_when_forced_tokens_overflow_the_last_chunk(tiny):
    mk = MarkovianConfig(chunk_size=8, keep_tail=4, max_chunks=1)
    tb = ThinkingBudget(63, max_thinking_tokens=7, answer_prefix_ids=PREFIX)  # 3 forced at 7
    engine = _engine(tiny)
    rid = engine.submit(Request(PROMPT, max_tokens=60, thinking=tb, markovian=mk))
    got = engine.run_until_idle()[rid]
    assert got.finish_reason == "length"
    assert all(len(c.context) + len(c.tokens) <= len(PROMPT) + 8 for c in got.chunks)
    assert got.peak_context <= len(PROMPT) + 8


def _mixed_requests(free, n, seed):
    """Plain, Markovian, budgeted and both; greedy and sampled; prompts in every bucket."""
    rng = np.random.default_rng(seed)
    ends = [t for t in free[:6] if t not in WAIT]  # think_end ids the model does emit
    out = []
    for i in range(n):
        kw = {"temperature": float(rng.choice([0.0, 0.9])), "seed": i}
        C = int(rng.choice([6, 8, 12]))
        if i % 4 in (1, 3):
            kw["markovian"] = MarkovianConfig(chunk_size=C, keep_head=int(rng.integers(0, 2)))
        if i % 4 in (2, 3):
            lo = int(rng.integers(0, 4))
            kw["thinking"] = ThinkingBudget(
                int(rng.choice(ends)),
                min_thinking_tokens=lo,
                max_thinking_tokens=lo + int(rng.integers(1, 12)),
                continuation_ids=WAIT[: int(rng.integers(1, 3))],
                answer_prefix_ids=PREFIX[: int(rng.integers(0, 3))],
                max_answer_tokens=int(rng.integers(1, 8)),
            )
        longest = MAX_LEN - C if "markovian" in kw else 40
        prompt = [*PROMPT, *rng.integers(1, 64, size=int(rng.integers(0, longest - 2)))]
        out.append(Request([int(t) for t in prompt], max_tokens=int(rng.integers(5, 40)), **kw))
    return out


def test_no_recompilation_in_steady_state(tiny, free):
    engine = _engine(tiny)
    assert engine.warmup() > 0  # every (prefill rows, bucket) shape admission can use
    # warm-up: a prompt in every prefill bucket, resets, "Wait", forced </think> + prefix, an
    # accepted </think> (re-arming in place), sampled and greedy
    warm = [Request(PROMPT + [5] * n, max_tokens=3) for n in (9, 17, 37)]
    warm += [
        Request(PROMPT, max_tokens=n, thinking=tb, markovian=mk)
        for tb, n, mk in _cases(free).values()
    ]
    warm += _mixed_requests(free, 8, seed=0)
    for r in warm:
        engine.submit(r)
    engine.run_until_idle()

    with count_compiles() as compiles:
        ids = [engine.submit(r) for r in _mixed_requests(free, 20, seed=1)]
        results = engine.run_until_idle()
    assert all(rid in results for rid in ids)
    assert sum(len(results[rid].chunks) > 1 for rid in ids) >= 3  # resets did happen
    assert sum(np.isnan(results[rid].logprobs).any() for rid in ids) >= 3  # and forcing
    assert compiles == [], f"{len(compiles)} compilations after warm-up"
