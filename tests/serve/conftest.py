"""A tiny model served over real HTTP on loopback, shared by the serve tests.

The model directory is what a user passes to `jreason serve`: a jreason checkpoint of a random
tiny Qwen3 with a sentencepiece tokenizer trained here on task text (byte fallback, ChatML and
think tags as single tokens). The app runs under uvicorn in a background thread on a free port;
its engine thread, metrics and HTTP stack are the real ones. `direct()` runs requests on a
second Engine over the same weights and shapes (so nothing recompiles): the reference the HTTP
results are compared with.
"""

import dataclasses
import json
import socket
import threading
import time

import httpx
import pytest
from model_dirs import tiny_chat_model

from jreason.decode.engine import Engine
from jreason.decode.load import load_engine
from jreason.serve.server import ServeOptions, create_app, warmup
from jreason.tokenizer import load_tokenizer

MAX_LEN = 128
SLOTS = 8
API_KEY = "test-key"
MODEL = "tiny"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("serve"), MAX_LEN)


@dataclasses.dataclass
class Served:
    url: str
    app: object
    engine: Engine
    tokenizer: object
    server: object
    thread: threading.Thread
    model: str = MODEL
    api_key: str = API_KEY
    max_len: int = MAX_LEN
    stream_head: bytes = b""  # what open_stream read before returning

    @property
    def worker(self):
        return self.app.state.worker

    def client(self, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kw)

    def openai(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, **kw)

    def metric(self, name: str, labels: str = "") -> float:
        """A sample of /metrics, e.g. metric("jreason_running_slots")."""
        text = httpx.get(self.url + "/metrics").text
        key = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        return 0.0

    def sample(self, name: str, **labels) -> float:
        """A metric read in-process (no HTTP round trip while the engine keeps stepping)."""
        return self.app.state.metrics.registry.get_sample_value(name, labels) or 0.0

    def wait_idle(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.worker.live == 0 and self.engine.running() == 0:
                return
            time.sleep(0.01)
        raise AssertionError(f"not idle: live={self.worker.live} running={self.engine.running()}")

    def open_stream(self, max_tokens: int = 100, **extra) -> socket.socket:
        """A streamed completion on a raw socket; returns once its first event arrived, with
        the socket still open. The bytes read so far are in `self.stream_head`: a short
        request can finish (and send `[DONE]`) within that first read."""
        # logprobs: every token is an event (text alone may be held back, e.g. a partial
        # UTF-8 character), so the first event comes with the first token
        body = json.dumps({"model": self.model, "prompt": "1 + 2 =", "max_tokens": max_tokens,
                           "stream": True, "ignore_eos": True, "logprobs": 0, **extra}).encode()  # fmt: skip
        host, port = self.url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)))
        auth = f"Authorization: Bearer {self.api_key}\r\n".encode()
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + auth
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        got = b""
        while b"data:" not in got:
            got += sock.recv(4096)
        self.stream_head = got
        return sock

    def direct(self, requests):
        """Results of running `requests` straight on an engine (same weights and shapes)."""
        e = self.engine
        ref = Engine(e.model, e.params, max_slots=e.max_slots, max_len=e.max_len,
                     pad_id=e.pad_id, detokenize=e.detokenize, think_end_id=e.think_end_id)  # fmt: skip
        rids = [ref.submit(r) for r in requests]
        results = ref.run_until_idle()
        return [results[r] for r in rids]


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def start_server(model_dir, engine=None, **opts) -> Served:
    """Serves the model (or a given engine over it) on a free loopback port."""
    import uvicorn

    if engine is None:
        engine, tokenizer = load_engine(model_dir, max_slots=SLOTS, max_len=MAX_LEN)
    else:
        tokenizer = load_tokenizer(model_dir)
    warmup(engine)
    app = create_app(engine, tokenizer, ServeOptions(**opts), MODEL)
    sock = _free_socket()
    host, port = sock.getsockname()
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    return Served(f"http://{host}:{port}", app, engine, tokenizer, server, thread)


def stop_server(served: Served) -> None:
    served.server.should_exit = True
    served.thread.join(10)


@pytest.fixture(scope="session")
def served(model_dir):
    """The main server: an API key, room for 64 waiting requests, n <= 4, 64 KiB bodies."""
    s = start_server(
        model_dir, api_key=API_KEY, max_slots=SLOTS, max_queue=64, max_n=4, max_body_bytes=1 << 16
    )
    yield s
    stop_server(s)


@pytest.fixture(scope="session")
def tight(served, model_dir):
    """A second server with no queue (max_queue=0), over the same weights and shapes (no
    recompilation): a request beyond its slots gets 429."""
    e = served.engine
    engine = Engine(e.model, e.params, max_slots=e.max_slots, max_len=e.max_len,
                    pad_id=e.pad_id, detokenize=e.detokenize)  # fmt: skip
    s = start_server(model_dir, engine=engine, max_slots=e.max_slots, max_queue=0)
    yield s
    stop_server(s)
