"""The continuous-batching engine: against the plain forward pass, compile counts, seeds, stops."""

import jax
import numpy as np
import pytest
from compile_count import count_compiles
from greedy_reference import argmax_reference

from jreason.decode.engine import Engine, Request

MAX_LEN = 64
BUCKETS = (8, 16, 32)


def _engine(tiny, max_slots=2, **kw):
    model, params = tiny
    return Engine(model, params, max_slots=max_slots, max_len=MAX_LEN, buckets=BUCKETS, **kw)


def _run_one(engine, request):
    rid = engine.submit(request)
    return engine.run_until_idle()[rid]


def test_greedy_equals_full_forward_argmax_with_continuous_batching(tiny):
    model, params = tiny
    prompts = [[1, 5, 9], list(range(3, 17)), [2], [7, 7, 8, 30, 31], list(range(40, 60))]
    n_new = [12, 5, 9, 14, 3]  # different lengths, so slots free up at different steps
    engine = _engine(tiny, max_slots=2)  # fewer slots than requests: admission mid-flight
    ids = [engine.submit(Request(p, max_tokens=n)) for p, n in zip(prompts, n_new)]
    results = engine.run_until_idle()
    for rid, prompt, n in zip(ids, prompts, n_new):
        assert results[rid].tokens == argmax_reference(model, params, prompt, n, length=MAX_LEN), (
            rid
        )
        assert results[rid].finish_reason == "length"
        assert results[rid].prompt_len == len(prompt)
        assert len(results[rid].logprobs) == n


def _mixed_requests(n, seed):
    rng = np.random.default_rng(seed)
    settings = [
        {},  # greedy
        {"temperature": 0.8},
        {"temperature": 1.0, "top_k": 5},
        {"temperature": 1.2, "top_p": 0.9},
        {"temperature": 0.7, "min_p": 0.1, "stop_ids": [3, 4]},
    ]
    out = []
    for i in range(n):
        prompt = rng.integers(1, 64, size=int(rng.integers(1, 31))).tolist()  # buckets 8/16/32
        kw = settings[i % len(settings)]
        out.append(Request(prompt, max_tokens=int(rng.integers(1, 20)), seed=i, **kw))
    return out


def test_no_recompilation_in_steady_state(tiny):
    engine = _engine(tiny, max_slots=4)
    assert engine.warmup() > 0  # every (prefill rows, bucket) shape admission can use
    # warm-up: one request per bucket, every kind of sampling setting, a stop-id finish
    for r in _mixed_requests(15, seed=0) + [Request([1] * 30, max_tokens=2)]:
        engine.submit(r)
    engine.run_until_idle()

    with count_compiles() as compiles:
        ids = [engine.submit(r) for r in _mixed_requests(50, seed=1)]
        results = engine.run_until_idle()
    assert all(rid in results for rid in ids)
    assert compiles == [], f"{len(compiles)} compilations after warm-up"


def test_insert_compiles_once_per_shape_from_a_fresh_engine(tiny):
    # The empty state must be placed as every step's outputs are: with eager (uncommitted)
    # arrays, warmup's `insert` compiled for them and the first real admission compiled again.
    engine = _engine(tiny, max_slots=4)
    assert all(x.committed for x in jax.tree.leaves(engine.state))
    engine.warmup()
    engine.step()  # nothing queued: no compilation needed
    with count_compiles() as compiles:
        engine.submit(Request([5, 6, 7], max_tokens=1))
        engine._admit()  # prefill + insert of one row: both warmed up
    assert compiles == [], f"{len(compiles)} compilations of a warmed-up admission"


def test_seeded_sampling_is_independent_of_slot_and_company(tiny):
    probe = Request([4, 8, 15, 16], max_tokens=10, temperature=1.0, top_p=0.95, seed=7)

    ref = _run_one(_engine(tiny, max_slots=3), probe)

    crowded = _engine(tiny, max_slots=3)
    fillers = [
        Request([3, 1], max_tokens=3, temperature=0.9, seed=7),  # same seed, other prompt
        Request(list(range(20)), max_tokens=20, temperature=1.0, top_k=4, seed=1),
        Request([9, 9, 9], max_tokens=20, seed=2),
    ]
    for r in fillers:
        crowded.submit(r)
    rid = crowded.submit(probe)
    while not any(run is not None and run.rid == rid for run in crowded.slots):
        crowded.step()
    # admitted mid-flight, into a later batch, next to requests already several tokens in
    assert [run.rid for run in crowded.slots] == [rid, 1, 2]
    assert len(crowded.slots[1].trace) > len(crowded.slots[0].trace)
    got = crowded.run_until_idle()[rid]

    assert got.tokens == ref.tokens
    np.testing.assert_allclose(got.logprobs, ref.logprobs, rtol=1e-5, atol=1e-6)
    reseeded = Request(probe.prompt_ids, 10, temperature=1.0, top_p=0.95, seed=8)
    assert _run_one(_engine(tiny, max_slots=3), reseeded).tokens != ref.tokens


