"""The OpenAI-compatible HTTP API: schemas, request validation, the error model and the routes.

A thin layer over the decode engine, as levanter's `inference/openai.py` is: a route validates a
request (pydantic, strict types), turns it into one engine `Request` per choice (`plan_*`),
hands them to the engine thread (server.py) and turns what comes back into OpenAI's response
or, for `stream=true`, its server-sent events. Nothing here touches the device.

Beyond OpenAI's fields, requests may carry:
- `thinking_budget` {max_tokens, min_tokens, continuation, answer_prefix, max_answer_tokens}:
  s1 budget forcing and Elastic Reasoning (decode/budget.py);
- `markovian` {chunk_size, carryover | keep_head + keep_tail, max_chunks}: Delethink chunks
  (decode/markovian.py), so a prompt + `max_tokens` may exceed the context length;
- vLLM's `top_k`, `min_p`, `ignore_eos` and `chat_template_kwargs` ({"enable_thinking": false}).
Chat responses return the thinking as `reasoning_content` beside `content` (DeepSeek's and
vLLM's convention) and count it in `usage.completion_tokens_details.reasoning_tokens`.

Every error is OpenAI's object `{"error": {"message", "type", "param", "code"}}`, and `param`
names the offending field (`temperature`, `messages[0].content`, `markovian.chunk_size`).
Deliberately left out: tools / function calling, response_format, penalties and logit_bias
(rejected with 400 when set), and top-k alternatives in `logprobs` (the engine returns the
sampled token's logprob only; asking for alternatives is a 400).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from jreason.decode.budget import ThinkingBudget
from jreason.decode.engine import Request, Result
from jreason.decode.markovian import MarkovianConfig
from jreason.serve.text import TextStream
from jreason.tokenizer import THINK_OPEN

# ---- errors ----------------------------------------------------------------------------------


class APIError(Exception):
    """An error response: OpenAI's error object with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ---- request schemas --------------------------------------------------------------------------
# strict: "10" is not an int and 1.5 is not a bool (OpenAI rejects both); extra="forbid": a
# misspelt or unsupported field is an error naming it, never silently ignored.

_STRICT = ConfigDict(strict=True, extra="forbid")
Finite = Annotated[float, Field(allow_inf_nan=False)]


def _integral(v):
    # JSON Schema's "integer" includes 5.0; strict pydantic would not
    return int(v) if isinstance(v, float) and v.is_integer() else v


# an int field: 5 and 5.0, never "5", 5.5 or true (constraints inside the Annotated, so the
# JSON schema carries them also where the field is optional)
def _int(**constraints):
    return Annotated[int, Field(**constraints), BeforeValidator(_integral)]


Int = _int()
PositiveInt = _int(ge=1)
NonNegativeInt = _int(ge=0)
TokenId = _int(ge=0)  # below the vocabulary size: the served schema says how far
StopString = Annotated[str, Field(min_length=1)]
PromptText = Annotated[str, Field(min_length=1)]


class ThinkingBudgetParams(BaseModel):
    """s1 budget forcing and Elastic Reasoning's answer budget (decode/budget.py)."""

    model_config = _STRICT
    max_tokens: PositiveInt | None = Field(
        None, description="thinking tokens before `</think>` (+ answer_prefix) is forced"
    )
    min_tokens: Int = Field(
        0, ge=0, description="an earlier `</think>` is replaced by `continuation`"
    )
    continuation: str = Field("Wait", description="replaces an early `</think>`")
    answer_prefix: str = Field("", description="follows a forced `</think>`")
    max_answer_tokens: PositiveInt | None = Field(None, description="budget for the answer")


