r"""The SFT data pipeline on grain: source -> tokenize -> pack -> batch -> shard, with resumable state.

    it = build_iterator(cfg, tokenizer, process_index=jax.process_index(),
                        process_count=jax.process_count())
    batch = next(it)        # inputs, targets, loss_mask, positions, segment_ids: (b, T) numpy
    state = it.get_state()  # JSON-serializable; it.set_state(state) resumes exactly

Sources. `source="task"` generates examples from `jreason.data.tasks` (example i of an epoch is
`task.generate(seed, ...)`'s i-th); `"jsonl"` / `"parquet"` read math-style records (the fields of
`load_math_records`) or OpenAI-style `messages` records; `"arrayrecord"` reads files written by
`tools/prepare_data.py`, already tokenized. JSONL and Parquet files are read and validated
eagerly when the iterator is built, so a malformed record fails at start-up with its file and
line (or row), never hours into a run; with `skip_bad_records` it is counted and skipped
instead. Use ArrayRecord for datasets too big to hold in host memory.

Tokenization (`tokenize_example`). A record is rendered with the tokenizer's chat template. The
prompt (everything the template puts before an assistant turn, generation prompt included) is
tokenized on its own, exactly as it will be at inference, and masked out of the loss; each
assistant turn (reasoning, `</think>`, answer, end-of-turn token) is tokenized after it and is in
the loss. Text after an assistant turn's last stop token (ChatML's `\n`) is not trained on.

Packing and rows. Each global batch of B = `global_batch` rows is B independent row streams:
stream r reads examples r, r+B, r+2B, ... of the (shuffled, repeated) example order and packs
them with grain's `FirstFitPackIterDataset` (`packing_bins` bins at a time). Process p of P
builds only streams p*b .. p*b+b-1 (b = B/P), so the processes' local batches, concatenated in
process order, are exactly the global batch one process would produce, and no process
tokenizes another's examples. Row layout (T = seq_len):

    inputs[t]      token t of the row (pad id in padding)
    targets[t]     inputs[t+1] if it belongs to the same document, else pad id
    loss_mask[t]   1.0 iff targets[t] is a completion token of the same document
    positions[t]   position within its document (0 at each document start)
    segment_ids[t] 1, 2, ... per document in the row; 0 is padding

so a document's last token never predicts the next document, and attention must be restricted
to equal segment_ids (the model's `segment_ids_bt`).

Too-long examples are truncated (policy): a document longer than T keeps its first T tokens
(the prompt first, so the cut falls in the completion and its end-of-turn token is lost) and is
counted in `stats["examples_truncated"]`; keep that count near zero by raising seq_len.

State. `DataIterator.get_state()` is grain's iterator state (the packer records the input
position of its current bin batch and how many rows it already emitted; restoring re-packs from
there) plus the stats counters. It is per process and refuses to load into an iterator of a
different process layout, global_batch or worker_count.

Epochs. `num_epochs=None` repeats forever (each epoch reshuffled); that is what training with a
step budget wants. With a finite num_epochs each stream stops when its examples run out and is
padded with empty rows until the last of this process's streams ends; as packing is
data-dependent, processes can then end a step or two apart, so multi-host loops should stop on
a step count, not on StopIteration.

Left out: mixing several datasets, curriculum/length bucketing, and on-the-fly deduplication.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import struct
from collections.abc import Iterator, Sequence
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import grain
import numpy as np

from jreason.data.tasks import Example, get_task
from jreason.data.verify import RecordError, _to_example

log = logging.getLogger(__name__)

Source = Literal["task", "jsonl", "parquet", "arrayrecord"]
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
ARRAYRECORD_SUFFIXES = (".array_record", ".arrayrecord")
_SUFFIXES = {"jsonl": JSONL_SUFFIXES, "parquet": PARQUET_SUFFIXES}
_SUFFIXES["arrayrecord"] = ARRAYRECORD_SUFFIXES
# Eval problems of a task come from default_rng([seed, i, EVAL_STREAM]); training uses
# default_rng([seed, i]) (Task.generate), a different random stream for every seed.
EVAL_STREAM = 1
STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: Source = "task"
    task: str = "arithmetic"  # source=task: a name from jreason.data.tasks
    task_knobs: dict[str, Any] = field(default_factory=dict)
    num_examples: int = 100_000  # source=task: size of one epoch of generated examples
    num_eval_examples: int = 1_000  # source=task: size of the held-out split
    paths: tuple[str, ...] = ()  # files (globs allowed) for jsonl / parquet / arrayrecord
    # split="eval" / eval_examples for file sources: .jsonl / .parquet (/ .array_record) files.
    eval_paths: tuple[str, ...] = ()
    seq_len: int = 256  # row length T
    global_batch: int = 16  # rows per step summed over all processes
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None = repeat forever
    pack: bool = True  # pack several examples per row (segment_ids/positions)
    packing_bins: int = 4  # rows each stream fills at once: more = fuller rows, more buffering
    thinking: bool = True  # render the reasoning inside <think>...</think>
    # Loss on the prompt tokens too, not only the assistant turns (TRL's completion_only_loss=
    # False, LLaMA-Factory's train_on_prompt): from scratch on a procedural task, predicting the
    # prompt teaches attention its structure long before the few answer tokens do.
    train_on_prompt: bool = False
    skip_bad_records: bool = False  # count and skip malformed records instead of raising
    worker_count: int = 0  # grain worker processes (0 = in-process)
    # Record fields for jsonl / parquet, each tried in order (see verify.load_math_records).
    prompt_fields: tuple[str, ...] = ("problem", "question", "prompt")
    answer_fields: tuple[str, ...] = ("answer",)
    solution_fields: tuple[str, ...] = ("solution", "reasoning")
    id_fields: tuple[str, ...] = ("id", "unique_id")
    messages_field: str = "messages"  # a record with this field is an OpenAI-style chat

    def __post_init__(self):
        def bad(name: str, allowed: str):
            value = getattr(self, name)
            raise ValueError(f"DataConfig.{name} must be {allowed}, got {value!r}")

        if self.source not in ("task", "jsonl", "parquet", "arrayrecord"):
            bad("source", "one of ['task', 'jsonl', 'parquet', 'arrayrecord']")
        for name, lo in (("num_examples", 1), ("num_eval_examples", 1), ("seq_len", 2)):
            if _not_int(getattr(self, name)) or getattr(self, name) < lo:
                bad(name, f"an integer >= {lo}")
        for name, lo in (("global_batch", 1), ("packing_bins", 1), ("worker_count", 0)):
            if _not_int(getattr(self, name)) or getattr(self, name) < lo:
                bad(name, f"an integer >= {lo}")
        if _not_int(self.seed) or not 0 <= self.seed < 2**32:
            bad("seed", "an integer in [0, 2**32)")
        if self.num_epochs is not None and (_not_int(self.num_epochs) or self.num_epochs < 1):
            bad("num_epochs", "null (forever) or an integer >= 1")
        if self.source != "task" and not self.paths:
            bad("paths", f"a non-empty list of files for source={self.source!r}")
        if self.source == "task":
            get_task(self.task, **self.task_knobs)  # raises naming the task or the knob


def _not_int(x: Any) -> bool:
    return isinstance(x, bool) or not isinstance(x, int)


# --- reading records -------------------------------------------------------------------------


def expand_paths(patterns: Sequence[str], key: str = "paths") -> list[str]:
    """Each pattern's glob matches, sorted, in pattern order; a pattern matching nothing is an
    error naming `key` (a typo in a path should not silently train on less data)."""
    out = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(pattern))) if glob.has_magic(str(pattern)) else [pattern]
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise FileNotFoundError(f"DataConfig.{key}: {pattern!r} matches no file")
        out.extend(matches)
    return out


def _kind(path: str) -> str:
    suffix = Path(path).suffix.lower()
    for kind, suffixes in _SUFFIXES.items():
        if suffix in suffixes:
            return kind
    allowed = [*JSONL_SUFFIXES, *PARQUET_SUFFIXES, *ARRAYRECORD_SUFFIXES]
    raise ValueError(f"{path}: unsupported file type {suffix!r}; allowed: {allowed}")


def _raw_records(path: str) -> Iterator[tuple[str, Any]]:
    """(where, record) for every record of a JSONL or Parquet file; a JSONL line that is not
    JSON comes back as a RecordError in place of the record."""
    if _kind(path) == "jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, RecordError(f"{where}: invalid JSON: {e}")
    else:
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches():
            for record in batch.to_pylist():
                yield f"{path}: row {row}", record
                row += 1


def _check_messages(messages: Any, where: str, name: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"{where}: field {name!r} must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RecordError(f"{where}: {name}[{i}] must be an object with a string 'role'")
        if not isinstance(m.get("content"), str):
            raise RecordError(f"{where}: {name}[{i}] needs a string 'content'")
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise RecordError(f"{where}: {name} has no assistant message to train on")
    if roles[0] == "assistant":
        raise RecordError(f"{where}: {name} starts with an assistant message (no prompt)")
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def to_record(raw: Any, where: str, index: int, stem: str, cfg: DataConfig) -> dict[str, Any]:
    """One raw JSONL/Parquet record as a `tokenize_example` input, or RecordError (names `where`).

    A record with `cfg.messages_field` becomes {"id", "messages"}; any other goes through the
    `load_math_records` rules and becomes {"id", "prompt", "reasoning", "answer"}.
    """
    if isinstance(raw, RecordError):
        raise raw
    if isinstance(raw, dict) and raw.get(cfg.messages_field) is not None:
        messages = _check_messages(raw[cfg.messages_field], where, cfg.messages_field)
        rid = next((raw[k] for k in cfg.id_fields if raw.get(k) is not None), f"{stem}-{index}")
        return {"id": str(rid), "messages": messages, "where": where}
    fields = (cfg.prompt_fields, cfg.answer_fields, cfg.solution_fields, cfg.id_fields)
    ex = _to_example(raw, index, where, stem, *fields)
    return {**ex.to_dict(), "where": where}


def read_records(paths: Sequence[str], cfg: DataConfig) -> tuple[list[dict[str, Any]], int]:
    """All records of JSONL / Parquet `paths`, validated; returns (records, bad records skipped).

    A bad record raises RecordError naming its file and line (row for Parquet) unless
    `cfg.skip_bad_records`, in which case it is counted and the first one is logged.
    """
    records, bad, first_error = [], 0, None
    for path in paths:
        if _kind(path) not in ("jsonl", "parquet"):
            raise ValueError(f"{path}: expected a .jsonl or .parquet file here")
        for index, (where, raw) in enumerate(_raw_records(path)):
            try:
                records.append(to_record(raw, where, index, Path(path).stem, cfg))
            except RecordError as e:
                if not cfg.skip_bad_records:
                    raise
                bad += 1
                first_error = first_error or str(e)
    if bad:
        log.warning("skipped %d malformed records (skip_bad_records); first: %s", bad, first_error)
    if not records:
        raise RecordError(f"no valid records in {list(paths)} ({bad} malformed)")
    return records, bad


# --- tokenization ----------------------------------------------------------------------------


def _as_messages(example: Example | dict[str, Any], thinking: bool) -> list[dict[str, Any]]:
    if isinstance(example, Example):
        example = example.to_dict()
    if example.get("messages") is not None:
        messages = [dict(m) for m in example["messages"]]
    else:
        answer = example["answer"]
        messages = [
            {"role": "user", "content": example["prompt"]},
            {"role": "assistant", "content": f"\\boxed{{{answer}}}"},
        ]
        messages[1]["reasoning"] = example.get("reasoning") or ""
    for m in messages:
        if m["role"] != "assistant":
            continue
        reasoning = next(
            (m.pop(k) for k in ("reasoning", "reasoning_content", "thinking") if k in m), ""
        )
        # Always give the template a (maybe empty) think block: the generation prompt opens one
        # (thinking) or holds an empty one (not thinking), and the turn must continue it.
        m["reasoning"] = reasoning if thinking else ""
    return messages


def tokenize_example(
    example: Example | dict[str, Any], tokenizer, *, thinking: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(token ids int32, loss mask int32 0/1) for one chat example.

    `example` is an `Example` (its `answer` goes in `\\boxed{}` after the reasoning), a dict with
    the same keys, or a dict with `messages` (OpenAI style; every assistant turn is trained on,
    everything else masked). Each prompt part is rendered by the chat template with
    `add_generation_prompt` and tokenized on its own, as at inference; each assistant turn is
    the template's continuation of it, trained on up to its last stop token (eos is appended if
    the turn has none and it is the last). Every assistant turn gets a think block (empty
    without reasoning, or with thinking=False) because the generation prompt opens one; earlier
    turns keep theirs in the context of later ones. Raises ValueError if the template does not
    render an assistant turn as a continuation of the generation prompt (e.g. templates that
    drop earlier turns' reasoning, like Qwen3's, on multi-turn records).
    """
    messages = _as_messages(example, thinking)
    stops = tokenizer.stop_ids
    ids: list[int] = []
    mask: list[int] = []
    rendered = ""  # the text already tokenized
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns or turns[0] == 0:
        raise ValueError("an example needs a prompt message followed by an assistant message")
    for k in turns:
        prompt = tokenizer.apply_chat_template(
            messages[:k], add_generation_prompt=True, enable_thinking=thinking
        )
        full = tokenizer.apply_chat_template(
            messages[: k + 1], add_generation_prompt=False, enable_thinking=thinking
        )
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise ValueError(
                f"the chat template does not render assistant message {k} as a continuation "
                f"of the generation prompt (thinking={thinking}), so its tokens cannot be "
                f"separated from the prompt's; prompt ends {prompt[-60:]!r}, turn starts "
                f"{full[len(rendered) :][:80]!r}"
            )
        context = tokenizer.encode(prompt[len(rendered) :])
        reply = tokenizer.encode(full[len(prompt) :])
        ends = [i + 1 for i, t in enumerate(reply) if t in stops]
        cut = ends[-1] if ends else len(reply)
        train, rest = reply[:cut], reply[cut:]
        if not ends and k == turns[-1] and tokenizer.eos_id is not None:
            train = [*train, tokenizer.eos_id]  # a template with no end-of-turn token
        ids += context + train + rest
        mask += [0] * len(context) + [1] * len(train) + [0] * len(rest)
        rendered = full
    if 1 not in mask:
        raise ValueError("the assistant turns render to no tokens: nothing to train on")
    # Tokens after the last trained one would never be a target: don't spend row slots on them.
    end = len(mask) - mask[::-1].index(1)
    return np.asarray(ids[:end], np.int32), np.asarray(mask[:end], np.int32)


