"""SFT rows on Markovian (Delethink) contexts: a warm start for chunked thinking.

    python tools/markovian_sft_data.py --tokenizer RUN/export-hf --task arithmetic \
        --knob num_operands=6 --knob max_value=9 --knob 'ops=[+, -]' --knob instructions=false \
        --num 4000 --chunk-size 32 --carryover 16 --out DIR

A model fine-tuned on whole traces has only ever seen a trace's first line right after the
query. Under chunked decoding (decode/markovian.py) every reset puts the carried tail of the
trace there instead, so it restarts or invents steps. This writes, for each task example, the
rows that chunked decoding of its reference trace would train on: for every reset point
p = C, C + (C - m), C + 2(C - m), ... inside the trace (at most max_chunks - 1 of them), the
context `reset_context(query, trace[:p])` (the query + the first keep_head and last
m - keep_head trace tokens; no loss) followed by the next C - m trace tokens (the loss). The
reset points are exactly where the engine resets a greedy trace of the reference's length, and
the rows are built on token ids (the carried tail can start in the middle of a word, which a
text record could not reproduce), so they go into pre-tokenized ArrayRecord shards
(`data.source: arrayrecord`), with the tokenizer fingerprint in meta.json as
tools/prepare_data.py writes it. A fraction `--full-fraction` of the examples also gives its
ordinary whole-trace row (the first chunk's context is a prefix of it), so the mix keeps the
full-context skill.

Example i of the task stream is `Task.generate(seed, ...)`'s i-th; pick a seed other than the
SFT and RL runs' if the problems should differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jreason import config as config_lib
from jreason.data import pipeline
from jreason.data.tasks import get_task
from jreason.decode.markovian import MarkovianConfig, reset_context


def chunk_rows(
    query: Sequence[int], trace: Sequence[int], cfg: MarkovianConfig
) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) of every chunk after the first that chunked decoding of `trace` runs.

    Chunk 1 is the query + trace[:C] (a prefix of the whole-trace row). A reset after p trace
    tokens starts a chunk whose context is reset_context(query, trace[:p]) and whose tokens are
    trace[p : p + C - m]; the next reset is at p + C - m, while p < len(trace) and the chunk
    count stays within max_chunks.
    """
    query, trace = list(query), list(trace)
    rows = []
    p, chunks = cfg.chunk_size, 1
    while p < len(trace) and chunks < cfg.max_chunks:
        context = reset_context(query, trace[:p], cfg)
        room = cfg.chunk_size - (len(context) - len(query))  # = C - m once p >= m
        new = trace[p : p + room]
        rows.append((context + new, [0] * len(context) + [1] * len(new)))
        p += room
        chunks += 1
    return rows


def split_example(ids: np.ndarray, mask: np.ndarray) -> tuple[list[int], list[int]]:
    """(query, trace) of a tokenized single-turn example: the query is everything before the
    first loss token (the generation prompt included, as the engine sees it), the trace the
    completion (reasoning, </think>, answer, end-of-turn)."""
    start = int(np.argmax(mask > 0))
    if not mask[start]:
        raise ValueError("example has no loss tokens")
    return [int(t) for t in ids[:start]], [int(t) for t in ids[start:]]


def build(
    tokenizer,
    task_name: str,
    knobs: dict,
    *,
    num: int,
    seed: int,
    cfg: MarkovianConfig,
    full_fraction: float,
    thinking: bool = True,
):
    """Yields (record id, ids, loss mask) for `num` task examples (see the module docstring)."""
    task = get_task(task_name, **knobs)
    rng = np.random.default_rng([seed, 7])
    for ex in task.generate(seed, num):
        record = {**ex.to_dict(), "answer": task.final_answer(ex)}
        ids, mask = pipeline.tokenize_example(record, tokenizer, thinking=thinking)
        if rng.random() < full_fraction:
            yield f"{ex.id}-full", ids, mask
        query, trace = split_example(ids, mask)
        for k, (row, row_mask) in enumerate(chunk_rows(query, trace, cfg), start=2):
            yield f"{ex.id}-chunk{k}", np.asarray(row, np.int32), np.asarray(row_mask, np.int32)


def write(records, tokenizer, out: str, meta_extra: dict, thinking: bool = True) -> dict:
    """One ArrayRecord shard + meta.json in `out` (the layout tools/prepare_data.py writes)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "data-00000-of-00001.array_record"
    writer = ArrayRecordWriter(str(out_dir / name), "group_size:1")
    counts = {"num_records": 0, "num_tokens": 0, "loss_tokens": 0, "full_rows": 0}
    for rid, ids, mask in records:
        writer.write(pipeline.encode_tokenized(ids, mask, rid))
        counts["num_records"] += 1
        counts["num_tokens"] += len(ids)
        counts["loss_tokens"] += int(np.sum(mask))
        counts["full_rows"] += rid.endswith("-full")
    writer.close()
    meta = {
        "format": "jreason-tokenized-v1",
        "tokenizer_fingerprint": pipeline.tokenizer_fingerprint(tokenizer),
        "vocab_size": tokenizer.vocab_size,
        "thinking": thinking,
        **counts,
        **meta_extra,
        "shards": [name],
    }
    (out_dir / pipeline.META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv=None):
    from jreason.tokenizer import load_tokenizer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True, help="a .model, tokenizer.json or its dir")
    p.add_argument("--task", default="arithmetic")
    p.add_argument("--knob", action="append", default=[], help="task knob key=value")
    p.add_argument("--num", type=int, default=4000, help="task examples")
    p.add_argument("--seed", type=int, default=2, help="task example stream")
    p.add_argument("--chunk-size", type=int, required=True, help="C")
    p.add_argument("--carryover", type=int, default=None, help="m (default C/2)")
    p.add_argument("--keep-head", type=int, default=0)
    p.add_argument("--max-chunks", type=int, default=8, help="I")
    p.add_argument("--full-fraction", type=float, default=0.5, help="examples with a full row")
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)
    try:
        m = args.carryover if args.carryover is not None else args.chunk_size // 2
        if not 0 <= args.keep_head <= m:
            raise ValueError(f"need 0 <= --keep-head <= carryover, got {args.keep_head}, {m}")
        if not 0.0 <= args.full_fraction <= 1.0:
            raise ValueError(f"--full-fraction must be in [0, 1], got {args.full_fraction}")
        cfg = MarkovianConfig(
            chunk_size=args.chunk_size,
            keep_head=args.keep_head,
            keep_tail=m - args.keep_head,
            max_chunks=args.max_chunks,
        )
        tokenizer = load_tokenizer(args.tokenizer)
        knobs = config_lib.parse_knobs(args.knob)
        records = build(
            tokenizer,
            args.task,
            knobs,
            num=args.num,
            seed=args.seed,
            cfg=cfg,
            full_fraction=args.full_fraction,
        )
        extra = {
            "tokenizer": str(args.tokenizer),
            "task": args.task,
            "knobs": knobs,
            "examples": args.num,
            "seed": args.seed,
            "markovian": {
                "chunk_size": cfg.chunk_size,
                "carryover": m,
                "keep_head": cfg.keep_head,
                "max_chunks": cfg.max_chunks,
            },
            "full_fraction": args.full_fraction,
        }
        meta = write(records, tokenizer, args.out, extra)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"markovian_sft_data: {e}")
    print(
        f"wrote {meta['num_records']} rows ({meta['full_rows']} whole traces, "
        f"{meta['num_records'] - meta['full_rows']} chunk rows; {meta['num_tokens']} tokens, "
        f"{meta['loss_tokens']} in the loss) to {args.out}"
    )


if __name__ == "__main__":
    main()