class MarkovianParams(BaseModel):
    """Delethink: think in chunks of at most `chunk_size` trace tokens of context
    (decode/markovian.py). The carryover is `carryover` tokens from the end of the trace, or
    `keep_head` from its start + `keep_tail` from its end (default chunk_size / 2)."""

    model_config = _STRICT
    chunk_size: Int = Field(ge=2, description="C: trace tokens a context may hold")
    carryover: NonNegativeInt | None = Field(None, description="m: last trace tokens carried over")
    keep_head: Int = Field(0, ge=0)
    keep_tail: NonNegativeInt | None = None
    max_chunks: Int = Field(8, ge=1)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields both endpoints share."""

    model_config = _STRICT
    model: str
    max_tokens: PositiveInt | None = None
    temperature: Finite = Field(1.0, ge=0, le=2)
    top_p: Finite = Field(1.0, gt=0, le=1)
    top_k: Int = Field(0, ge=-1, le=2**31 - 1, description="0 or -1: off")
    min_p: Finite = Field(0.0, ge=0, le=1)
    n: Int = Field(1, ge=1, description="choices per prompt (at most the server's --max-n)")
    stop: StopString | Annotated[list[StopString], Field(max_length=8)] | None = None
    seed: Int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    thinking_budget: ThinkingBudgetParams | None = None
    markovian: MarkovianParams | None = None
    user: str | None = None  # accepted and ignored, as a label
    # OpenAI fields this server does not implement: accepted only at their neutral value
    presence_penalty: Finite = Field(0.0, ge=0, le=0, description="unsupported: must be 0")
    frequency_penalty: Finite = Field(0.0, ge=0, le=0, description="unsupported: must be 0")
    logit_bias: Annotated[dict[str, Finite], Field(max_length=0)] | None = Field(
        None, description="unsupported: must be empty"
    )


class CompletionRequest(_Sampling):
    prompt: (
        PromptText
        | Annotated[list[PromptText], Field(min_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
    ) = Field(description="text, token ids, or a batch of either (one choice set per prompt)")
    logprobs: _int(ge=0, le=0) | None = Field(
        None, description="0: the sampled tokens' logprobs (no alternatives)"
    )
    echo: Literal[False] = Field(False, description="unsupported: must be false")
    suffix: None = Field(None, description="unsupported")
    best_of: _int(ge=1, le=1) | None = Field(None, description="unsupported: 1 or absent")


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    reasoning_content: str | None = None  # an assistant turn's thinking (chat template)
    tool_call_id: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: _int(ge=0, le=0) | None = Field(
        None, description="0 or absent: alternatives are not returned"
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description='template variables, e.g. {"enable_thinking": false}'
    )


REQUEST_MODELS = (
    CompletionRequest,
    ChatCompletionRequest,
    ChatMessage,
    TextPart,
    ThinkingBudgetParams,
    MarkovianParams,
    StreamOptions,
)
_FIELD_NAMES = frozenset(name for m in REQUEST_MODELS for name in m.model_fields)


def error_param(loc: Sequence[str | int]) -> str | None:
    """A pydantic error location -> OpenAI's `param` ("messages[0].content").

    Union members and validator tags ('str', 'list[int]', ...) in the location are dropped:
    only field names and list indices are kept."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _FIELD_NAMES:
            out += f".{part}" if out else part
    return out or None