def test_stop_ids_max_tokens_and_full_cache_set_finish_reason(tiny):
    engine = _engine(tiny, max_slots=2)
    prompt = [1, 5, 9]
    free = _run_one(engine, Request(prompt, max_tokens=12)).tokens
    stop = free[3]
    first = free.index(stop)

    ids = {
        "stop": engine.submit(Request(prompt, max_tokens=12, stop_ids=[63, stop])),
        "length": engine.submit(Request(prompt, max_tokens=2, stop_ids=[63])),
        "full": engine.submit(Request(list(range(1, 31)), max_tokens=100)),
    }
    results = engine.run_until_idle()
    assert results[ids["stop"]].tokens == free[: first + 1]
    assert results[ids["stop"]].finish_reason == "stop"
    assert results[ids["length"]].tokens == free[:2]
    assert results[ids["length"]].finish_reason == "length"
    # the cache holds max_len tokens in all, prompt included
    assert len(results[ids["full"]].tokens) == MAX_LEN - 30
    assert results[ids["full"]].finish_reason == "length"


def test_stop_strings_are_checked_on_the_host(tiny):
    def detokenize(ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)

    engine = _engine(tiny, max_slots=2, detokenize=detokenize)
    prompt = [1, 5, 9]
    free = _run_one(engine, Request(prompt, max_tokens=12)).tokens
    target = detokenize(free[4:6])
    got = _run_one(engine, Request(prompt, max_tokens=12, stop_strings=[target]))
    text = detokenize(free)
    end = text.index(target) + len(target)  # one character per token here
    assert got.tokens == free[:end]
    assert got.finish_reason == "stop"
    # the slot was released: the next request in it starts clean
    assert _run_one(engine, Request(prompt, max_tokens=12)).tokens == free


def test_cancel_frees_the_slot_and_the_rest_runs_unchanged(tiny):
    engine = _engine(tiny, max_slots=2)
    alone = _run_one(engine, Request([2, 4, 6], max_tokens=10)).tokens
    running = engine.submit(Request([1, 2, 3], max_tokens=40))
    other = engine.submit(Request([2, 4, 6], max_tokens=10))
    queued = engine.submit(Request([5, 5], max_tokens=40))
    for _ in range(4):
        engine.step()
    assert engine.running() == 2 and engine.trace(queued) == []
    partial = engine.cancel(running)
    assert partial.finish_reason == "cancelled" and 0 < len(partial.tokens) < 40
    assert engine.running() == 1  # the slot is free before the next step
    assert engine.cancel(queued).finish_reason == "cancelled"
    assert engine.cancel(queued) is None  # no longer live
    results = engine.run_until_idle()
    assert results[other].tokens == alone  # its neighbour's cancellation did not disturb it
    assert engine.running() == 0 and not engine.queue


def test_multi_step_dispatch_gives_the_same_results_as_one_step(tiny):
    """k tokens per dispatch changes only when the host sees them: every result (sampled
    tokens, logprobs, stop strings, budgets, Markovian chunks) equals the k=1 run's."""
    from jreason.decode.budget import ThinkingBudget
    from jreason.decode.markovian import MarkovianConfig

    def detokenize(ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)

    requests = _mixed_requests(12, seed=3) + [
        Request([1, 5, 9], max_tokens=20, temperature=1.0, seed=7, stop_strings=["c", "d", "e"]),
        Request(
            [2, 3],
            max_tokens=30,
            temperature=1.0,
            seed=8,
            thinking=ThinkingBudget(
                think_end_id=9,
                min_thinking_tokens=4,
                max_thinking_tokens=12,
                continuation_ids=[5, 6],
                answer_prefix_ids=[7],
            ),
        ),
        Request(
            [4, 4, 4],
            max_tokens=40,
            temperature=1.0,
            seed=9,
            markovian=MarkovianConfig(chunk_size=8, keep_head=1, keep_tail=3, max_chunks=6),
        ),
    ]
    runs = []
    for k in (1, 3, 4):
        engine = _engine(tiny, max_slots=3, detokenize=detokenize, steps_per_dispatch=k)
        ids = [engine.submit(r) for r in requests]
        results = engine.run_until_idle()
        runs.append([results[i] for i in ids])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
            np.testing.assert_array_equal(a.logprobs, b.logprobs)
            assert [(c.context, c.tokens) for c in a.chunks] == [
                (c.context, c.tokens) for c in b.chunks
            ]
    assert len(runs[0][-1].chunks) > 1  # the Markovian request did reset
    assert runs[0][12].finish_reason == "stop" and len(runs[0][12].tokens) < 20