# --- the pre-tokenized record layout (tools/prepare_data.py writes it, source=arrayrecord reads)

# One ArrayRecord record per example, little-endian:
#   b"JRT1" | uint32 n | int32 ids[n] | uint8 loss_mask[n] | UTF-8 example id (rest of the record)
# Raw numpy bytes rather than msgpack/JSON: decoding is two np.frombuffer calls.
_MAGIC = b"JRT1"
META_FILE = "meta.json"  # beside the shards: tokenizer fingerprint, thinking flag, counts


def encode_tokenized(ids: np.ndarray, mask: np.ndarray, example_id: str = "") -> bytes:
    ids = np.asarray(ids, "<i4")
    mask = np.asarray(mask, np.uint8)
    if ids.ndim != 1 or ids.shape != mask.shape:
        raise ValueError(f"ids and mask must be 1-D of one length, got {ids.shape}, {mask.shape}")
    return b"".join(
        (_MAGIC, struct.pack("<I", len(ids)), ids.tobytes(), mask.tobytes(), example_id.encode())
    )


def decode_tokenized(data: bytes, where: str = "record") -> tuple[np.ndarray, np.ndarray, str]:
    """(ids int32, loss mask int32, example id) of one pre-tokenized record; RecordError naming
    `where` if it is not one."""
    if len(data) < 8 or data[:4] != _MAGIC:
        raise RecordError(f"{where}: not a jreason pre-tokenized record (bad magic)")
    (n,) = struct.unpack_from("<I", data, 4)
    if len(data) < 8 + 5 * n:
        raise RecordError(f"{where}: truncated record ({len(data)} bytes for {n} tokens)")
    ids = np.frombuffer(data, "<i4", n, 8).astype(np.int32)
    mask = np.frombuffer(data, np.uint8, n, 8 + 4 * n).astype(np.int32)
    try:
        example_id = data[8 + 5 * n :].decode()
    except UnicodeDecodeError:
        raise RecordError(f"{where}: example id is not UTF-8") from None
    return ids, mask, example_id


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what a tokenizer does to chat text: equal fingerprints, interchangeable ids."""
    probe = (
        "<|im_start|>user\nWhat is 12*34? ünï ∑ 🙂<|im_end|>\n<think>\nok\n</think>\n\\boxed{408}"
    )
    sig = [tokenizer.vocab_size, tokenizer.encode(probe), tokenizer.chat_template]
    sig += [tokenizer.eos_id, sorted(tokenizer.stop_ids)]
    return hashlib.sha256(json.dumps(sig).encode()).hexdigest()[:16]


def _check_prepared(paths: Sequence[str], tokenizer, cfg: DataConfig) -> None:
    """Refuses shards prepared with another tokenizer or thinking setting (meta.json beside)."""
    for folder in sorted({str(Path(p).parent) for p in paths}):
        meta_path = Path(folder) / META_FILE
        if not meta_path.is_file():
            continue
        meta = json.loads(meta_path.read_text())
        if meta.get("tokenizer_fingerprint") != tokenizer_fingerprint(tokenizer):
            raise ValueError(
                f"{meta_path}: these records were tokenized with a different tokenizer "
                f"({meta.get('tokenizer')}); re-run tools/prepare_data.py with this one"
            )
        if meta.get("thinking") != cfg.thinking:
            raise ValueError(
                f"{meta_path}: prepared with thinking={meta.get('thinking')} but "
                f"DataConfig.thinking={cfg.thinking}; match them or re-run tools/prepare_data.py"
            )


# --- grain transforms (module-level classes so worker processes can unpickle them) -----------


def _fit(ids: np.ndarray, mask: np.ndarray, seq_len: int, all_tokens: bool) -> dict[str, Any]:
    truncated = len(ids) > seq_len
    if all_tokens:  # DataConfig.train_on_prompt
        mask = np.ones_like(mask)
    return {"ids": ids[:seq_len], "mask": mask[:seq_len], "truncated": int(truncated)}


class _Tokenize(grain.transforms.Map):
    def __init__(self, tokenizer, thinking: bool, seq_len: int, all_tokens: bool = False):
        self.tokenizer, self.thinking, self.seq_len = tokenizer, thinking, seq_len
        self.all_tokens = all_tokens

    def map(self, record: dict[str, Any]) -> dict[str, Any]:
        try:
            ids, mask = tokenize_example(record, self.tokenizer, thinking=self.thinking)
        except Exception as e:
            where = record.get("where", record.get("id", "?"))
            raise RecordError(f"{where}: cannot tokenize: {e}") from e
        return _fit(ids, mask, self.seq_len, self.all_tokens)


class _Decode(grain.transforms.MapWithIndex):
    def __init__(self, path: str, seq_len: int, all_tokens: bool = False):
        self.path, self.seq_len, self.all_tokens = path, seq_len, all_tokens

    def map_with_index(self, index: int, data: bytes) -> dict[str, Any]:
        ids, mask, _ = decode_tokenized(data, f"{self.path}: record {index}")
        return _fit(ids, mask, self.seq_len, self.all_tokens)


class _TaskRecords(Sequence):
    """Example i of a task's train stream (Task.generate) or eval stream, as a record dict."""

    def __init__(self, cfg: DataConfig, split: str):
        self.task = get_task(cfg.task, **cfg.task_knobs)
        self.seed, self.split = cfg.seed, split
        self.n = cfg.num_examples if split == "train" else cfg.num_eval_examples

    def __len__(self) -> int:
        return self.n

    def example(self, i: int) -> Example:
        if self.split == "train":
            return next(self.task.generate(self.seed, 1, start=i))
        prompt, reasoning, answer = self.task.sample(
            np.random.default_rng([self.seed, i, EVAL_STREAM])
        )
        return Example(f"{self.task.name}-{self.seed}-eval-{i}", prompt, reasoning, answer)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ex = self.example(int(i))
        # The box holds what a correct model writes (countdown: an expression, not the spec).
        return {**ex.to_dict(), "answer": self.task.final_answer(ex), "where": ex.id}


