"""`generate` / `eval` with --soft-thinking, in process on the tiny chat model: one-token concepts
give the full-forward greedy trace, budgets insert `</think>`, a rerun resumes, and the flags
reach GenerateOptions."""

import json

import pytest
from greedy_reference import argmax_reference
from model_dirs import tiny_chat_model

from jreason.cli import _generate_options, build_parser
from jreason.decode.load import load_engine
from jreason.jobs.generate import GenerateOptions, run_generate
from jreason.jobs.sweep import run_eval
from jreason.model.store import load_model
from jreason.model.transformer import abstract_model

MAX_TOKENS = 16


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    model_dir = tiny_chat_model(tmp_path_factory.mktemp("soft"), max_len=256)
    engine, tok = load_engine(model_dir, max_slots=4, max_len=256)
    return model_dir, engine, tok


def test_soft_job_with_one_token_concepts_is_greedy_and_resumes(loaded, tmp_path):
    model_dir, engine, tok = loaded
    questions = [f"What is {i} + {3 * i}?" for i in range(5)]  # 2 batches of 4, one padded
    src = tmp_path / "in.jsonl"
    src.write_text(
        "".join(json.dumps({"id": f"q{i}", "prompt": q}) + "\n" for i, q in enumerate(questions))
    )
    out = tmp_path / "out.jsonl"
    opts = GenerateOptions(max_tokens=MAX_TOKENS, soft_thinking=True, soft_top_k=1, logprobs=True)
    stats = run_generate(engine, tok, src, out, opts, progress=False)
    assert stats["written"] == 5 and stats["errors"] == 0
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    cfg, params = load_model(model_dir)
    model, _ = abstract_model(cfg)
    for i, q in enumerate(questions):
        row = rows[f"q{i}"]
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True
        )
        ref = argmax_reference(model, params, prompt, len(row["token_ids"]), length=64)
        assert row["token_ids"] == ref
        ids = row["token_ids"]
        think = ids.index(tok.think_close_id) if tok.think_close_id in ids else len(ids)
        assert row["soft_steps"] == row["thinking_tokens"] == think
        assert row["finish_reason"] == "stop" or len(ids) == MAX_TOKENS
    again = run_generate(engine, tok, src, out, opts, progress=False)
    assert again["skipped"] == 5 and again["written"] == 0


def test_soft_eval_budget_inserts_think_end(loaded, tmp_path):
    """eval's budget sweep becomes the soft-step budget (short prompts: the same compilation)."""
    _, engine, tok = loaded
    src = tmp_path / "in.jsonl"
    lines = [
        json.dumps({"id": f"a{i}", "prompt": f"{i} + 1?", "answer": str(i + 1)}) for i in range(3)
    ]
    src.write_text("\n".join(lines) + "\n")
    opts = GenerateOptions(max_tokens=MAX_TOKENS, soft_thinking=True, soft_top_k=4)
    summary = run_eval(
        engine, tok, tmp_path / "eval", opts, input_path=src, budgets=(3, None), progress=False
    )
    assert [s["samples"] for s in summary] == [3, 3]
    reasons = []
    for line in (tmp_path / "eval" / "budget-3.jsonl").read_text().splitlines():
        row = json.loads(line)
        reasons.append(row["end_reason"])
        assert row["soft_steps"] <= 3 and row["thinking_tokens"] <= 3
        if row["end_reason"] == "budget":
            assert row["soft_steps"] == 3 and row["reasoning"] is not None
            assert "</think>" in row["completion"]
    assert "budget" in reasons, reasons


def test_soft_flags_and_refused_combinations():
    args = build_parser().parse_args(
        ["eval", "--model", "m", "--task", "arithmetic", "--out", "o", "--soft-thinking",
         "--soft-top-k", "5", "--soft-temperature", "0.5", "--cold-stop-entropy", "0.1",
         "--cold-stop-steps", "32"]
    )  # fmt: skip
    opts = _generate_options(args)
    assert opts.soft_thinking and opts.soft_top_k == 5 and opts.soft_temperature == 0.5
    assert opts.cold_stop_entropy == 0.1 and opts.cold_stop_steps == 32
    with pytest.raises(ValueError, match="chunk_size"):
        GenerateOptions(soft_thinking=True, chunk_size=64)
    with pytest.raises(ValueError, match="min_thinking_tokens"):
        GenerateOptions(soft_thinking=True, min_thinking_tokens=4)
    with pytest.raises(ValueError, match="soft_top_k"):
        GenerateOptions(soft_thinking=True, soft_top_k=0)
    with pytest.raises(ValueError, match="cold_stop_entropy"):
        GenerateOptions(soft_thinking=True, cold_stop_entropy=-1.0)
