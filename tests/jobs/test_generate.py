"""`jreason generate` and `jreason eval` end to end, on a tiny random model with a real tokenizer.

The model directory is what a user passes: a jreason checkpoint (model.yaml + orbax params) with
a sentencepiece tokenizer trained here on task text. Checks against independent references:
the greedy tokens equal the full-forward argmax, a killed-and-resumed job equals an uninterrupted
one row for row, and error rows name the line.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from greedy_reference import argmax_reference
from model_dirs import tiny_chat_model

from jreason.data.tasks import get_task
from jreason.jobs.sweep import grade
from jreason.model.store import load_model
from jreason.model.transformer import abstract_model
from jreason.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("gen"), max_len=256)


def jreason(*args, check=True, wait=True):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    cmd = [sys.executable, "-m", "jreason", *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and proc.returncode:
        raise AssertionError(f"jreason {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")


def test_generate_greedy_matches_reference_and_reports_bad_lines(model_dir, tmp_path):
    good = [json.dumps({"id": f"p{i}", "prompt": f"What is {i} + {2 * i}?"}) for i in range(5)]
    lines = [
        good[0],
        '{"id": "broken", "prompt": ',  # line 2: invalid JSON
        good[1],
        json.dumps({"id": "noprompt", "question": "1 + 1"}),  # line 4: no prompt field
        good[2],
        json.dumps({"id": "long", "prompt": "12 + 34 " * 60}),  # line 6: longer than max_len
        *good[3:],
    ]
    write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    common = ["--model", model_dir, "--input", tmp_path / "in.jsonl", "--output", out]
    jreason("generate", *common, "--max-tokens", 12, "--max-len", 96, "--max-slots", 2,
            "--logprobs")  # fmt: skip
    got = {r["id"]: r for r in rows(out)}
    assert len(got) == 8 and len(rows(out)) == 8
    assert "line 2" in got["line-2"]["error"] and "JSON" in got["line-2"]["error"]
    assert "line 4" in got["noprompt"]["error"] and "prompt" in got["noprompt"]["error"]
    assert "line 6" in got["long"]["error"] and "max_len=96" in got["long"]["error"]

    # the greedy tokens are the full-forward argmax continuation of the chat-templated prompt
    tok = load_tokenizer(model_dir)
    cfg, params = load_model(model_dir)
    model, _ = abstract_model(cfg)
    for i in (0, 3):
        row = got[f"p{i}"]
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": f"What is {i} + {2 * i}?"}], tokenize=True
        )
        ref = argmax_reference(model, params, prompt, len(row["token_ids"]), length=64)
        assert row["token_ids"] == ref
        assert row["prompt_tokens"] == len(prompt)
        assert row["finish_reason"] in ("stop", "length")
        if row["finish_reason"] == "length":
            assert row["completion_tokens"] == 12


def test_killed_job_resumes_to_the_same_rows(model_dir, tmp_path):
    lines = [json.dumps({"id": i, "prompt": f"{i} + {i} = ?"}) for i in range(12)]
    write_jsonl(tmp_path / "in.jsonl", lines)
    flags = ["--model", model_dir, "--input", tmp_path / "in.jsonl", "--n", 2,
             "--temperature", 1.0, "--top-p", 0.9, "--seed", 3, "--max-tokens", 24,
             "--max-len", 96, "--max-slots", 3]  # fmt: skip

    whole = tmp_path / "whole.jsonl"
    jreason("generate", *flags, "--output", whole)

    part = tmp_path / "part.jsonl"
    proc = jreason("generate", *flags, "--output", part, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if part.exists() and part.read_text().count("\n") >= 4:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    n_before = part.read_text().count("\n")
    assert 4 <= n_before < 24, "the job was not killed mid-way; the test did not exercise resume"
    with part.open("a") as f:
        f.write('{"id": "3", "sample": 1, "completion": "torn wri')  # a write cut by the kill

    stats = json.loads(jreason("generate", *flags, "--output", part).stdout)
    assert stats["skipped"] == n_before and stats["written"] == 24 - n_before
    resumed = rows(part)  # every line parses: the torn tail is gone
    keys = [(r["id"], r["sample"]) for r in resumed]
    assert len(keys) == len(set(keys)) == 24
    expected = {(r["id"], r["sample"]): r for r in rows(whole)}
    for r in resumed:
        assert r == expected[(r["id"], r["sample"])]
    # samples of one prompt differ (per-sample seeds), so n=2 is not one sample twice
    assert any(expected[(str(i), 0)]["completion"] != expected[(str(i), 1)]["completion"]
               for i in range(12))  # fmt: skip


def test_eval_sweeps_thinking_budgets(model_dir, tmp_path):
    out = tmp_path / "eval"
    proc = jreason("eval", "--model", model_dir, "--task", "arithmetic", "--num", 3, "--n", 2,
                   "--temperature", 1.0, "--budgets", 4, "none", "--max-tokens", 16,
                   "--max-len", 192, "--max-slots", 4, "--out", out)  # fmt: skip
    assert "pass@2" in proc.stdout
    summary = json.loads((out / "report" / "summary.json").read_text())
    by_budget = {s["budget"]: s for s in summary}
    assert set(by_budget) == {4, None}
    for s in summary:
        assert s["problems"] == 3 and s["samples"] == 6
    # with a budget of 4 the thinking is cut at 4 tokens (then </think> is forced)
    for r in rows(out / "budget-4.jsonl"):
        assert r["thinking_tokens"] <= 4
        assert "</think>" in r["completion"] or r["completion_tokens"] <= 4
    assert (out / "report" / "accuracy_vs_thinking.png").stat().st_size > 1000
    # rerunning resumes: nothing is generated twice
    jreason("eval", "--model", model_dir, "--task", "arithmetic", "--num", 3, "--n", 2,
            "--temperature", 1.0, "--budgets", 4, "none", "--max-tokens", 16,
            "--max-len", 192, "--max-slots", 4, "--out", out)  # fmt: skip
    assert len(rows(out / "budget-none.jsonl")) == 6


def test_grade_uses_the_task_checker():
    task = get_task("arithmetic")
    rows_in = [
        {"id": "a", "sample": 0, "completion": "x\n</think>\n\\boxed{12}", "reference": "12",
         "thinking_tokens": 3},
        {"id": "a", "sample": 1, "completion": "x\n</think>\n\\boxed{13}", "reference": "12",
         "thinking_tokens": 5},
        {"id": "b", "sample": 0, "line_no": 2, "error": "line 2: invalid JSON"},
    ]  # fmt: skip
    graded = grade(rows_in, task.score, budget=8)
    assert [g.get("correct") for g in graded] == [True, False, None]
    assert graded[0]["answer"] == "12" and graded[1]["answer"] == "13"
    assert all(g["budget"] == 8 for g in graded)