class _FinishRow(grain.transforms.Map):
    """A packed row -> inputs / targets / loss_mask / positions / segment_ids (see docstring)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def map(self, row: dict[str, Any]) -> dict[str, np.ndarray]:
        ids, seg = row["ids"], row["ids_segment_ids"]  # (T,)
        same = (seg[1:] == seg[:-1]) & (seg[:-1] > 0)  # (T-1,) t and t+1 in one document
        targets = np.full_like(ids, self.pad_id)
        targets[:-1] = np.where(same, ids[1:], self.pad_id)
        loss_mask = np.zeros(ids.shape, np.float32)
        loss_mask[:-1] = same & (row["mask"][1:] > 0)
        return {
            "inputs": ids,
            "targets": targets,
            "loss_mask": loss_mask,
            "positions": row["ids_positions"],
            "segment_ids": seg,
            "truncated": np.int32(sum(row["truncated"])),
        }


def _empty_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    zeros = np.zeros(seq_len, np.int32)
    return {
        "inputs": np.full(seq_len, pad_id, np.int32),
        "targets": np.full(seq_len, pad_id, np.int32),
        "loss_mask": np.zeros(seq_len, np.float32),
        "positions": zeros,
        "segment_ids": zeros,
        "truncated": np.int32(0),
    }


class _StackRows(grain.IterDataset):
    """One batch per step: the next row of every stream, stacked to (b, T).

    Like zip, but a finite stream that ends is padded with empty rows until all have ended, so
    a finite epoch is read to its last example.
    """

    def __init__(self, streams: Sequence[grain.IterDataset], seq_len: int, pad_id: int):
        super().__init__(list(streams))
        self.seq_len, self.pad_id = seq_len, pad_id

    def __iter__(self) -> _StackRowsIterator:
        return _StackRowsIterator([s.__iter__() for s in self.parents], self.seq_len, self.pad_id)

    def __str__(self) -> str:
        return f"_StackRows({len(self.parents)} streams)"


class _StackRowsIterator(grain.DatasetIterator):
    def __init__(self, parents, seq_len: int, pad_id: int):
        super().__init__(parents)
        self._done = [False] * len(parents)
        self._empty = _empty_row(seq_len, pad_id)

    def __next__(self) -> dict[str, np.ndarray]:
        rows = []
        for i, it in enumerate(self._parents):
            if not self._done[i]:
                try:
                    rows.append(next(it))
                    continue
                except StopIteration:
                    self._done[i] = True
            rows.append(self._empty)
        if all(self._done):
            raise StopIteration
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}  # (b, T) / (b,)

    def get_state(self) -> dict[str, Any]:
        return {"streams": [it.get_state() for it in self._parents], "done": list(self._done)}

    def set_state(self, state: dict[str, Any]) -> None:
        for it, s in zip(self._parents, state["streams"], strict=True):
            it.set_state(s)
        self._done = [bool(d) for d in state["done"]]


# --- the pipeline ----------------------------------------------------------------------------


def _examples_dataset(cfg: DataConfig, tokenizer, split: str) -> tuple[grain.MapDataset, int, str]:
    """(tokenized examples in epoch order, bad records skipped, description) before shuffling."""
    tokenize = _Tokenize(tokenizer, cfg.thinking, cfg.seq_len, cfg.train_on_prompt)
    if cfg.source == "task":
        records = _TaskRecords(cfg, split)
        tokenize.map(records[0])  # fail now, not in a worker, if the template cannot do it
        return grain.MapDataset.source(records).map(tokenize), 0, f"task {cfg.task} ({split})"
    key = "paths" if split == "train" else "eval_paths"
    patterns = cfg.paths if split == "train" else cfg.eval_paths
    if not patterns:
        raise ValueError(f"DataConfig.eval_paths is empty; split='eval' needs it for {cfg.source}")
    paths = expand_paths(patterns, key)
    kinds = {_kind(p) for p in paths}
    if split == "train" and kinds != {cfg.source}:
        raise ValueError(f"DataConfig.paths: source={cfg.source!r} but got {sorted(kinds)} files")
    if kinds == {"arrayrecord"}:
        _check_prepared(paths, tokenizer, cfg)
        parts = [
            grain.MapDataset.source(grain.sources.ArrayRecordDataSource([p])).map_with_index(
                _Decode(p, cfg.seq_len, cfg.train_on_prompt)
            )
            for p in paths
        ]
        ds = parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
        if len(ds) == 0:
            raise ValueError(f"DataConfig.{key}: {paths} hold no records")
        ds[0]  # fail now on a file that is not ours
        return ds, 0, f"{len(paths)} arrayrecord files"
    if "arrayrecord" in kinds:
        raise ValueError(f"DataConfig.{key}: do not mix .array_record with other files")
    records, bad = read_records(paths, cfg)
    tokenize.map(records[0])
    return grain.MapDataset.source(records).map(tokenize), bad, f"{len(paths)} files"


def build_iterator(
    cfg: DataConfig,
    tokenizer,
    *,
    process_index: int = 0,
    process_count: int = 1,
    split: str = "train",
) -> DataIterator:
    """This process's iterator over `cfg`'s batches (see the module docstring for the layout).

    split="eval" reads the held-out data (a task's eval stream, or `eval_paths`) once, in
    order: no shuffle, one epoch, whatever `cfg.shuffle` / `cfg.num_epochs` say.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
    if cfg.global_batch % process_count:
        raise ValueError(
            f"DataConfig.global_batch={cfg.global_batch} is not divisible by "
            f"process_count={process_count}"
        )
    shuffle = cfg.shuffle and split == "train"
    num_epochs = cfg.num_epochs if split == "train" else 1
    big, local = cfg.global_batch, cfg.global_batch // process_count
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    examples, bad, what = _examples_dataset(cfg, tokenizer, split)
    if shuffle:
        examples = examples.shuffle(seed=cfg.seed)  # a new permutation every epoch
    examples = examples.repeat(num_epochs)

    # No reader threads: examples are in memory or one local read away, and tokenizing is
    # Python that threads would only serialize on the GIL. worker_count is the parallelism.
    read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    streams = []
    for r in range(process_index * local, (process_index + 1) * local):
        stream = examples.slice(slice(r, None, big)).to_iter_dataset(read)
        stream = grain.experimental.FirstFitPackIterDataset(
            stream,
            length_struct={"ids": cfg.seq_len, "mask": cfg.seq_len},
            num_packing_bins=cfg.packing_bins if cfg.pack else 1,
            max_sequences_per_bin=None if cfg.pack else 1,
            shuffle_bins=False,  # rows leave in bin order: nothing random to reproduce
            meta_features=("mask", "truncated"),
            padding_struct={"ids": pad_id, "mask": 0},
        )
        streams.append(stream.map(_FinishRow(pad_id)))
    ds = _StackRows(streams, cfg.seq_len, pad_id)
    if cfg.worker_count:
        from absl import flags

        # grain's workers read absl flags; a program that never parsed them would crash there.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        # With one worker the whole pipeline runs there unchanged; with more, each worker takes
        # a slice of every stream (deterministic, but batches depend on worker_count).
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=cfg.worker_count, per_worker_buffer_size=2)
        )
    layout = {
        "process_index": process_index,
        "process_count": process_count,
        "global_batch": big,
        "worker_count": cfg.worker_count,
        "split": split,
    }
    msg = "data: %s, %d of %d rows per step on process %d, seq_len %d, pack=%s"
    log.info(msg, what, local, big, process_index, cfg.seq_len, cfg.pack)
    return DataIterator(ds, layout, bad)


