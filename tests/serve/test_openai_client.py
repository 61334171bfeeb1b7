"""The official `openai` client against the running server: completions and chat, streamed
and not, compared token for token with the engine run directly on the same prompt."""

import pytest

from jreason.decode.budget import ThinkingBudget
from jreason.decode.engine import Request
from jreason.decode.markovian import MarkovianConfig
from jreason.serve.text import visible_text
from jreason.tokenizer import split_thinking

QUESTION = "What is 12 + 7?"


def chat_ids(tok, content=QUESTION, enable_thinking=True):
    messages = [{"role": "user", "content": content}]
    return tok.apply_chat_template(messages, enable_thinking=enable_thinking, tokenize=True)


def text_of(tok, tokens):
    return tok.decode(tokens, skip_special_tokens=True)


def test_chat_greedy_equals_engine_and_splits_reasoning(served):
    tok = served.tokenizer
    client = served.openai()
    out = client.chat.completions.create(
        model=served.model,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=24,
        logprobs=True,
    )
    [ref] = served.direct([Request(chat_ids(tok), max_tokens=24, stop_ids=sorted(tok.stop_ids))])
    choice = out.choices[0]
    # the same tokens: the logprobs list them, and the text is theirs split at </think>
    assert [t.token for t in choice.logprobs.content] == [tok.decode([t]) for t in ref.tokens]
    assert [t.logprob for t in choice.logprobs.content] == pytest.approx(ref.logprobs, abs=1e-5)
    reasoning, content = split_thinking(text_of(tok, ref.tokens), started_thinking=True)
    assert choice.message.reasoning_content == (reasoning or None)
    assert choice.message.content == content
    assert choice.finish_reason == ref.finish_reason
    assert out.usage.prompt_tokens == len(chat_ids(tok))
    assert out.usage.completion_tokens == len(ref.tokens)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.model == served.model and out.object == "chat.completion"


def test_chat_stream_equals_non_stream(served):
    client = served.openai()
    kw = dict(model=served.model, messages=[{"role": "user", "content": QUESTION}], temperature=0)
    whole = client.chat.completions.create(max_tokens=40, **kw)
    chunks = list(
        client.chat.completions.create(
            max_tokens=40, stream=True, stream_options={"include_usage": True}, **kw
        )
    )
    reasoning = "".join(
        getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert reasoning == (whole.choices[0].message.reasoning_content or "")
    assert content == whole.choices[0].message.content
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_completions_greedy_stream_and_not(served):
    tok = served.tokenizer
    client = served.openai()
    prompt = "12 + 7 = "
    ids = tok.encode(prompt, add_bos=tok.add_bos_token)
    [ref] = served.direct([Request(ids, max_tokens=20, stop_ids=sorted(tok.stop_ids))])
    out = client.completions.create(
        model=served.model, prompt=prompt, max_tokens=20, temperature=0, logprobs=0
    )
    assert out.choices[0].text == text_of(tok, ref.tokens)
    assert out.choices[0].logprobs.token_logprobs == pytest.approx(ref.logprobs, abs=1e-5)
    assert out.usage.completion_tokens == len(ref.tokens)
    stream = client.completions.create(
        model=served.model, prompt=prompt, max_tokens=20, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_thinking_budget_forces_the_answer(served):
    """thinking_budget.max_tokens=6: `</think>` is forced after 6 thinking tokens, the rest is
    the answer, and usage counts the 6 as reasoning tokens."""
    tok = served.tokenizer
    out = served.openai().chat.completions.create(
        model=served.model,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=20,
        extra_body={"thinking_budget": {"max_tokens": 6}},
    )
    budget = ThinkingBudget(tok.think_close_id, max_thinking_tokens=6,
                            continuation_ids=tok.encode("Wait"))  # fmt: skip
    [ref] = served.direct([Request(chat_ids(tok), max_tokens=20, thinking=budget,
                                   stop_ids=sorted(tok.stop_ids))])  # fmt: skip
    assert ref.tokens[6] == tok.think_close_id and ref.thinking_tokens == 6
    message = out.choices[0].message
    assert message.reasoning_content == text_of(tok, ref.tokens[:6]).strip()
    assert message.content == text_of(tok, ref.tokens[7:]).lstrip()
    assert out.usage.completion_tokens_details.reasoning_tokens == 6
    assert out.usage.completion_tokens == len(ref.tokens)


def test_markovian_thinks_past_the_context_length(served):
    """prompt + max_tokens > the context: refused plainly, served in Markovian chunks."""
    tok = served.tokenizer
    client = served.openai()
    messages = [{"role": "user", "content": QUESTION}]
    n_prompt = len(chat_ids(tok))
    max_tokens = served.max_len + 40
    mk = {"chunk_size": 48, "carryover": 24, "max_chunks": 12}
    with pytest.raises(Exception) as info:
        client.chat.completions.create(model=served.model, messages=messages, max_tokens=max_tokens)
    assert info.value.status_code == 400 and info.value.param == "max_tokens"
    out = client.chat.completions.create(
        model=served.model,
        messages=messages,
        temperature=0,
        max_tokens=max_tokens,
        extra_body={"markovian": mk, "ignore_eos": True},
    )
    cfg = MarkovianConfig(chunk_size=48, keep_tail=24, max_chunks=12)
    [ref] = served.direct([Request(chat_ids(tok), max_tokens=max_tokens, markovian=cfg)])
    assert len(ref.chunks) > 1 and ref.peak_context <= n_prompt + 48
    assert out.usage.completion_tokens == len(ref.tokens) == max_tokens
    assert n_prompt + out.usage.completion_tokens > served.max_len
    reasoning, content = split_thinking(text_of(tok, ref.tokens), started_thinking=True)
    assert (out.choices[0].message.reasoning_content or "", out.choices[0].message.content) == (
        reasoning,
        content,
    )


def test_n_seed_and_stop(served):
    tok = served.tokenizer
    client = served.openai()
    kw = dict(model=served.model, prompt="3 * 4 = ", max_tokens=12, temperature=1.0, seed=7, n=3)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert len({c.text for c in a.choices}) > 1  # the choices are different samples
    ids = tok.encode("3 * 4 = ")
    refs = served.direct(
        [Request(ids, max_tokens=12, temperature=1.0, seed=7 + i, stop_ids=sorted(tok.stop_ids))
         for i in range(3)]
    )  # fmt: skip
    assert [c.text for c in a.choices] == [text_of(tok, r.tokens) for r in refs]

    # a stop string taken from the greedy output: the text ends right before it
    [ref] = served.direct([Request(ids, max_tokens=30)])
    full = text_of(tok, ref.tokens)
    stop = next(full[i : i + 2] for i in range(5, len(full)) if "\ufffd" not in full[i : i + 2])
    out = client.completions.create(
        model=served.model,
        prompt="3 * 4 = ",
        max_tokens=30,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert out.choices[0].text == visible_text(tok, ref.tokens, [stop], final=True)
    assert out.choices[0].text == full[: full.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_models_health_and_openapi(served):
    client = served.openai()
    [card] = client.models.list().data
    assert card.id == served.model and card.max_model_len == served.max_len
    with served.client() as http:
        assert http.get("/health").json()["status"] == "ok"
        schema = http.get("/openapi.json").json()
    paths = schema["paths"]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"} <= set(paths)
    chat = paths["/v1/chat/completions"]["post"]
    assert "422" not in chat["responses"] and "400" in chat["responses"]
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    assert chat["security"] == [{"bearer": []}]
    props = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"thinking_budget", "markovian", "messages", "max_completion_tokens"} <= set(props)