# ---- response schemas -------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # null for tokens the server forced (budget forcing)
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float | None  # null for forced tokens
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion (the stream ends with `data: [DONE]`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "jreason"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
    running: int
    queued: int


# ---- requests -> engine requests --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the server allows; the serve CLI flags map one to one."""

    model_name: str
    max_len: int  # the engine's context length per slot
    max_n: int = 8
    max_choices: int = 64  # choices of one request (prompts x n): at most slots + queue


@dataclasses.dataclass
class Choice:
    """One choice of a response = one engine request."""

    index: int
    request: Request
    text: TextStream


@dataclasses.dataclass
class Plan:
    """A validated request: the engine requests and what shaping the response needs."""

    id: str
    model: str
    created: int
    chat: bool
    choices: list[Choice]
    prompt_tokens: int
    logprobs: bool
    stream: bool
    include_usage: bool


def _seeds(seed: int | None, k: int) -> list[int]:
    # choices of one request must differ, and a given seed must reproduce them
    base = secrets.randbits(32) if seed is None else seed
    return [(base + i) % 2**32 for i in range(k)]


def _thinking_budget(
    params: ThinkingBudgetParams | None, tokenizer, limits
) -> ThinkingBudget | None:
    if params is None:
        return None
    if tokenizer.think_close_id is None:
        raise invalid(
            f"thinking_budget needs {tokenizer.think_close!r} to be a single token of this "
            "model's tokenizer",
            "thinking_budget",
        )
    forced = {}
    for name in ("continuation", "answer_prefix"):
        text = getattr(params, name)
        forced[name] = tokenizer.encode(text) if text else ()
        if len(forced[name]) >= limits.max_len // 2:  # forced text must leave room to think
            raise invalid(f"thinking_budget.{name} is too long", f"thinking_budget.{name}")
    try:
        return ThinkingBudget(
            think_end_id=tokenizer.think_close_id,
            min_thinking_tokens=params.min_tokens,
            max_thinking_tokens=params.max_tokens,
            continuation_ids=forced["continuation"],
            answer_prefix_ids=forced["answer_prefix"],
            max_answer_tokens=params.max_answer_tokens,
        )
    except ValueError as e:
        raise invalid(f"thinking_budget: {e}", "thinking_budget") from None


def _markovian(params: MarkovianParams | None) -> MarkovianConfig | None:
    if params is None:
        return None
    keep_tail = params.keep_tail
    if params.carryover is not None:
        if keep_tail is not None:
            raise invalid("give markovian.carryover or markovian.keep_tail, not both", "markovian")
        if params.carryover < params.keep_head:
            raise invalid(
                f"markovian.carryover={params.carryover} is smaller than "
                f"keep_head={params.keep_head}",
                "markovian.carryover",
            )
        keep_tail = params.carryover - params.keep_head
    try:
        return MarkovianConfig(
            chunk_size=params.chunk_size,
            keep_head=params.keep_head,
            keep_tail=keep_tail,
            max_chunks=params.max_chunks,
        )
    except ValueError as e:
        raise invalid(str(e), "markovian") from None


def _max_tokens(body, prompt_len: int, limits: Limits, mk, default: int | None) -> int:
    """The completion budget, checked against the context unless Markovian mode is on."""
    name = "max_tokens"
    requested = body.max_tokens
    if getattr(body, "max_completion_tokens", None) is not None:
        name, requested = "max_completion_tokens", body.max_completion_tokens
    if mk is not None:
        if prompt_len + mk.chunk_size > limits.max_len:
            raise invalid(
                f"the prompt ({prompt_len} tokens) + markovian.chunk_size ({mk.chunk_size}) "
                f"exceed the context length of {limits.max_len} tokens",
                "markovian.chunk_size",
            )
        return requested if requested is not None else mk.max_trace_tokens()
    room = limits.max_len - prompt_len
    if requested is None:
        return room if default is None else min(default, room)
    if prompt_len + requested > limits.max_len:
        raise invalid(
            f"this model's context length is {limits.max_len} tokens, but {prompt_len + requested}"
            f" were requested ({prompt_len} in the prompt, {requested} for the completion); "
            f"lower {name} or use markovian mode",
            name,
            "context_length_exceeded",
        )
    return requested


def _check_common(body: _Sampling, limits: Limits, n_prompts: int) -> None:
    if body.model != limits.model_name:
        raise APIError(
            404,
            f"the model {body.model!r} does not exist; this server serves {limits.model_name!r}",
            param="model",
            code="model_not_found",
        )
    if body.n > limits.max_n:
        raise invalid(f"n={body.n} is over this server's limit of {limits.max_n}", "n")
    if n_prompts * body.n > limits.max_choices:
        raise invalid(
            f"{n_prompts} prompts x n={body.n} choices exceed this server's limit of "
            f"{limits.max_choices} choices per request",
            "prompt",
        )


def _requests(body: _Sampling, prompts: list[list[int]], tokenizer, limits, default_max, check):
    """One engine Request per (prompt, sample), validated against the engine (`check`)."""
    thinking = _thinking_budget(body.thinking_budget, tokenizer, limits)
    markovian = _markovian(body.markovian)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    stop_ids = () if body.ignore_eos else tuple(sorted(tokenizer.stop_ids))
    seeds = iter(_seeds(body.seed, len(prompts) * body.n))
    out = []
    name = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
    for ids in prompts:
        if not ids:
            raise invalid("the prompt encodes to no tokens", name)
        if markovian is None and len(ids) >= limits.max_len:
            raise invalid(
                f"the prompt is {len(ids)} tokens, which leaves no room in this model's context "
                f"length of {limits.max_len} tokens; shorten it or use markovian mode",
                name,
                "context_length_exceeded",
            )
        max_tokens = _max_tokens(body, len(ids), limits, markovian, default_max)
        for _ in range(body.n):
            req = Request(
                prompt_ids=ids,
                max_tokens=max_tokens,
                temperature=body.temperature,
                top_k=min(max(body.top_k, 0), tokenizer.vocab_size),
                top_p=body.top_p,
                min_p=body.min_p,
                seed=next(seeds),
                stop_ids=stop_ids,
                stop_strings=stop,
                thinking=thinking,
                markovian=markovian,
            )
            try:
                check(req)
            except ValueError as e:  # what the engine cannot run that the checks above missed
                raise invalid(str(e), name) from None
            out.append(req)
    return out, stop


def _new_plan(body, chat: bool, prompts, requests, stop, tokenizer, started_thinking) -> Plan:
    prefix = "chatcmpl" if chat else "cmpl"
    choices = [
        Choice(i, req, TextStream(tokenizer, stop, chat=chat, started_thinking=started_thinking))
        for i, req in enumerate(requests)
    ]
    return Plan(
        id=f"{prefix}-{uuid.uuid4().hex}",
        model=body.model,
        created=int(time.time()),
        chat=chat,
        choices=choices,
        prompt_tokens=sum(len(p) for p in prompts),
        # chat: logprobs=true; completions: logprobs=0
        logprobs=body.logprobs if isinstance(body.logprobs, bool) else body.logprobs is not None,
        stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )


def plan_completion(body: CompletionRequest, tokenizer, limits: Limits, check) -> Plan:
    prompt = body.prompt
    if isinstance(prompt, str):
        prompts = [prompt]
    elif not prompt:
        raise invalid("prompt must not be empty", "prompt")
    elif isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    _check_common(body, limits, len(prompts))
    ids_list = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            ids_list.append(tokenizer.encode(p, add_bos=tokenizer.add_bos_token))
        else:
            if bad := [t for t in p if not 0 <= t < tokenizer.vocab_size]:
                where = "prompt" if isinstance(prompt[0], int) else f"prompt[{i}]"
                raise invalid(
                    f"token id {bad[0]} is outside the vocabulary (0..{tokenizer.vocab_size - 1})",
                    where,
                )
            ids_list.append(list(p))
    requests, stop = _requests(body, ids_list, tokenizer, limits, 16, check)
    return _new_plan(body, False, ids_list, requests, stop, tokenizer, False)


_TEMPLATE_RESERVED = ("messages", "add_generation_prompt", "tokenize", "enable_thinking")


def plan_chat(body: ChatCompletionRequest, tokenizer, limits: Limits, check) -> Plan:
    _check_common(body, limits, 1)
    kwargs = dict(body.chat_template_kwargs or {})
    enable_thinking = kwargs.pop("enable_thinking", True)
    if not isinstance(enable_thinking, bool):
        raise invalid("enable_thinking must be a boolean", "chat_template_kwargs.enable_thinking")
    if clash := [k for k in kwargs if k in _TEMPLATE_RESERVED]:
        raise invalid(f"{clash[0]!r} cannot be set here", "chat_template_kwargs")
    messages = []
    for m in body.messages:
        content = m.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        message = {"role": m.role, "content": content or ""}
        if m.reasoning_content is not None:
            message["reasoning_content"] = m.reasoning_content
        if m.name is not None:
            message["name"] = m.name
        messages.append(message)
    try:
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, enable_thinking=enable_thinking, **kwargs
        )
    except Exception as e:  # a template's raise_exception, or a variable it cannot render
        raise invalid(f"the chat template failed on these messages: {e}", "messages") from None
    ids = tokenizer.encode(text)
    # R1-style templates open the think block in the prompt: the completion starts thinking
    started_thinking = text.rstrip().endswith(THINK_OPEN)
    requests, stop = _requests(body, [ids], tokenizer, limits, None, check)
    return _new_plan(body, True, [ids], requests, stop, tokenizer, started_thinking)