def test_samples_of_one_prompt_share_its_prefill(tiny, monkeypatch):
    """n samples of a prompt queued back to back (RL groups) encode it once, and each equals
    the same request run alone; new weights drop the shared prefill."""
    from jreason.decode import slots

    calls = []
    real_prefill = slots.prefill
    monkeypatch.setattr(slots, "prefill", lambda *a: calls.append(a[2].shape) or real_prefill(*a))
    group = [Request([4, 8, 15], max_tokens=8, temperature=1.0, seed=s) for s in range(4)]
    alone = [_run_one(_engine(tiny), r) for r in group]
    assert len(calls) == 4
    calls.clear()
    engine = _engine(tiny, max_slots=2)  # fewer slots than samples: admitted over two rounds
    rids = [engine.submit(r) for r in [*group, Request([1, 2], max_tokens=4)]]
    results = engine.run_until_idle()
    assert len(calls) == 2  # the group's prompt once, the other prompt once
    for rid, ref in zip(rids, alone):
        assert results[rid].tokens == ref.tokens
        np.testing.assert_allclose(results[rid].logprobs, ref.logprobs, rtol=1e-5, atol=1e-6)
    assert len({tuple(results[r].tokens) for r in rids[:4]}) > 1  # the seeds differ
    engine.set_params(tiny[1])
    _run_one(engine, group[0])
    assert len(calls) == 3


def test_admission_prefills_a_step_s_prompts_together(tiny, monkeypatch):
    """Requests admitted in one step are prefilled R rows per call (R a power of two, at most
    prefill_tokens tokens per call) and inserted at once; each equals the request run alone."""
    from jreason.decode import slots

    calls = []
    real_prefill = slots.prefill
    monkeypatch.setattr(slots, "prefill", lambda *a: calls.append(a[2].shape) or real_prefill(*a))
    prompts = [[3 + i, 9, 2 * i + 1] for i in range(5)] + [list(range(1, 12))]  # buckets 8, 16
    group = [Request(p, max_tokens=6, temperature=0.9, seed=i) for i, p in enumerate(prompts)]
    group += [Request(prompts[0], max_tokens=6, temperature=0.9, seed=9)]  # shares row 0
    alone = [_run_one(_engine(tiny), r) for r in group]
    calls.clear()
    engine = _engine(tiny, max_slots=8)
    rids = [engine.submit(r) for r in group]
    results = engine.run_until_idle()
    assert sorted(calls) == [(1, 16), (8, 8)]  # 5 distinct 3-token prompts -> 8 rows; 1 of 11
    calls.clear()
    engine = _engine(tiny, max_slots=8, prefill_tokens=16)  # 2 rows of bucket 8 per call
    rids2 = [engine.submit(r) for r in group]
    results2 = engine.run_until_idle()
    assert sorted(calls) == [(1, 8), (1, 16), (2, 8), (2, 8)]
    for rid, rid2, ref in zip(rids, rids2, alone):
        for got in (results[rid], results2[rid2]):
            assert got.tokens == ref.tokens
            np.testing.assert_allclose(got.logprobs, ref.logprobs, rtol=1e-5, atol=1e-6)


def test_prefill_tokens_must_be_positive(tiny):
    with pytest.raises(ValueError, match="prefill_tokens=0"):
        _engine(tiny, prefill_tokens=0)


def test_attention_reads_a_bucket_of_the_cache_and_stays_exact(tiny, monkeypatch):
    """With attend buckets 8/16/32 under MAX_LEN 64, a long row grows from the 16 bucket
    through 32 to the whole cache beside short ones (8 is never picked: the margin for two
    blocks of 4 steps is already 8); greedy output must still be the full forward's."""
    from jreason.decode import slots

    model, params = tiny
    used = []
    generate = slots.generate

    def spy(model, params, state, n_steps=1, attend_len=None):
        used.append(attend_len)
        return generate(model, params, state, n_steps, attend_len)

    monkeypatch.setattr(slots, "generate", spy)
    engine = _engine(tiny, max_slots=2, attend_min=8)
    assert engine.attend_buckets == (8, 16, 32)
    prompts = [[1, 5, 9], [2, 4], list(range(3, 17))]
    n_new = [50, 6, 20]
    ids = [engine.submit(Request(p, max_tokens=n)) for p, n in zip(prompts, n_new)]
    results = engine.run_until_idle()
    for rid, prompt, n in zip(ids, prompts, n_new):
        assert results[rid].tokens == argmax_reference(model, params, prompt, n, length=MAX_LEN)
    assert {16, 32, None} <= set(used)  # the long row went through the buckets to the whole cache


def test_warmup_compiles_every_attend_bucket(tiny):
    engine = _engine(tiny, max_slots=2, attend_min=8)
    engine.warmup()
    with count_compiles() as compiles:
        rid = engine.submit(Request([1, 5, 9], max_tokens=50))  # crosses 16 and 32
        engine.run_until_idle()
    assert engine.results[rid].finish_reason == "length"
    assert compiles == [], f"{len(compiles)} compilations after warmup"


def test_attend_len_is_refused_for_more_than_one_token(tiny):
    model, params = tiny
    cache = model.init_cache(1, MAX_LEN)
    tokens, positions = np.array([[1, 2]]), np.array([[0, 1]])
    with pytest.raises(ValueError, match="attend_len=16 is for one-token decode steps"):
        model.apply(params, tokens, positions, cache, attend_len=16)
