"""`jreason serve`: the FastAPI app, the engine thread that owns the Engine, and the metrics.

One thread owns the decode engine; HTTP handlers (openai.py) run on the asyncio loop and never
touch it. They talk through two one-way channels:
- into the engine thread, a thread-safe inbox of ("submit", job) and ("cancel", job): the thread
  drains it before every engine step, so a cancel (a client that went away) frees its slot
  before the next step is dispatched;
- back to a handler, the job's asyncio queue, filled with `loop.call_soon_threadsafe`: after
  every step the thread reads each live request's `engine.trace(rid)` and sends what is new
  (streamed jobs only), then the `Result` of each request that finished.
When nothing is queued or running the thread blocks on the inbox, so an idle server costs
nothing. Backpressure is a bound on live requests (running + waiting for a slot): past
`max_slots + max_queue` a request gets 429 with Retry-After instead of an unbounded queue.

A pure-ASGI guard in front of the app rejects a wrong or missing API key (401, every /v1 route)
and a body over `max_body_bytes` (413) before anything parses it. /metrics is Prometheus text:
queue depth, running slots, generated tokens, time-to-first-token and inter-token latency
histograms, finished requests by reason, errors by status and type.

Deliberately left out: several engines behind one server (data parallelism), priorities, and
token-level fairness between queued requests (the engine's queue is FIFO).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import math
import queue
import threading
import time
from pathlib import Path

from jreason.serve import openai as api

log = logging.getLogger("jreason.serve")

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """Everything about how to serve; the `jreason serve` flags map one to one."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_slots: int = 16
    max_len: int | None = None  # KV cache per slot; default the model's, at most 4096
    api_key: str | None = None
    max_queue: int = 256  # requests waiting for a slot before 429
    max_n: int = 8
    max_body_bytes: int = 1 << 20
    model_name: str | None = None  # the `model` clients send; default the directory's name
    retry_after: int = 1  # seconds, in 429 responses

    def __post_init__(self):
        for name in ("max_slots", "max_n", "max_body_bytes", "retry_after"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_queue < 0:
            raise ValueError(f"max_queue={self.max_queue} must be >= 0")


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (no import-time globals)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.queue_depth = Gauge("jreason_queue_depth", "requests waiting for a slot", registry=r)
        self.running = Gauge("jreason_running_slots", "slots generating", registry=r)
        self.max_slots = Gauge("jreason_max_slots", "slots of the engine", registry=r)
        self.generated = Counter(
            "jreason_generated_tokens", "completion tokens generated", registry=r
        )
        self.prompt = Counter("jreason_prompt_tokens", "prompt tokens admitted", registry=r)
        self.steps = Counter("jreason_engine_steps", "engine steps", registry=r)
        self.finished = Counter(
            "jreason_requests_finished", "choices finished, by reason", ["reason"], registry=r
        )
        self.errors = Counter(
            "jreason_errors", "error responses, by status and type", ["status", "type"], registry=r
        )
        self.ttft = Histogram(
            "jreason_time_to_first_token_seconds",
            "request arrival to its first generated token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "jreason_inter_token_latency_seconds",
            "time between a request's generated tokens",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "jreason_request_latency_seconds",
            "request arrival to its last choice finishing",
            buckets=TTFT_BUCKETS,
            registry=r,
        )

    def error(self, status: int, type: str) -> None:
        self.errors.labels(str(status), type).inc()

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class Job:
    """One HTTP request in flight: its choices and the queue its handler reads events from."""

    def __init__(self, plan: api.Plan, loop: asyncio.AbstractEventLoop):
        self.plan, self.loop = plan, loop
        self.arrived = time.perf_counter()
        self.events: asyncio.Queue = asyncio.Queue()
        self.seqs = [_Seq(self, c.index, c.request) for c in plan.choices]
        self.remaining = len(self.seqs)  # engine thread only
        self.done = False  # set by the engine thread when every choice has finished

    async def next_event(self) -> tuple:
        return await self.events.get()

    def push(self, *event) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclasses.dataclass
class _Seq:
    """One choice of a job = one engine request (engine thread only)."""

    job: Job
    index: int
    request: object
    rid: int | None = None
    seen: int = 0  # trace tokens reported so far
    t_last: float = 0.0
    finished: bool = False


class EngineWorker:
    """The thread that owns `engine`; everything else calls `submit`, `cancel` and `check`."""

    def __init__(self, engine, metrics: Metrics, *, max_queue: int = 256, retry_after: int = 1):
        self.engine, self.metrics = engine, metrics
        self.capacity = engine.max_slots + max_queue
        self.retry_after = retry_after
        self.started = int(time.time())
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._live = 0  # choices accepted and not finished (guarded by _lock)
        self._seqs: dict[int, _Seq] = {}  # engine request id -> choice (engine thread only)
        self._thread: threading.Thread | None = None
        metrics.max_slots.set(engine.max_slots)

    # ---- called from the HTTP side ----------------------------------------------------------

    def check(self, request) -> None:
        """Raises ValueError for a request the engine cannot run (reads only config)."""
        self.engine.check(request)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def live(self) -> int:
        return self._live

    def submit(self, plan: api.Plan) -> Job:
        if not self.alive:
            raise api.APIError(
                503, "the engine is not running", type="server_error", code="engine_down"
            )
        k = len(plan.choices)
        with self._lock:
            if self._live + k > self.capacity:
                raise api.APIError(
                    429,
                    f"the server's queue is full ({self._live} requests in flight); "
                    f"retry after {self.retry_after} s",
                    type="rate_limit_error",
                    code="queue_full",
                    headers={"Retry-After": str(self.retry_after)},
                )
            self._live += k
        job = Job(plan, asyncio.get_running_loop())
        self._inbox.put(("submit", job))
        return job

    def cancel(self, job: Job) -> None:
        if not job.done:
            self._inbox.put(("cancel", job))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="jreason-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._inbox.put(("stop", None))
            self._thread.join(timeout)

    # ---- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                msg = self._inbox.get(block=not self.engine.has_work())
            except queue.Empty:
                msg = None
            try:
                while msg is not None:  # drain: submissions and cancels before the next step
                    if msg[0] == "stop":
                        self._fail_all(api.APIError(503, "the server is shutting down"))
                        return
                    (self._admit if msg[0] == "submit" else self._cancel)(msg[1])
                    try:
                        msg = self._inbox.get_nowait()
                    except queue.Empty:
                        msg = None
                if self.engine.has_work():
                    finished = self.engine.step()
                    self.metrics.steps.inc()
                    self._report(finished)
            except Exception as e:  # a bug or a device error: fail what is live, keep serving
                log.exception("engine step failed")
                self._fail_all(api.APIError(500, f"engine error: {e}", type="server_error"))
            running = self.engine.running()
            self.metrics.running.set(running)
            self.metrics.queue_depth.set(max(self._live - running, 0))

    def _admit(self, job: Job) -> None:
        for seq in job.seqs:
            try:
                seq.rid = self.engine.submit(seq.request)
            except ValueError as e:  # checked on the HTTP side already: cannot normally happen
                self._end(seq, None)
                seq.job.push("error", seq.index, api.invalid(str(e)))
                continue
            seq.t_last = job.arrived
            self._seqs[seq.rid] = seq
            self.metrics.prompt.inc(len(seq.request.prompt_ids))

    def _cancel(self, job: Job) -> None:
        for seq in job.seqs:
            if seq.rid is not None and not seq.finished:
                result = self.engine.cancel(seq.rid)
                if result is not None:
                    self._end(seq, result)

    def _report(self, finished) -> None:
        """After a step: new tokens of every live choice, then the finished ones' Results."""
        now = time.perf_counter()
        for rid, seq in list(self._seqs.items()):
            trace = self.engine.trace(rid)
            if trace is not None:
                self._progress(seq, trace, now)
        for rid, result in finished:
            seq = self._seqs.get(rid)
            if seq is None:  # not ours (cannot happen) or already ended
                self.engine.results.pop(rid, None)
                continue
            self._progress(seq, result.tokens, now, stream=False)
            self._end(seq, result)

    def _progress(self, seq: _Seq, tokens, now: float, stream: bool = True) -> None:
        new = len(tokens) - seq.seen
        if new <= 0:
            return
        self.metrics.generated.inc(new)
        if seq.seen == 0:
            self.metrics.ttft.observe(now - seq.job.arrived)
        else:
            for _ in range(new):  # the step's tokens share its time
                self.metrics.itl.observe((now - seq.t_last) / new)
        if stream and seq.job.plan.stream:
            lps = self._live_logprobs(seq.rid, len(tokens)) if seq.job.plan.logprobs else []
            seq.job.push("tokens", seq.index, tokens[seq.seen :], lps[seq.seen :])
        seq.seen, seq.t_last = len(tokens), now

    def _live_logprobs(self, rid: int, n: int) -> list[float]:
        """The logprobs of a running request's trace so far."""
        live = self.engine.trace(rid, logprobs=True)
        return live[1][:n] if live is not None else [math.nan] * n

    def _end(self, seq: _Seq, result) -> None:
        seq.finished = True
        if seq.rid is not None:
            self._seqs.pop(seq.rid, None)
            self.engine.results.pop(seq.rid, None)  # the engine keeps every Result otherwise
        with self._lock:
            self._live -= 1
        if result is not None:
            self.metrics.finished.labels(result.finish_reason).inc()
            seq.job.push("done", seq.index, result)
        job = seq.job
        job.remaining -= 1
        if job.remaining == 0:
            job.done = True
            self.metrics.latency.observe(time.perf_counter() - job.arrived)

    def _fail_all(self, error: api.APIError) -> None:
        for seq in list(self._seqs.values()):
            with contextlib.suppress(Exception):
                self.engine.cancel(seq.rid)
            self._end(seq, None)
            seq.job.push("error", seq.index, error)


# ---- the ASGI app -----------------------------------------------------------------------------


async def _send_error(scope, receive, send, error: api.APIError) -> None:
    from starlette.responses import JSONResponse

    await JSONResponse(error.body(), error.status, headers=error.headers)(scope, receive, send)


class Guard:
    """Pure ASGI middleware: 401 without the API key on /v1 routes, 413 for a body over the
    limit. It reads the whole (bounded) body itself and replays it, so an over-long body is
    refused without being buffered past the limit, and later messages (the client's disconnect)
    still reach the app."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, metrics: Metrics):
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes
        self.metrics = metrics

    def _reject(self, error: api.APIError):
        self.metrics.error(error.status, error.type)
        return error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        if self.api_key is not None and (path == "/v1" or path.startswith("/v1/")):
            scheme, _, key = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                key.strip().encode(), self.api_key.encode()
            ):
                error = api.APIError(
                    401,
                    "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                    type="authentication_error",
                    code="invalid_api_key",
                )
                return await _send_error(scope, receive, send, self._reject(error))
        too_large = api.APIError(
            413,
            f"the request body is over this server's limit of {self.max_body} bytes",
            code="request_too_large",
        )
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return await _send_error(scope, receive, send, self._reject(too_large))
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body
            size += len(message.get("body", b""))
            if size > self.max_body:
                return await _send_error(scope, receive, send, self._reject(too_large))
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(parts), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _validation_error(exc) -> api.APIError:
    errors = exc.errors()
    if not errors:
        return api.invalid("invalid request body")
    if errors[0].get("type") == "json_invalid":
        return api.invalid(f"the request body is not valid JSON: {errors[0].get('msg', '')}")
    # a value that fits no member of a union fails once per member: report the deepest
    # location ("stop[0]" over "stop"), where the message is the most specific
    e = max(errors, key=lambda e: len(api.error_param(tuple(e.get("loc", ()))) or ""))
    loc = tuple(e.get("loc", ()))
    if e.get("type") == "extra_forbidden" and loc:
        parent = api.error_param(loc[:-1])
        param = f"{parent}.{loc[-1]}" if parent else str(loc[-1])
        return api.invalid(f"unrecognized request argument supplied: {param}", param)
    param = api.error_param(loc)
    if param is None:
        if e.get("type") == "missing":
            return api.invalid("the request body is missing (expected a JSON object)")
        return api.invalid(f"the request body must be a JSON object: {e.get('msg', '')}")
    return api.invalid(f"invalid value for '{param}': {e.get('msg', 'invalid')}", param)


def _openapi(app, api_key: str | None, max_n: int, vocab_size: int):
    """FastAPI's schema, corrected: validation errors are 400s in the error model (not 422s),
    the /v1 routes require the bearer key when the server has one, and `n` and token ids
    have this server's maxima."""
    from fastapi.openapi.utils import get_openapi

    def build():
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        for path, ops in schema.get("paths", {}).items():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
                if api_key is not None and path.startswith("/v1/"):
                    op["security"] = [{"bearer": []}]
        components = schema.setdefault("components", {})
        schemas = components.get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        for model in api.STREAM_MODELS:  # what the event streams' itemSchemas refer to
            extra = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in extra.pop("$defs", {}).items():
                schemas.setdefault(name, sub)
            schemas.setdefault(model.__name__, extra)
        for name in ("CompletionRequest", "ChatCompletionRequest"):
            if "n" in schemas.get(name, {}).get("properties", {}):
                schemas[name]["properties"]["n"]["maximum"] = max_n
        for variant in schemas.get("CompletionRequest", {}).get("properties", {})["prompt"][
            "anyOf"
        ]:
            items = variant.get("items", {})
            for ids in (items, items.get("items", {})):
                if ids.get("type") == "integer":
                    ids["maximum"] = vocab_size - 1
        if api_key is not None:
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        app.openapi_schema = schema
        return schema

    return build


def create_app(engine, tokenizer, opts: ServeOptions, model_name: str):
    """The FastAPI app serving `engine`; its EngineWorker starts and stops with the app."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    metrics = Metrics()
    worker = EngineWorker(engine, metrics, max_queue=opts.max_queue, retry_after=opts.retry_after)
    limits = api.Limits(
        model_name=model_name,
        max_len=engine.max_len,
        max_n=opts.max_n,
        max_choices=worker.capacity,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(
        title="jreason",
        version="0.1.0",
        description="OpenAI-compatible serving of reasoning models (jreason's decode engine).",
        lifespan=lifespan,
    )
    app.state.worker, app.state.metrics, app.state.limits = worker, metrics, limits

    def error_response(error: api.APIError) -> JSONResponse:
        metrics.error(error.status, error.type)
        return JSONResponse(error.body(), error.status, headers=error.headers)

    @app.exception_handler(api.APIError)
    async def _api_error(request, exc: api.APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        return error_response(_validation_error(exc))

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(api.APIError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(Exception)
    async def _crash(request, exc):
        log.exception("unhandled error")
        return error_response(api.APIError(500, "internal server error", type="server_error"))

    app.include_router(api.make_router(worker, tokenizer, limits))

    @app.get("/health", response_model=api.Health, responses={503: {"model": api.ErrorResponse}})
    async def health():
        if not worker.alive:
            raise api.APIError(503, "the engine thread is not running", type="server_error")
        running = engine.running()
        return api.Health(status="ok", running=running, queued=max(worker.live - running, 0))

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def prometheus():
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    app.openapi = _openapi(app, opts.api_key, opts.max_n, tokenizer.vocab_size)
    app.add_middleware(
        Guard, api_key=opts.api_key, max_body_bytes=opts.max_body_bytes, metrics=metrics
    )
    return app


def warmup(engine) -> float:
    """Compiles the engine's step before the first client waits for it, for every attend
    bucket (a long request crossing one would otherwise compile mid-traffic); returns
    seconds."""
    from jreason.decode.engine import Request

    t0 = time.perf_counter()
    engine.warmup_decode()
    rid = engine.submit(Request([engine.pad_id + 1], max_tokens=2))
    engine.run_until_idle()
    engine.results.pop(rid, None)
    return time.perf_counter() - t0


def serve(model_path: str | Path, opts: ServeOptions, **load_kw) -> None:
    """Loads the model and serves it until interrupted (`jreason serve`)."""
    import uvicorn

    from jreason.decode.load import load_engine

    engine, tokenizer = load_engine(
        model_path, max_slots=opts.max_slots, max_len=opts.max_len, **load_kw
    )
    name = opts.model_name or Path(model_path).resolve().name
    log.info("model %s: %d slots x %d tokens; compiling...", name, engine.max_slots, engine.max_len)
    log.info("warm-up done in %.1f s", warmup(engine))
    app = create_app(engine, tokenizer, opts, name)
    log.info("serving %r on http://%s:%d/v1", name, opts.host, opts.port)
    uvicorn.run(app, host=opts.host, port=opts.port, log_level="info", timeout_keep_alive=30)
