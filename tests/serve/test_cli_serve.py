"""`jreason serve` as a user runs it: a subprocess on a free port, called with curl-like HTTP
and the openai client, stopped with SIGINT."""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_jreason_serve_cli(model_dir):
    import openai

    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    cmd = [sys.executable, "-m", "jreason", "serve", "--model", str(model_dir),
           "--port", str(port), "--max-slots", "2", "--max-len", "64", "--api-key", "k",
           "--served-model-name", "tiny-cli", "--max-n", "2"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-cli"]
        out = client.chat.completions.create(
            model="tiny-cli", messages=[{"role": "user", "content": "1 + 1?"}], max_tokens=5
        )
        assert out.usage.completion_tokens <= 5 and out.choices[0].finish_reason in (
            "stop",
            "length",
        )
        r = httpx.post(url + "/v1/completions", json={"model": "tiny-cli", "prompt": "x", "n": 3},
                       headers={"Authorization": "Bearer k"})  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        assert "jreason_running_slots 0.0" in httpx.get(url + "/metrics").text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0, proc.stdout.read().decode()
