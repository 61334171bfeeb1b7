"""Tokenizes JSONL / Parquet chat data once into ArrayRecord shards for `source: arrayrecord`.

    python tools/prepare_data.py --input data.jsonl --tokenizer TOK --out DIR [--shards N]

writes DIR/data-00000-of-0000N.array_record ... and DIR/meta.json. Records are read and
validated exactly as `source: jsonl` / `parquet` reads them (`pipeline.read_records`: the
`load_math_records` fields, or a `messages` list), tokenized with `pipeline.tokenize_example`,
and stored one record per example in the layout of `pipeline.encode_tokenized` (magic, length,
int32 ids, uint8 loss mask, example id). Shards hold consecutive runs of examples, so reading
`DIR/*.array_record` gives the input order back and the same batches as the JSONL source.
Nothing is truncated here: seq_len is the pipeline's business, so one preparation serves any.

meta.json records the tokenizer's fingerprint and the thinking flag; the pipeline refuses the
shards if either differs from its own. A malformed input record stops the run with its file and
line (row for Parquet); `--skip-bad-records` counts and skips it instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jreason.data import pipeline
from jreason.tokenizer import load_tokenizer


def prepare(
    inputs: list[str],
    tokenizer_path: str,
    out: str,
    shards: int = 1,
    thinking: bool = True,
    skip_bad_records: bool = False,
) -> dict:
    """Writes the shards and meta.json; returns the meta dict."""
    from array_record.python.array_record_module import ArrayRecordWriter

    if shards < 1:
        raise ValueError(f"--shards must be >= 1, got {shards}")
    tokenizer = load_tokenizer(tokenizer_path)
    cfg = pipeline.DataConfig(
        source="jsonl", paths=tuple(inputs), thinking=thinking, skip_bad_records=skip_bad_records
    )
    paths = pipeline.expand_paths(inputs, "input")
    records, bad = pipeline.read_records(paths, cfg)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    names, n, tokens = [], len(records), 0
    for s in range(shards):
        name = f"data-{s:05d}-of-{shards:05d}.array_record"
        # group_size:1 makes every record individually seekable, as grain's random access needs.
        writer = ArrayRecordWriter(str(out_dir / name), "group_size:1")
        for record in records[s * n // shards : (s + 1) * n // shards]:
            try:
                ids, mask = pipeline.tokenize_example(record, tokenizer, thinking=thinking)
            except ValueError as e:
                raise ValueError(f"{record['where']}: cannot tokenize: {e}") from e
            writer.write(pipeline.encode_tokenized(ids, mask, record["id"]))
            tokens += len(ids)
        writer.close()
        names.append(name)
    meta = {
        "format": "jreason-tokenized-v1",
        "inputs": paths,
        "tokenizer": str(tokenizer_path),
        "tokenizer_fingerprint": pipeline.tokenizer_fingerprint(tokenizer),
        "vocab_size": tokenizer.vocab_size,
        "thinking": thinking,
        "num_records": n,
        "num_tokens": tokens,
        "bad_records_skipped": bad,
        "shards": names,
    }
    (out_dir / pipeline.META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--input", required=True, nargs="+", help=".jsonl / .parquet files or globs"
    )
    parser.add_argument("--tokenizer", required=True, help="a .model, tokenizer.json or its dir")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--no-thinking", action="store_true", help="leave reasoning out")
    parser.add_argument("--skip-bad-records", action="store_true")
    args = parser.parse_args(argv)
    try:
        meta = prepare(
            args.input,
            args.tokenizer,
            args.out,
            shards=args.shards,
            thinking=not args.no_thinking,
            skip_bad_records=args.skip_bad_records,
        )
    except (ValueError, FileNotFoundError) as e:  # RecordError is a ValueError
        sys.exit(f"prepare_data: {e}")
    print(
        f"wrote {meta['num_records']} records ({meta['num_tokens']} tokens) in "
        f"{len(meta['shards'])} shards to {args.out}; skipped {meta['bad_records_skipped']} bad"
    )


if __name__ == "__main__":
    main()