# ---- engine results -> responses --------------------------------------------------------------


def _token_strings(tokenizer, tokens: Sequence[int]) -> list[str]:
    return [tokenizer.decode([t]) for t in tokens]


def _lp(x: float) -> float | None:
    return None if math.isnan(x) else x


def completion_logprobs(tokenizer, tokens, logprobs, offset: int = 0) -> CompletionLogprobs:
    strings = _token_strings(tokenizer, tokens)
    offsets = []
    for s in strings:
        offsets.append(offset)
        offset += len(s)
    return CompletionLogprobs(
        tokens=strings, token_logprobs=[_lp(x) for x in logprobs], text_offset=offsets
    )


def chat_logprobs(tokenizer, tokens, logprobs) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            TokenLogprob(token=s, logprob=_lp(x), bytes=list(s.encode()))
            for s, x in zip(_token_strings(tokenizer, tokens), logprobs)
        ]
    )


def _finish(result: Result) -> FinishReason:
    return "stop" if result.finish_reason == "stop" else "length"


def usage(plan: Plan, results: dict[int, Result]) -> Usage:
    completion = sum(len(r.tokens) for r in results.values())
    details = None
    if plan.chat:
        reasoning = 0
        for c in plan.choices:
            r = results[c.index]
            # the prompt opened a think block, or the completion did
            if c.text.started_thinking or c.text.texts(r.tokens, final=True)[0]:
                reasoning += r.thinking_tokens or 0
        details = CompletionTokensDetails(reasoning_tokens=reasoning)
    return Usage(
        prompt_tokens=plan.prompt_tokens,
        completion_tokens=completion,
        total_tokens=plan.prompt_tokens + completion,
        completion_tokens_details=details,
    )


