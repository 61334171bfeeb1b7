"""The grain SFT pipeline: rows checked against an independent reading of what went in.

Every check decodes a packed row back into its documents and compares them with the ChatML text
written out by hand here (not through the chat template code under test): the masked part must
be exactly the prompt, the loss part exactly the completion, targets exactly the next token of
the same document.
"""

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jreason.data import pipeline
from jreason.data.pipeline import DataConfig, build_iterator, eval_examples, tokenize_example
from jreason.data.tasks import get_task
from jreason.data.verify import RecordError
from jreason.tokenizer import load_tokenizer, train_sentencepiece

REPO = Path(__file__).resolve().parents[2]
KNOBS = {"num_operands": 3, "max_value": 20, "ops": ["+", "-"]}
TASK = get_task("arithmetic", **KNOBS)
# ~150 tokens per example with the fixture tokenizer, so 512 holds about three.
CFG = DataConfig(task_knobs=KNOBS, num_examples=48, seq_len=512, global_batch=4, seed=7)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    lines = []
    for ex in TASK.generate(99, 400):
        lines += [ex.prompt, TASK.reference_completion(ex)]
    path = train_sentencepiece(lines, 400, tmp_path_factory.mktemp("tok") / "tok")
    return load_tokenizer(path)


def prompt_text(prompt: str, thinking: bool = True) -> str:
    gen = "<think>\n" if thinking else "<think>\n\n</think>\n"
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{gen}"


def completion_text(reasoning: str, answer: str, thinking: bool = True) -> str:
    head = f"{reasoning}\n</think>\n" if thinking else ""
    return f"{head}\\boxed{{{answer}}}<|im_end|>"


def documents(batch, tok):
    """Checks one batch's row invariants; returns [(prompt text, completion text)] per document."""
    docs = []
    inputs, targets, loss = batch["inputs"], batch["targets"], batch["loss_mask"]
    seg, pos = batch["segment_ids"], batch["positions"]
    b, T = inputs.shape
    assert targets.shape == loss.shape == seg.shape == pos.shape == (b, T)
    assert inputs.dtype == targets.dtype == seg.dtype == pos.dtype == np.int32
    assert loss.dtype == np.float32
    for r in range(b):
        ids = seg[r][seg[r] > 0]
        assert list(ids) == sorted(ids) and (seg[r][len(ids) :] == 0).all()  # padding at the end
        for t in range(T):
            same = t + 1 < T and seg[r, t] > 0 and seg[r, t + 1] == seg[r, t]
            if same:
                assert targets[r, t] == inputs[r, t + 1]
            else:  # a document's last token, or padding: never predicts across documents
                assert loss[r, t] == 0 and targets[r, t] == tok.pad_id
        for s in range(1, int(seg[r].max()) + 1):
            (where,) = np.nonzero(seg[r] == s)
            assert (np.diff(where) == 1).all()
            assert (pos[r, where] == np.arange(len(where))).all()
            doc_loss = loss[r, where]
            n = int(doc_loss.sum())
            # The loss covers exactly the document's tail: prompt first, completion after.
            assert (doc_loss[len(where) - n - 1 : -1] == 1).all()
            prompt_ids = inputs[r, where[: len(where) - n]]
            completion_ids = targets[r, where[doc_loss == 1]]
            docs.append((tok.decode(prompt_ids), tok.decode(completion_ids)))
    return docs


def expected_docs(examples, thinking=True):
    return {
        prompt_text(ex.prompt, thinking): completion_text(ex.reasoning, ex.answer, thinking)
        for ex in examples
    }


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# --- tokenize_example --------------------------------------------------------------------------


@pytest.mark.parametrize("thinking", [True, False])
def test_tokenize_example_masks_the_prompt_and_trains_the_completion(tok, thinking):
    ex = next(TASK.generate(0, 1))
    ids, mask = tokenize_example(ex, tok, thinking=thinking)
    assert ids.dtype == np.int32 and mask.shape == ids.shape
    n = int(mask.sum())
    assert (mask[: len(mask) - n] == 0).all() and (mask[len(mask) - n :] == 1).all()
    assert tok.decode(ids[: len(ids) - n]) == prompt_text(ex.prompt, thinking)
    assert tok.decode(ids[len(ids) - n :]) == completion_text(ex.reasoning, ex.answer, thinking)
    # The prompt is tokenized exactly as inference tokenizes it.
    assert list(ids[: len(ids) - n]) == tok.apply_chat_template(
        [{"role": "user", "content": ex.prompt}], enable_thinking=thinking, tokenize=True
    )
    assert ids[-1] in tok.stop_ids


