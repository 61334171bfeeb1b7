"""Load over loopback: many concurrent requests, many sequential ones, and clients that leave
mid-stream. Slots, the queue, the engine's results and memory must all come back to rest."""

import asyncio
import os
import time

import httpx
import psutil
import pytest

from jreason.decode.engine import Request


def test_64_concurrent_requests_all_complete_correctly(served):
    """64 requests at once on 8 slots (so 56 queue), half streamed, half chat: each gets
    exactly the greedy tokens the engine gives its prompt alone."""
    import openai

    tok = served.tokenizer
    prompts = [f"{i} + {i % 7} = " for i in range(64)]
    max_tokens = [4 + i % 9 for i in range(64)]  # different lengths: slots free at different steps

    async def one(client, i):
        kw = dict(model=served.model, max_tokens=max_tokens[i], temperature=0,
                  extra_body={"ignore_eos": True})  # fmt: skip
        if i % 4 == 0:  # chat, whole
            out = await client.chat.completions.create(
                messages=[{"role": "user", "content": prompts[i]}], logprobs=True, **kw
            )
            return [t.token for t in out.choices[0].logprobs.content]
        if i % 2:  # completions, streamed with logprobs
            stream = await client.completions.create(
                prompt=prompts[i], stream=True, logprobs=0, **kw
            )
            tokens = []
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].logprobs:
                    tokens += chunk.choices[0].logprobs.tokens
            return tokens
        out = await client.completions.create(prompt=prompts[i], logprobs=0, **kw)
        return out.choices[0].logprobs.tokens

    async def main():
        client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key=served.api_key,
                                    max_retries=0, timeout=120)  # fmt: skip
        async with client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    got = asyncio.run(main())
    requests = []
    for i, p in enumerate(prompts):
        if i % 4 == 0:
            ids = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True)
        else:
            ids = tok.encode(p)
        requests.append(Request(ids, max_tokens=max_tokens[i]))
    refs = served.direct(requests)
    for i, (tokens, ref) in enumerate(zip(got, refs)):
        assert tokens == [tok.decode([t]) for t in ref.tokens], i
    served.wait_idle()


def test_500_sequential_requests_leak_no_slot_or_memory(served):
    worker, engine = served.worker, served.engine
    proc = psutil.Process(os.getpid())
    body = {"model": served.model, "max_tokens": 2, "temperature": 0.7}
    with served.client() as http:

        def run(i):
            r = http.post("/v1/completions", json={**body, "prompt": f"{i} * 3 =", "seed": i})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] <= 2

        for i in range(50):  # warm-up: allocator pools, compiled buckets, connection
            run(i)
        rss0 = proc.memory_info().rss
        t0 = time.perf_counter()
        for i in range(50, 550):
            run(i)
        elapsed = time.perf_counter() - t0
    rss1 = proc.memory_info().rss
    served.wait_idle()
    assert engine.running() == 0 and not engine.queue and not engine.results
    assert worker.live == 0 and not worker._seqs
    assert served.metric("jreason_running_slots") == 0
    assert served.metric("jreason_queue_depth") == 0
    # growth bound: a leak of even 100 KB per request (a Result, a trace) would be 50 MB
    assert rss1 - rss0 < 32 * 2**20, f"RSS grew {(rss1 - rss0) / 2**20:.1f} MiB"
    print(f"500 sequential requests: {elapsed:.1f} s, RSS {(rss1 - rss0) / 2**20:+.1f} MiB")


def test_client_disconnect_mid_stream_frees_the_slot(served):
    served.wait_idle()
    cancelled = served.sample("jreason_requests_finished_total", reason="cancelled")
    generated = served.sample("jreason_generated_tokens_total")
    sock = served.open_stream(max_tokens=100)
    assert served.engine.running() == 1
    steps = served.sample("jreason_engine_steps_total")
    sock.close()  # a real socket closed mid-stream
    deadline = time.monotonic() + 10
    while served.engine.running() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert served.engine.running() == 0
    # the slot is free a step or two after the socket closed: the cancel is handled before the
    # engine's next step, and noticing the closed socket takes the event loop a moment
    assert served.sample("jreason_engine_steps_total") - steps <= 5
    assert served.metric("jreason_running_slots") == 0
    assert served.metric("jreason_requests_finished_total", 'reason="cancelled"') == cancelled + 1
    # it was cut off: far fewer than its 100 tokens were generated
    assert served.sample("jreason_generated_tokens_total") - generated < 20  # of its 100
    served.wait_idle()
    # and later requests still run, streamed and not
    with served.client() as http:
        r = http.post("/v1/completions", json={"model": served.model, "prompt": "5 =",
                                               "max_tokens": 3})  # fmt: skip
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in (
            "stop",
            "length",
        )
    sock = served.open_stream(max_tokens=3)
    data = served.stream_head  # all of it may have come in the first read
    while b"[DONE]" not in data:
        data += sock.recv(4096)
    sock.close()
    served.wait_idle()


def test_disconnect_while_waiting_non_streamed_frees_the_slot(served):
    """A non-streamed request whose client gives up (timeout) is cancelled too."""
    served.wait_idle()
    cancelled = served.metric("jreason_requests_finished_total", 'reason="cancelled"')
    long = {"max_tokens": 5000, "ignore_eos": True, "markovian": {"chunk_size": 32,
                                                                   "max_chunks": 1000}}  # fmt: skip
    with served.client() as http, pytest.raises(httpx.TimeoutException):
        http.post("/v1/completions", timeout=0.5,
                  json={"model": served.model, "prompt": "9 +", **long})  # fmt: skip
    served.wait_idle(timeout=10)
    assert served.metric("jreason_requests_finished_total", 'reason="cancelled"') == cancelled + 1