def response(plan: Plan, results: dict[int, Result], tokenizer) -> Completion | ChatCompletion:
    """The non-streaming response for finished `results` {choice index: Result}."""
    if not plan.chat:
        choices = []
        for c in plan.choices:
            r = results[c.index]
            lps = completion_logprobs(tokenizer, r.tokens, r.logprobs) if plan.logprobs else None
            text = c.text.texts(r.tokens, final=True)[1]
            choices.append(
                CompletionChoice(index=c.index, text=text, logprobs=lps, finish_reason=_finish(r))
            )
        return Completion(
            id=plan.id,
            created=plan.created,
            model=plan.model,
            choices=choices,
            usage=usage(plan, results),
        )
    choices = []
    for c in plan.choices:
        r = results[c.index]
        reasoning, content = c.text.texts(r.tokens, final=True)
        message = AssistantMessage(content=content, reasoning_content=reasoning or None)
        lps = chat_logprobs(tokenizer, r.tokens, r.logprobs) if plan.logprobs else None
        choices.append(
            ChatChoice(index=c.index, message=message, logprobs=lps, finish_reason=_finish(r))
        )
    return ChatCompletion(
        id=plan.id,
        created=plan.created,
        model=plan.model,
        choices=choices,
        usage=usage(plan, results),
    )


def _sse(model: BaseModel) -> str:
    return f"data: {model.model_dump_json(exclude_none=True)}\n\n"


async def stream_events(plan: Plan, job, tokenizer) -> AsyncIterator[str]:
    """Server-sent events for a streamed response, from the engine thread's job events:
    ("tokens", index, new token ids, their logprobs) while a choice runs, ("done", index,
    Result) when it ends. The caller cancels the job if this generator is closed early."""
    head = dict(id=plan.id, created=plan.created, model=plan.model)

    def chunk(index, text="", reasoning="", role=None, lps=None, finish=None, offset=0):
        if plan.chat:
            delta = Delta(role=role, content=text or None, reasoning_content=reasoning or None)
            if role is not None:
                delta.content = text
            logprobs = chat_logprobs(tokenizer, *lps) if lps else None
            choice = ChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)
            return _sse(ChatCompletionChunk(**head, choices=[choice]))
        logprobs = completion_logprobs(tokenizer, *lps, offset) if lps else None
        choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish)
        return _sse(Completion(**head, choices=[choice]))

    tokens = {c.index: [] for c in plan.choices}
    offsets = dict.fromkeys(tokens, 0)
    texts = {c.index: c.text for c in plan.choices}
    results: dict[int, Result] = {}
    if plan.chat:
        for index in tokens:
            yield chunk(index, role="assistant")
    while len(results) < len(plan.choices):
        kind, index, *payload = await job.next_event()
        if kind == "error":
            raise payload[0]
        if kind == "tokens":
            new, lps = payload
            tokens[index] += new
            reasoning, text = texts[index].update(tokens[index])
            if reasoning or text or (plan.logprobs and new):
                lp = (new, lps) if plan.logprobs else None
                yield chunk(index, text, reasoning, lps=lp, offset=offsets[index])
            offsets[index] += len(text)
            continue
        result = payload[0]
        results[index] = result
        # the final text: what the trace ended with (the last step's tokens, and held-back text)
        rest, rest_lps = result.tokens[len(tokens[index]) :], result.logprobs[len(tokens[index]) :]
        reasoning, text = texts[index].update(result.tokens, final=True)
        lp = (rest, rest_lps) if plan.logprobs and rest else None
        yield chunk(index, text, reasoning, lps=lp, finish=_finish(result), offset=offsets[index])
    if plan.include_usage:
        u = usage(plan, results)
        model = ChatCompletionChunk if plan.chat else Completion
        yield _sse(model(**head, choices=[], usage=u))
    yield "data: [DONE]\n\n"