def test_tokenize_messages_trains_only_assistant_turns(tok):
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "1 + 2?"},
            {"role": "assistant", "content": "3", "reasoning": "1 + 2 = 3"},
            {"role": "user", "content": "times 4?"},
            {"role": "assistant", "content": "12"},
        ]
    }
    ids, mask = tokenize_example(record, tok)
    spans, start = [], 0
    for i in range(1, len(mask) + 1):  # runs of equal mask values
        if i == len(mask) or mask[i] != mask[start]:
            spans.append((int(mask[start]), tok.decode(ids[start:i])))
            start = i
    assert spans == [
        (0, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1 + 2?<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n"),
        (1, "1 + 2 = 3\n</think>\n3<|im_end|>"),
        (0, "\n<|im_start|>user\ntimes 4?<|im_end|>\n<|im_start|>assistant\n<think>\n"),
        (1, "\n</think>\n12<|im_end|>"),
    ]  # fmt: skip


# --- rows, masks, determinism ------------------------------------------------------------------


def test_one_epoch_holds_every_example_once_with_exact_masks(tok):
    cfg = dataclasses.replace(CFG, num_epochs=1)
    it = build_iterator(cfg, tok)
    docs = [d for batch in it for d in documents(batch, tok)]
    want = expected_docs(TASK.generate(cfg.seed, cfg.num_examples))
    assert sorted(p for p, _ in docs) == sorted(want)  # each example exactly once
    for p, c in docs:
        assert c == want[p]
    stats = it.stats
    assert stats["examples_read"] == cfg.num_examples
    assert stats["examples_truncated"] == stats["bad_records_skipped"] == 0
    assert stats["loss_tokens"] < stats["tokens"]


def test_packing_puts_several_documents_in_a_row_and_pack_false_one(tok):
    batch = next(build_iterator(CFG, tok))
    assert batch["segment_ids"].max(axis=1).min() >= 2
    batch = next(build_iterator(dataclasses.replace(CFG, pack=False), tok))
    assert (batch["segment_ids"].max(axis=1) == 1).all()
    docs = documents(batch, tok)
    want = expected_docs(TASK.generate(CFG.seed, CFG.num_examples))
    assert len(docs) == 4 and all(want[p] == c for p, c in docs)


def test_train_on_prompt_puts_every_next_token_of_a_document_in_the_loss(tok):
    """The same rows as the default, with the loss on every target that stays in its document:
    the whole hand-written ChatML text after the first token, prompt included."""
    cfg = dataclasses.replace(CFG, num_epochs=1, pack=False)
    want = expected_docs(TASK.generate(cfg.seed, cfg.num_examples))
    plain = next(build_iterator(cfg, tok))
    full = next(build_iterator(dataclasses.replace(cfg, train_on_prompt=True), tok))
    for k in ("inputs", "targets", "positions", "segment_ids"):
        np.testing.assert_array_equal(plain[k], full[k], err_msg=k)
    for r in range(cfg.global_batch):
        (where,) = np.nonzero(full["segment_ids"][r] > 0)
        # every position but the document's last predicts the next token of the same document
        assert (full["loss_mask"][r, where[:-1]] == 1).all()
        assert full["loss_mask"][r].sum() == len(where) - 1
        ids = full["inputs"][r, where]
        text = tok.decode(full["targets"][r, where[:-1]])
        prompt = tok.decode(ids[: len(ids) - int(plain["loss_mask"][r].sum())])
        assert tok.decode(ids[:1]) + text == prompt + want[prompt]
        assert plain["loss_mask"][r].sum() < full["loss_mask"][r].sum()


def test_thinking_false_renders_an_empty_think_block(tok):
    cfg = dataclasses.replace(CFG, thinking=False)
    want = expected_docs(TASK.generate(cfg.seed, cfg.num_examples), thinking=False)
    for p, c in documents(next(build_iterator(cfg, tok)), tok):
        assert want[p] == c


def test_too_long_examples_are_truncated_and_counted(tok):
    cfg = dataclasses.replace(CFG, seq_len=100)  # every example is ~150 tokens
    it = build_iterator(cfg, tok)
    batch = next(it)
    assert (batch["segment_ids"] == 1).all()  # one truncated document fills each row
    documents(batch, tok)
    assert it.stats["examples_truncated"] == it.stats["examples_read"] == 4


def test_deterministic_for_a_seed(tok):
    a = take(build_iterator(CFG, tok), 4)
    assert_batches_equal(a, take(build_iterator(CFG, tok), 4))
    b = take(build_iterator(dataclasses.replace(CFG, seed=8), tok), 4)
    assert not np.array_equal(a[0]["inputs"], b[0]["inputs"])


def test_epochs_are_reshuffled(tok):
    cfg = dataclasses.replace(CFG, num_examples=8, pack=False, global_batch=8)
    it = build_iterator(cfg, tok)
    first, second = [[p for p, _ in documents(next(it), tok)] for _ in range(2)]
    assert sorted(first) == sorted(second) and first != second


# --- resume and sharding -----------------------------------------------------------------------


def test_get_state_set_state_resumes_exactly(tok):
    it = build_iterator(CFG, tok)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # JSON-serializable, as checkpoints store it
    stats = it.stats
    after = take(it, 5)
    it.set_state(state)
    assert_batches_equal(after, take(it, 5))
    fresh = build_iterator(CFG, tok)
    fresh.set_state(state)
    assert fresh.stats == stats
    assert_batches_equal(after, take(fresh, 5))


def test_resume_at_every_step_of_a_finite_epoch(tok):
    cfg = dataclasses.replace(CFG, num_epochs=1)
    it = build_iterator(cfg, tok)
    states, batches = [], []
    for batch in it:
        batches.append(batch)
        states.append(it.get_state())
    for k, state in enumerate(states):
        fresh = build_iterator(cfg, tok)
        fresh.set_state(json.loads(json.dumps(state)))
        assert_batches_equal(batches[k + 1 :], list(fresh))
        assert fresh.stats == it.stats


def test_state_from_another_layout_is_refused(tok):
    state = build_iterator(CFG, tok).get_state()
    other = build_iterator(CFG, tok, process_index=1, process_count=2)
    with pytest.raises(ValueError, match="process_count"):
        other.set_state(state)


def test_process_shards_concatenate_to_the_single_process_batch(tok):
    single = take(build_iterator(CFG, tok), 4)
    shards = [take(build_iterator(CFG, tok, process_index=p, process_count=2), 4) for p in (0, 1)]
    for step, whole in enumerate(single):
        assert shards[0][step]["inputs"].shape == (2, CFG.seq_len)
        joined = {k: np.concatenate([s[step][k] for s in shards]) for k in whole}
        assert_batches_equal([whole], [joined])


def test_global_batch_must_divide_by_process_count(tok):
    with pytest.raises(ValueError, match="global_batch=4.*process_count=3"):
        build_iterator(CFG, tok, process_index=0, process_count=3)


def test_worker_process_gives_the_same_batches_and_state(tok):
    cfg = dataclasses.replace(CFG, worker_count=1)
    ref = take(build_iterator(CFG, tok), 5)
    with build_iterator(cfg, tok) as it:
        got = take(it, 2)
        state = json.loads(json.dumps(it.get_state()))
        got += take(it, 3)
    assert_batches_equal(ref, got)
    with build_iterator(cfg, tok) as it:
        it.set_state(state)
        assert_batches_equal(ref[2:], take(it, 3))


# --- splits ------------------------------------------------------------------------------------


def test_eval_split_is_a_different_stream(tok):
    evals = eval_examples(CFG, 6)
    assert len(evals) == 6 and evals == eval_examples(CFG, 6)
    train = list(TASK.generate(CFG.seed, CFG.num_examples))
    assert not {e.prompt for e in evals} & {e.prompt for e in train}
    assert all(TASK.score(TASK.reference_completion(e), e.answer) == 1.0 for e in evals)
    cfg = dataclasses.replace(CFG, num_eval_examples=6)
    docs = [d for b in build_iterator(cfg, tok, split="eval") for d in documents(b, tok)]
    want = expected_docs(evals)
    assert sorted(p for p, _ in docs) == sorted(want)  # one pass, every eval example once
    assert all(want[p] == c for p, c in docs)


# --- file sources ------------------------------------------------------------------------------


def math_rows(n, seed=3):
    return [
        {"problem": ex.prompt, "solution": ex.reasoning, "answer": ex.answer, "id": ex.id}
        for ex in TASK.generate(seed, n)
    ]


def write_jsonl(path, rows, extra_lines=()):
    lines = [json.dumps(r) for r in rows]
    for lineno, text in extra_lines:  # 1-based line numbers in the final file
        lines.insert(lineno - 1, text)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_jsonl_and_parquet_sources_give_the_same_exact_rows(tok, tmp_path):
    rows = math_rows(20)
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    cfg = dataclasses.replace(CFG, source="jsonl", paths=(jsonl,), num_epochs=1)
    from_jsonl = list(build_iterator(cfg, tok))
    want = expected_docs(TASK.generate(3, 20))
    docs = [d for b in from_jsonl for d in documents(b, tok)]
    assert sorted(p for p, _ in docs) == sorted(want)
    assert all(want[p] == c for p, c in docs)
    cfg = dataclasses.replace(cfg, source="parquet", paths=(str(tmp_path / "*.parquet"),))
    assert_batches_equal(from_jsonl, list(build_iterator(cfg, tok)))


def test_file_eval_split_reads_eval_paths(tok, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", math_rows(8))
    held_out = write_jsonl(tmp_path / "eval.jsonl", math_rows(5, seed=4))
    cfg = dataclasses.replace(CFG, source="jsonl", paths=(train,), eval_paths=(held_out,))
    evals = eval_examples(cfg, 10)  # only 5 there
    assert [(e.prompt, e.reasoning, e.answer) for e in evals] == [
        (e.prompt, e.reasoning, e.answer) for e in TASK.generate(4, 5)
    ]
    docs = [d for b in build_iterator(cfg, tok, split="eval") for d in documents(b, tok)]
    assert sorted(p for p, _ in docs) == sorted(expected_docs(evals))
    with pytest.raises(ValueError, match="eval_paths"):
        eval_examples(dataclasses.replace(cfg, eval_paths=()), 3)


def test_malformed_jsonl_names_file_and_line_or_is_counted(tok, tmp_path):
    bad = [(3, "{not json"), (6, json.dumps({"problem": "no answer here"}))]
    path = write_jsonl(tmp_path / "bad.jsonl", math_rows(8), bad)
    cfg = dataclasses.replace(CFG, source="jsonl", paths=(path,), num_epochs=1)
    with pytest.raises(RecordError, match=rf"{path}:3: invalid JSON"):
        build_iterator(cfg, tok)
    it = build_iterator(dataclasses.replace(cfg, skip_bad_records=True), tok)
    docs = [d for b in it for d in documents(b, tok)]
    assert sorted(p for p, _ in docs) == sorted(expected_docs(TASK.generate(3, 8)))
    assert it.stats["bad_records_skipped"] == 2 and it.stats["examples_read"] == 8
    with pytest.raises(FileNotFoundError, match="paths"):
        build_iterator(dataclasses.replace(cfg, paths=(str(tmp_path / "nope*.jsonl"),)), tok)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="seq_len"):
        DataConfig(seq_len=1)
    with pytest.raises(ValueError, match="paths"):
        DataConfig(source="jsonl")
    with pytest.raises(ValueError, match="bogus"):
        DataConfig(task_knobs={"bogus": 1})


# --- prepare_data round trip -------------------------------------------------------------------


def test_prepare_data_round_trip(tok, tmp_path):
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    from array_record.python.array_record_module import ArrayRecordWriter

    spec = importlib.util.spec_from_file_location("prepare_data", REPO / "tools/prepare_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    main, prepare = tool.main, tool.prepare

    jsonl = write_jsonl(tmp_path / "in.jsonl", math_rows(21), [(5, "[1, 2]")])
    with pytest.raises(SystemExit, match=rf"{jsonl}:5"):
        main(["--input", jsonl, "--tokenizer", str(tok.path), "--out", str(tmp_path / "x")])
    out = tmp_path / "prepared"
    meta = prepare([jsonl], str(tok.path), str(out), shards=3, skip_bad_records=True)
    assert meta["num_records"] == 21 and meta["bad_records_skipped"] == 1
    shards = sorted(str(p) for p in out.glob("*.array_record"))
    assert len(shards) == 3

    # Token streams: the shards, in order, hold exactly tokenize_example of each JSONL record.
    cfg = dataclasses.replace(CFG, source="jsonl", paths=(jsonl,), skip_bad_records=True)
    records, _ = pipeline.read_records([jsonl], cfg)
    source = ArrayRecordDataSource(shards)
    assert len(source) == len(records)
    for i, record in enumerate(records):
        ids, mask, rid = pipeline.decode_tokenized(source[i])
        want_ids, want_mask = tokenize_example(record, tok)
        assert rid == record["id"]
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(mask, want_mask)

    # And the pipeline packs them into the same batches as the JSONL source.
    cfg = dataclasses.replace(cfg, num_epochs=2)
    prepared = dataclasses.replace(cfg, source="arrayrecord", paths=(str(out / "*.array_record"),))
    assert_batches_equal(list(build_iterator(cfg, tok)), list(build_iterator(prepared, tok)))

    with pytest.raises(ValueError, match="thinking"):
        build_iterator(dataclasses.replace(prepared, thinking=False), tok)
    junk = str(tmp_path / "junk.array_record")
    writer = ArrayRecordWriter(junk, "group_size:1")
    writer.write(b"not a tokenized record")
    writer.close()
    with pytest.raises(RecordError, match=rf"{junk}: record 0: .*magic"):
        build_iterator(dataclasses.replace(prepared, paths=(junk,)), tok)