class DataIterator:
    """Batches of numpy arrays (see the module docstring), with exact get_state / set_state.

    `stats` counts what this process has consumed: examples_read (documents in emitted rows),
    examples_truncated (cut to seq_len), bad_records_skipped (at load), batches, tokens
    (non-padding), loss_tokens. The counters are part of the state, so they survive a resume.
    """

    def __init__(self, dataset: grain.IterDataset, layout: dict[str, Any], bad_records: int):
        self._dataset = dataset
        self._it = dataset.__iter__()
        self._layout = layout
        self._bad = bad_records
        self._counts = dict.fromkeys(
            ("examples_read", "examples_truncated", "batches", "tokens", "loss_tokens"), 0
        )

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self._it))
        truncated = batch.pop("truncated")  # (b,)
        seg = batch["segment_ids"]
        c = self._counts
        c["examples_read"] += int(seg.max(axis=1).sum())
        c["examples_truncated"] += int(truncated.sum())
        c["batches"] += 1
        c["tokens"] += int((seg > 0).sum())
        c["loss_tokens"] += int(batch["loss_mask"].sum())
        return batch

    @property
    def stats(self) -> dict[str, int]:
        return {**self._counts, "bad_records_skipped": self._bad}

    def get_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "layout": dict(self._layout),
            "grain": self._it.get_state(),
            "stats": dict(self._counts),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')} is not ours")
        if state["layout"] != self._layout:
            diff = {
                k: (state["layout"].get(k), v)
                for k, v in self._layout.items()
                if state["layout"].get(k) != v
            }
            raise ValueError(
                f"data iterator state was saved with a different layout (saved, now): {diff}; "
                "it can only resume with the same processes, global_batch and worker_count"
            )
        self._it.set_state(state["grain"])
        self._counts.update({k: int(v) for k, v in state["stats"].items()})

    def close(self) -> None:
        """Stops grain worker processes, if any (also done when garbage collected)."""
        self._it.close()

    def __enter__(self) -> DataIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def eval_examples(cfg: DataConfig, n: int) -> list[Example]:
    """The first `n` held-out examples (fewer if the eval files hold fewer), for generation.

    For a task, the eval stream is a different random stream from training's, so problems
    coincide only by chance (likely for tiny knob ranges). `answer` is the gold answer that
    `Task.score` / `score_math` check against. File sources read `eval_paths` (.jsonl/.parquet).
    """
    if cfg.source == "task":
        records = _TaskRecords(cfg, "eval")
        return [records.example(i) for i in range(n)]
    if not cfg.eval_paths:
        raise ValueError(f"DataConfig.eval_paths is empty; eval_examples needs it for {cfg.source}")
    records, _ = read_records(expand_paths(cfg.eval_paths, "eval_paths"), cfg)
    out = []
    for r in records[:n]:
        if "messages" in r:
            raise ValueError(f"{r['where']}: eval needs problem/answer records, not messages")
        out.append(Example(r["id"], r["prompt"], r["reasoning"], r["answer"]))
    return out


__all__ = [
    "DataConfig",
    "DataIterator",
    "build_iterator",
    "decode_tokenized",
    "encode_tokenized",
    "eval_examples",
    "read_records",
    "tokenize_example",
    "tokenizer_fingerprint",
]
