"""Markovian thinking in the engine, against a from-scratch reference of the Delethink rule.

The reference below never touches a KV cache: for every token it re-runs the plain full forward
pass over the whole current context and takes the argmax, and it applies the chunking rule as
the paper states it (chunk 1 = query + up to C tokens; a full chunk restarts from query +
trace[:h] + trace[-t:]; at most I chunks). The engine instead re-prefills a reset context into
a slot of a shared cache, between segments of continuous batching, so any drift in positions,
stale cache entries or bookkeeping shows up as a different greedy trace.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jreason.decode.engine import Engine, Request
from jreason.decode.markovian import MarkovianConfig
from jreason.decode.sampling import SamplingArrays, sample

MAX_LEN = 64
BUCKETS = (8, 16, 32, 64)
MAX_SLOTS = 2  # one slot count for the whole file: every engine shares the compiled steps


@pytest.fixture(scope="module")
def full_logits(tiny):
    """seq -> (len(seq), V) float64 logits of the plain forward pass (no cache, stacked layers).

    Right-padded to MAX_LEN so one compilation serves every call: causal attention makes the
    logits at position p independent of what follows.
    """
    model, params = tiny
    forward = jax.jit(lambda t_1s: model.apply(params, t_1s, jnp.arange(MAX_LEN)[None])[0])

    def logits(seq):
        assert len(seq) <= MAX_LEN
        padded_1s = np.zeros((1, MAX_LEN), np.int32)
        padded_1s[0, : len(seq)] = seq
        return np.asarray(forward(padded_1s), np.float64)[0, : len(seq)]  # (T, V)

    return logits


def _engine(tiny, max_len=MAX_LEN, buckets=BUCKETS):
    model, params = tiny
    return Engine(model, params, max_slots=MAX_SLOTS, max_len=max_len, buckets=buckets)


def markovian_reference(full_logits, prompt, C, head, tail, max_chunks, max_tokens, stop_ids=()):
    """(trace, chunk contexts, finish reason) for greedy Delethink, one full forward per token."""
    query, trace, contexts = list(prompt), [], []
    context = query
    while True:
        contexts.append(context)
        seq = list(context)
        while len(seq) < len(query) + C:  # a context holds at most query + C tokens
            if len(trace) == max_tokens:
                return trace, contexts, "length"
            tok = int(np.argmax(full_logits(seq)[-1]))
            seq.append(tok)
            trace.append(tok)
            if tok in stop_ids:
                return trace, contexts, "stop"
        if len(contexts) == max_chunks or len(trace) == max_tokens:
            return trace, contexts, "length"
        # the chunk is full: restart from the query + the head and tail of the trace
        if len(trace) <= head + tail:
            kept = trace
        else:
            kept = trace[:head] + (trace[len(trace) - tail :] if tail else [])
        context = query + kept


# (prompt, MarkovianConfig, the (keep_head, keep_tail) the reference applies, max_tokens)
CASES = {
    "default_tail": ([1, 5, 9], MarkovianConfig(chunk_size=8), (0, 4), 200),
    "head_and_tail": (
        [7, 7, 8, 30, 31],
        MarkovianConfig(chunk_size=10, keep_head=2, keep_tail=3, max_chunks=4),
        (2, 3),
        200,
    ),
    "max_tokens_mid_chunk": (
        list(range(3, 16)),
        MarkovianConfig(chunk_size=12, keep_tail=5, max_chunks=5),
        (0, 5),
        27,  # chunks of 12, 7, 7 new tokens, then 1 into the fourth
    ),
    "head_only": (
        [2],
        MarkovianConfig(chunk_size=6, keep_head=3, keep_tail=0, max_chunks=4),
        (3, 0),
        200,
    ),
    "long_prompt": (
        list(range(40, 60)),  # 20 + C = 32: the largest prefills of the file
        MarkovianConfig(chunk_size=12, max_chunks=3),
        (0, 6),
        200,
    ),
}


@pytest.fixture(scope="module")
def batched(tiny, full_logits):
    """The CASES and a plain request through one 2-slot engine, with their references."""
    engine = _engine(tiny)
    ids = {}
    for name, (prompt, mk, _, max_tokens) in CASES.items():
        ids[name] = engine.submit(Request(prompt, max_tokens=max_tokens, markovian=mk))
        if name == "head_and_tail":  # a plain request in the mix: slots free at odd times
            ids["plain"] = engine.submit(Request([4, 8, 15], max_tokens=10))
    results = engine.run_until_idle()
    refs = {}
    for name, (prompt, mk, (head, tail), max_tokens) in CASES.items():
        refs[name] = markovian_reference(
            full_logits, prompt, mk.chunk_size, head, tail, mk.max_chunks, max_tokens
        )
    return {name: results[rid] for name, rid in ids.items()}, refs


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_trace_equals_full_forward_reference(batched, name):
    results, refs = batched
    prompt, mk, _, _ = CASES[name]
    got, (trace, contexts, finish) = results[name], refs[name]
    assert len(contexts) > 1, "the case must reach at least one reset"
    assert got.tokens == trace
    assert got.finish_reason == finish
    # the chunk records: what the model saw, and what it generated from it
    assert [c.context for c in got.chunks] == contexts
    assert [t for c in got.chunks for t in c.tokens] == got.tokens
    assert [lp for c in got.chunks for lp in c.logprobs] == got.logprobs
    spans = [len(c.context) + len(c.tokens) for c in got.chunks]
    assert got.peak_context == max(spans) <= len(prompt) + mk.chunk_size


def test_cases_and_plain_request_finish_as_expected(batched, tiny):
    results, _ = batched
    assert results["max_tokens_mid_chunk"].finish_reason == "length"
    assert len(results["max_tokens_mid_chunk"].tokens) == 27
    assert [len(c.tokens) for c in results["max_tokens_mid_chunk"].chunks] == [12, 7, 7, 1]
    # max_chunks ends the others: C + (I - 1)(C - m) tokens
    for name in ("default_tail", "head_and_tail", "head_only", "long_prompt"):
        mk = CASES[name][1]
        assert len(results[name].chunks) == mk.max_chunks
        assert len(results[name].tokens) == mk.max_trace_tokens()
    plain = _engine(tiny)
    rid = plain.submit(Request([4, 8, 15], max_tokens=10))
    assert results["plain"].tokens == plain.run_until_idle()[rid].tokens


def test_chunk_logprobs_equal_full_forward_log_softmax(batched, full_logits):
    """What RL recomputes: log p(token | chunk context + the chunk's earlier tokens)."""
    results, _ = batched
    for name in CASES:
        for chunk in results[name].chunks:
            seq = chunk.context + chunk.tokens
            logits_tv = full_logits(seq)[len(chunk.context) - 1 : len(seq) - 1]
            shifted_tv = logits_tv - logits_tv.max(axis=-1, keepdims=True)
            logp_tv = shifted_tv - np.log(np.exp(shifted_tv).sum(axis=-1, keepdims=True))
            want = np.take_along_axis(logp_tv, np.asarray(chunk.tokens)[:, None], axis=-1)[:, 0]
            np.testing.assert_allclose(chunk.logprobs, want, atol=1e-4, err_msg=name)


def test_cache_of_query_plus_chunk_serves_a_trace_many_chunks_long(tiny, full_logits):
    C, prompts = 48, [list(range(1, 17)), [9, 3, 27, 1, 1, 40, 2, 8, 5]]
    assert max(map(len, prompts)) + C == MAX_LEN  # the cache holds exactly the longest query + C
    mk = MarkovianConfig(chunk_size=C, max_chunks=6)
    engine = _engine(tiny, max_len=MAX_LEN)
    ids = [engine.submit(Request(p, max_tokens=1000, markovian=mk)) for p in prompts]
    results = engine.run_until_idle()
    for rid, prompt in zip(ids, prompts):
        got = results[rid]
        assert len(got.tokens) == C + 5 * (C - C // 2)  # 168: over 2.5x the cache
        assert got.finish_reason == "length"
        assert got.peak_context <= len(prompt) + C
        trace, contexts, _ = markovian_reference(full_logits, prompt, C, 0, C // 2, 6, 1000)
        assert got.tokens == trace
        assert [c.context for c in got.chunks] == contexts

    too_long = Request(list(range(1, 18)), markovian=mk)  # 17 + 48 > 64
    with pytest.raises(ValueError, match=r"chunk_size=48.*max_len=64"):
        engine.submit(too_long)
    # without markovian mode the prompt alone must leave room in the cache
    with pytest.raises(ValueError, match="max_len"):
        engine.submit(Request(list(range(1, 65)), max_tokens=1))
    engine.submit(Request(list(range(1, 64)), max_tokens=1))  # 63 + 1 fits


def test_stop_id_in_a_later_chunk_and_max_tokens_within_the_first(tiny):
    prompt, mk = [1, 5, 9], MarkovianConfig(chunk_size=8)
    engine = _engine(tiny)
    rid = engine.submit(Request(prompt, max_tokens=200, markovian=mk))
    free = engine.run_until_idle()[rid].tokens
    # the first token that the trace emits only after the first reset
    first = next(i for i in range(8, len(free)) if free[i] not in free[:i])
    stop = free[first]

    ids = {
        "stop": engine.submit(Request(prompt, max_tokens=200, stop_ids=[stop], markovian=mk)),
        "length": engine.submit(Request(prompt, max_tokens=5, markovian=mk)),
    }
    results = engine.run_until_idle()
    got = results[ids["stop"]]
    assert got.tokens == free[: first + 1]  # the stop token is kept
    assert got.finish_reason == "stop"
    assert len(got.chunks) == 1 + (first - 8) // 4 + 1  # chunks of 8, then 4 new tokens each
    got = results[ids["length"]]
    assert got.tokens == free[:5]
    assert got.finish_reason == "length"
    assert len(got.chunks) == 1


def test_sampled_requests_are_reproducible_across_resets_and_company(tiny, full_logits):
    mk = MarkovianConfig(chunk_size=8, max_chunks=4)
    probe = Request([4, 8, 15, 16], max_tokens=100, temperature=1.0, seed=7, markovian=mk)
    alone_engine = _engine(tiny)
    rid = alone_engine.submit(probe)
    alone = alone_engine.run_until_idle()[rid]
    assert len(alone.chunks) == 4

    crowded = _engine(tiny)
    fillers = [
        Request([3, 1], max_tokens=100, temperature=1.0, seed=7, markovian=mk),  # same seed
        Request([9, 9, 9], max_tokens=6, temperature=0.8, seed=2),
        Request(list(range(20)), max_tokens=100, markovian=MarkovianConfig(chunk_size=6)),
    ]
    for r in fillers:
        crowded.submit(r)
    rid = crowded.submit(probe)  # admitted mid-flight, next to requests in their own chunks
    got = crowded.run_until_idle()[rid]
    assert got.tokens == alone.tokens
    np.testing.assert_allclose(got.logprobs, alone.logprobs, rtol=1e-5, atol=1e-6)

    # the key of sampled token i is fold_in(key(seed), i) with i counted over the whole trace,
    # not restarted per chunk: replay the draws on full-forward logits of each chunk's context
    sp = SamplingArrays.fill(1, temperature=1.0)
    draw = jax.jit(
        lambda logits_v, i: sample(
            logits_v[None], jax.random.fold_in(jax.random.key(7), i)[None], sp
        )
    )
    i = 0
    for chunk in alone.chunks:
        seq = list(chunk.context)
        for tok in chunk.tokens:
            want, _ = draw(jnp.asarray(full_logits(seq)[-1], jnp.float32), i)
            assert tok == int(want[0]), f"sampled token {i}"
            seq.append(tok)
            i += 1


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="chunk_size"):
        MarkovianConfig(chunk_size=1)
    with pytest.raises(ValueError, match="keep_head \\+ keep_tail"):
        MarkovianConfig(chunk_size=8, keep_head=3, keep_tail=5)
    with pytest.raises(ValueError, match="keep_head \\+ keep_tail"):
        MarkovianConfig(chunk_size=8, keep_tail=8)
    with pytest.raises(ValueError, match="max_chunks"):
        MarkovianConfig(chunk_size=8, max_chunks=0)
    with pytest.raises(ValueError, match="keep_head"):
        MarkovianConfig(chunk_size=8, keep_head=-1)
    assert MarkovianConfig(chunk_size=8, keep_head=1).carryover == 4  # default tail: C/2 - h


def test_accepted_request_whose_reset_context_exceeds_the_buckets_runs(tiny):
    # buckets that stop short of max_len, as test_engine.py uses: the prompt (20) fits bucket 32
    # and 20 + C = 60 <= max_len, but the reset context 20 + 20 = 40 has no prefill bucket
    engine = _engine(tiny, buckets=(8, 16, 32))
    request = Request(list(range(1, 21)), max_tokens=100, markovian=MarkovianConfig(chunk_size=40))
    try:
        rid = engine.submit(request)
    except ValueError:
        return  # rejecting it up front is a correct answer too
    assert len(engine.run_until_idle()[rid].chunks) > 1


class _CountingEngine(Engine):
    """Records the contexts of every prefill call and the blocks read back with no slot active."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prefills, self.idle_blocks = [], 0

    def _prefill(self, contexts, P):
        self.prefills.append(len(contexts))
        return super()._prefill(contexts, P)

    def _read_back(self, outputs, snapshot):
        self.idle_blocks += int(not np.asarray(jax.device_get(outputs[3])).any())
        return super()._read_back(outputs, snapshot)


def test_lockstep_resets_are_prefilled_together_and_no_block_idles(tiny, full_logits):
    """Two rows that reset at the same step: every reset round is one prefill of both new
    contexts (not a call per row), and no block is dispatched while every slot would sit
    parked in it (the host reads back first when every budget ends in the block in flight).
    The traces still equal the from-scratch reference."""
    model, params = tiny
    engine = _CountingEngine(model, params, max_slots=MAX_SLOTS, max_len=MAX_LEN, buckets=BUCKETS)
    mk = MarkovianConfig(chunk_size=16)  # carryover 8: 16 new tokens, then 8 per chunk
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]]
    rids = [engine.submit(Request(p, max_tokens=40, markovian=mk)) for p in prompts]
    results = engine.run_until_idle()
    for rid, prompt in zip(rids, prompts):
        trace, contexts, _ = markovian_reference(full_logits, prompt, 16, 0, 8, 8, 40)
        assert results[rid].tokens == trace
        assert [c.context for c in results[rid].chunks] == contexts
    n_chunks = len(results[rids[0]].chunks)
    assert n_chunks == 4  # 16 + 8 + 8 + 8 = 40 tokens
    assert engine.prefills == [2] * n_chunks  # admission, then one call per reset round
    assert engine.idle_blocks == 0
