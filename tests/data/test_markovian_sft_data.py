"""tools/markovian_sft_data.py: SFT rows on the contexts Markovian (Delethink) decoding produces.

The chunk rows are checked by hand on a small trace, then the written shards are read back
through the SFT pipeline (source=arrayrecord) and compared with the rule applied to each
example's own tokens.
"""

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from jreason.data import pipeline
from jreason.data.pipeline import DataConfig, build_iterator
from jreason.data.tasks import get_task
from jreason.decode.markovian import MarkovianConfig
from jreason.tokenizer import load_tokenizer, train_sentencepiece

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("msd", REPO / "tools/markovian_sft_data.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)

KNOBS = {"num_operands": 4, "max_value": 9, "ops": ["+", "-"], "instructions": False}


def test_chunk_rows_by_hand():
    query = [100, 101]
    trace = list(range(14))  # 0 .. 13
    cfg = MarkovianConfig(chunk_size=6, keep_head=1, keep_tail=2, max_chunks=8)  # m = 3
    rows = tool.chunk_rows(query, trace, cfg)
    # chunk 1 = query + trace[:6] (not a row here); resets after 6, 9, 12 tokens, each new
    # chunk holds C - m = 3 tokens: query + head [0] + last two, then the next three
    assert rows == [
        ([100, 101, 0, 4, 5, 6, 7, 8], [0, 0, 0, 0, 0, 1, 1, 1]),
        ([100, 101, 0, 7, 8, 9, 10, 11], [0, 0, 0, 0, 0, 1, 1, 1]),
        ([100, 101, 0, 10, 11, 12, 13], [0, 0, 0, 0, 0, 1, 1]),
    ]
    # max_chunks caps the resets (I = 2: one reset); a trace that fits C has none
    capped = dataclasses.replace(cfg, max_chunks=2)
    assert tool.chunk_rows(query, trace, capped) == rows[:1]
    assert tool.chunk_rows(query, trace[:6], cfg) == []
    # default carryover C/2, no head: the last three tokens
    plain = MarkovianConfig(chunk_size=6, max_chunks=8)
    assert tool.chunk_rows(query, trace[:10], plain) == [
        ([100, 101, 3, 4, 5, 6, 7, 8], [0, 0, 0, 0, 0, 1, 1, 1]),
        ([100, 101, 6, 7, 8, 9], [0, 0, 0, 0, 0, 1]),
    ]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    task = get_task("arithmetic", **KNOBS)
    lines = []
    for ex in task.generate(99, 300):
        lines += [ex.prompt, task.reference_completion(ex)]
    path = train_sentencepiece(lines, 300, tmp_path_factory.mktemp("tok") / "tok")
    return load_tokenizer(path)


def test_shards_hold_full_and_chunk_rows_the_pipeline_reads(tok, tmp_path):
    out = tmp_path / "mk"
    tool.main(
        ["--tokenizer", str(tok.path), "--task", "arithmetic", "--num", "6", "--seed", "3"]
        + [f"--knob={k}={v}" for k, v in KNOBS.items() if k != "ops"]
        + ["--knob", "ops=[+, -]", "--chunk-size", "12", "--carryover", "5"]
        + ["--full-fraction", "0.5", "--out", str(out)]
    )
    cfg = MarkovianConfig(chunk_size=12, keep_tail=5, max_chunks=8)
    task = get_task("arithmetic", **KNOBS)
    want = []
    for ex in task.generate(3, 6):
        ids, mask = pipeline.tokenize_example(ex, tok)
        query, trace = tool.split_example(ids, mask)
        assert query + trace == ids.tolist() and len(trace) > 12  # resets do happen
        full = (f"{ex.id}-full", ids.tolist(), mask.tolist())
        chunks = [
            (f"{ex.id}-chunk{k}", r, m)
            for k, (r, m) in enumerate(tool.chunk_rows(query, trace, cfg), start=2)
        ]
        for _, r, m in chunks:  # query + 5 carried trace tokens, then up to 7 trained ones
            assert r[: len(query)] == query and m.count(0) == len(query) + 5
            assert 0 < m.count(1) <= 7
        want.append((full, chunks))

    from array_record.python.array_record_data_source import ArrayRecordDataSource

    shards = sorted(str(p) for p in out.glob("*.array_record"))
    got = [pipeline.decode_tokenized(r) for r in ArrayRecordDataSource(shards)]
    got = [(rid, ids.tolist(), mask.tolist()) for ids, mask, rid in got]
    fulls = [g for g in got if g[0].endswith("-full")]
    assert 0 < len(fulls) < 6  # about half the examples keep their whole-trace row
    assert [g for g in got if not g[0].endswith("-full")] == [c for _, cs in want for c in cs]
    assert all(f in [w[0] for w in want] for f in fulls)

    # the SFT pipeline takes the shards (meta.json: this tokenizer) and trains only new tokens
    data = DataConfig(
        source="arrayrecord",
        paths=(str(out / "*.array_record"),),
        seq_len=256,
        global_batch=2,
        num_epochs=1,
        shuffle=False,
    )
    batches = list(build_iterator(data, tok))
    # every loss token comes through (a document's first token is never a target)
    assert sum(int(b["loss_mask"].sum()) for b in batches) == sum(sum(m[1:]) for _, _, m in got)


def test_markovian_demo_driver_end_to_end(tmp_path):
    """tools/markovian_demo.py, shortened: tokenizer, rows, SFT, Delethink RL, both evals."""
    import os
    import subprocess
    import sys

    run = tmp_path / "mk"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools/markovian_demo.py"), "--run-dir", str(run)]
        + ["--examples", "16", "sft.steps=3", "sft.checkpoint.every=3"]
        + ["sft.tokenizer.train_examples=300", "rl.steps=1", "rl.eval.num_examples=4"]
        + ["rl.rollout.prompts_per_step=2", "rl.rollout.group_size=2", "rl.algo.minibatches=1"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Markovian-thinking demo" in proc.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["sft_steps"] == 3 and summary["rl_steps"] == 1
    mk = {"chunk_size": 20, "carryover": 10, "keep_head": 0, "max_chunks": 4}
    assert summary["markovian"] == mk  # configs/rl/markovian_demo.yaml
    tok = load_tokenizer(run / "tokenizer" / "tokenizer.model")
    problems = pipeline.eval_examples(DataConfig(task_knobs=KNOBS, seed=1), 4)
    query = max(
        len(
            tok.apply_chat_template(
                [{"role": "user", "content": ex.prompt}],
                tokenize=True,
                add_generation_prompt=True,
                enable_thinking=True,
            )
        )
        for ex in problems
    )
    for stage in ("sft", "rl"):
        chunked, full = summary["chunked"][stage], summary["full_context"][stage]
        assert 0.0 <= chunked["accuracy"] <= 1.0 and 0.0 <= full["accuracy"] <= 1.0
        assert chunked["peak_context"] <= query + 20  # query + C, whatever the trace length
    meta = json.loads((run / "data" / "meta.json").read_text())
    assert meta["examples"] == 16 and meta["num_records"] > 16  # chunk rows besides traces