async def wait_all(plan: Plan, job) -> dict[int, Result]:
    results: dict[int, Result] = {}
    while len(results) < len(plan.choices):
        kind, index, *payload = await job.next_event()
        if kind == "error":
            raise payload[0]
        if kind == "done":
            results[index] = payload[0]
    return results


async def until_disconnected(receive) -> None:
    """Returns when the client goes away (the body is read already, so the next ASGI message
    is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def run_or_cancel(plan: Plan, job, receive, cancel) -> dict[int, Result]:
    """Waits for every choice; if the client disconnects first, cancels the job (freeing its
    slots) and re-raises CancelledError-free: returns an empty dict."""
    waiter = asyncio.ensure_future(wait_all(plan, job))
    watcher = asyncio.ensure_future(until_disconnected(receive))
    try:
        done, _ = await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not waiter.done():
            waiter.cancel()
            cancel(job)
    return waiter.result() if waiter in done else {}


# ---- routes -----------------------------------------------------------------------------------

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Invalid request: the error's `param` names the offending field",
        401: "Missing or wrong API key (when the server has one)",
        404: "Unknown model",
        413: "Request body over the server's --max-body-bytes",
        429: "Queue full: retry after the Retry-After header's seconds",
        500: "Server error",
        503: "The engine thread is not running",
    }.items()
}


def _streamed(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The 200 response: JSON, or with stream=true server-sent events whose `data` is a
    `model` chunk (or an error object), ending with `data: [DONE]`. Each event is described
    by OpenAPI 3.2's `itemSchema`; `STREAM_MODELS` must be in the schema's components."""
    chunk = {
        "anyOf": [
            {"$ref": f"#/components/schemas/{model.__name__}"},
            {"$ref": "#/components/schemas/ErrorResponse"},
        ]
    }
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"const": "[DONE]"},
                    {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": chunk,
                    },
                ]
            }
        },
    }
    return {200: {"content": {"text/event-stream": {"itemSchema": event}}}, **ERROR_RESPONSES}


STREAM_MODELS = (ChatCompletionChunk, Completion, ErrorResponse)


def make_router(worker, tokenizer, limits: Limits):
    """The /v1 routes over `worker` (server.EngineWorker): submit(plan) -> job, cancel(job)."""
    router = APIRouter(prefix="/v1")

    async def run(plan: Plan, http: HTTPRequest):
        job = worker.submit(plan)  # APIError 429 when the queue is full
        if plan.stream:

            async def events():
                try:
                    async for event in stream_events(plan, job, tokenizer):
                        yield event
                except APIError as e:  # the engine failed mid-stream: say so, then end
                    yield f"data: {ErrorResponse.model_validate(e.body()).model_dump_json()}\n\n"
                finally:
                    worker.cancel(job)  # a no-op once every choice is done

            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
        results = await run_or_cancel(plan, job, http.receive, worker.cancel)
        if not results:  # the client left (its choices are cancelled); nobody reads this
            return Response(status_code=499)
        return response(plan, results, tokenizer)

    @router.post(
        "/completions",
        response_model=Completion,
        response_model_exclude_none=True,
        responses=_streamed(Completion),
        summary="Text completion (streamed as server-sent events with stream=true)",
    )
    async def completions(body: CompletionRequest, http: HTTPRequest):
        plan = plan_completion(body, tokenizer, limits, worker.check)
        return await run(plan, http)

    @router.post(
        "/chat/completions",
        response_model=ChatCompletion,
        response_model_exclude_none=True,
        responses=_streamed(ChatCompletionChunk),
        summary="Chat completion with the thinking in `reasoning_content`",
    )
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        plan = plan_chat(body, tokenizer, limits, worker.check)
        return await run(plan, http)

    @router.get("/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def models():
        card = ModelCard(id=limits.model_name, created=worker.started, max_model_len=limits.max_len)
        return ModelList(data=[card])

    return router
