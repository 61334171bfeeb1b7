"""Bad input and overload over real HTTP: every error is OpenAI's error object naming the
offending parameter, and the server keeps serving afterwards."""

import json

import httpx
import pytest

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def chat_body(served, **kw):
    body = {"model": served.model, "messages": [{"role": "user", "content": "1 + 1?"}],
            "max_tokens": 4}  # fmt: skip
    body.update(kw)
    return body


def assert_error(r: httpx.Response, status: int, param=None, type_=None, code=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    err = body["error"]
    assert err["message"] and isinstance(err["message"], str)
    assert err["param"] == param, err
    if type_ is not None:
        assert err["type"] == type_
    if code is not None:
        assert err["code"] == code
    return err


# (body changes, param): each one value wrong, the rest a valid chat request
INVALID_CHAT = [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_tokens": 10_000}, "max_tokens"),  # prompt + max_tokens over the context
    ({"max_completion_tokens": 10_000, "max_tokens": None}, "max_completion_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": -1}, "top_p"),
    ({"n": 5}, "n"),  # over --max-n 4
    ({"n": 0}, "n"),
    ({"messages": []}, "messages"),
    ({"messages": None}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x " * 300}]}, "messages"),  # prompt too long
    ({"max_tokens": "10"}, "max_tokens"),  # wrong types
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"stream": "yes"}, "stream"),
    ({"stop": 5}, "stop"),
    ({"stop": [""]}, "stop[0]"),
    ({"seed": "s"}, "seed"),
    ({"model": 7}, "model"),
    ({"logprobs": True, "top_logprobs": 3}, "top_logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"tools": [{"type": "function"}]}, "tools"),  # unsupported fields are named, not ignored
    ({"thinking_budget": {"max_tokens": 0}}, "thinking_budget.max_tokens"),
    ({"thinking_budget": {"min_tokens": 9, "max_tokens": 4}}, "thinking_budget"),
    ({"thinking_budget": {"max_tokens": "4"}}, "thinking_budget.max_tokens"),
    ({"markovian": {"chunk_size": 1}}, "markovian.chunk_size"),
    ({"markovian": {"chunk_size": 500}}, "markovian.chunk_size"),  # prompt + C over the context
    ({"markovian": {"chunk_size": 16, "carryover": 16}}, "markovian"),
    ({"markovian": {"chunk_size": 16, "max_chunks": 0}}, "markovian.max_chunks"),
    ({"chat_template_kwargs": {"enable_thinking": "no"}}, "chat_template_kwargs.enable_thinking"),
]


@pytest.mark.parametrize("change,param", INVALID_CHAT, ids=[p for _, p in INVALID_CHAT])
def test_invalid_chat_values_are_400_naming_the_param(served, change, param):
    body = {
        k: v for k, v in chat_body(served, **change).items() if v is not None or k == "messages"
    }
    if change.get("messages", 1) is None:
        body.pop("messages")
    with served.client() as http:
        assert_error(http.post(CHAT, json=body), 400, param, "invalid_request_error")


def test_invalid_completion_values(served):
    base = {"model": served.model, "prompt": "1 + 1 =", "max_tokens": 4}
    cases = [
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, 10**6]}, "prompt"),  # a token id outside the vocabulary
        ({"prompt": 12}, "prompt"),
        ({"logprobs": 3}, "logprobs"),
        ({"echo": True}, "echo"),
        ({"best_of": 2}, "best_of"),
        ({"max_tokens": 200}, "max_tokens"),
    ]
    with served.client() as http:
        for change, param in cases:
            assert_error(http.post(COMPLETIONS, json={**base, **change}), 400, param)


def test_non_finite_temperature_is_400(served):
    # Python's json writes (and FastAPI reads) the NaN / Infinity literals
    with served.client() as http:
        for literal in ("NaN", "Infinity", "-Infinity"):
            raw = json.dumps(chat_body(served, temperature=0.5)).replace("0.5", literal)
            r = http.post(CHAT, content=raw, headers={"Content-Type": "application/json"})
            assert_error(r, 400, "temperature")


def test_malformed_bodies_are_400(served):
    with served.client() as http:
        for raw in ('{"model": "tiny", "messages": [', "", "[1, 2]", "null", "not json"):
            r = http.post(CHAT, content=raw, headers={"Content-Type": "application/json"})
            err = assert_error(r, 400, None, "invalid_request_error")
            assert "JSON" in err["message"] or "body" in err["message"]


def test_unknown_model_and_route_are_404(served):
    with served.client() as http:
        assert_error(http.post(CHAT, json=chat_body(served, model="gpt-4")), 404, "model",
                     code="model_not_found")  # fmt: skip
        r = http.post(COMPLETIONS, json={"model": "nope", "prompt": "x"})
        assert_error(r, 404, "model")
        assert_error(http.get("/v1/nothing-here"), 404, None)


def test_api_key_is_required_on_every_v1_route(served):
    bad = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": served.api_key}]
    for headers in bad:
        with httpx.Client(base_url=served.url, headers=headers) as http:
            assert_error(http.get("/v1/models"), 401, None, "authentication_error")
            assert_error(http.post(CHAT, json=chat_body(served)), 401, None)
            assert_error(http.post(COMPLETIONS, json={}), 401, None)
            assert_error(http.post(CHAT, content=b"garbage"), 401, None)  # before parsing
            assert http.get("/health").status_code == 200  # not a /v1 route
            assert http.get("/metrics").status_code == 200


def test_body_over_the_limit_is_413(served):
    big = chat_body(served, messages=[{"role": "user", "content": "x" * 70_000}])
    with served.client() as http:
        assert_error(http.post(CHAT, json=big), 413, None, code="request_too_large")
        # no Content-Length (chunked): counted while reading
        chunks = (b"x" * 8192 for _ in range(10))
        assert_error(http.post(CHAT, content=chunks), 413, None)
        assert http.post(CHAT, json=chat_body(served)).status_code == 200  # still serving


def test_errors_are_counted_by_kind(served):
    assert served.metric("jreason_errors_total", 'status="400",type="invalid_request_error"') > 0


def test_queue_full_is_429_with_retry_after(tight):
    # requests that would run for thousands of steps (Markovian chunks) hold every slot
    long = {"markovian": {"chunk_size": 32, "max_chunks": 1000}}
    socks = [tight.open_stream(5000, **long) for _ in range(tight.engine.max_slots)]
    try:
        with httpx.Client(base_url=tight.url, timeout=60) as http:
            r = http.post(COMPLETIONS, json={"model": tight.model, "prompt": "1", "max_tokens": 2})
            assert_error(r, 429, None, "rate_limit_error", "queue_full")
            assert r.headers["Retry-After"] == "1"
    finally:
        for s in socks:
            s.close()
    tight.wait_idle()
    with httpx.Client(base_url=tight.url, timeout=60) as http:  # and then it serves again
        r = http.post(COMPLETIONS, json={"model": tight.model, "prompt": "1", "max_tokens": 2})
        assert r.status_code == 200
    assert tight.metric("jreason_errors_total", 'status="429",type="rate_limit_error"') == 1


def test_server_still_serves_after_all_that(served):
    out = served.openai().chat.completions.create(
        model=served.model, messages=[{"role": "user", "content": "2 + 2?"}], max_tokens=3
    )
    assert out.choices[0].finish_reason in ("stop", "length")
    served.wait_idle()
