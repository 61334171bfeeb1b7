"""Resumable batch inference: `jreason generate --model M --input prompts.jsonl --output out.jsonl`.

Every (id, sample) of the input becomes one engine request; each finished request is appended to
the output as one complete JSON line (records.py), in completion order. Running the same command
again after a kill skips every key already in the output, so a job over a large file can be
preempted any number of times and ends with exactly one line per key. Per-sample seeds are
derived from (seed, id, sample), not from submission order, so a resumed job samples the same
tokens an uninterrupted one would.

Bad input never stops the job: an invalid line, or a prompt that does not fit the context
(unless Markovian mode makes it fit), becomes an error row `{"id", "sample", "line_no",
"error"}` and the job goes on.

The engine is fed from a bounded window (a few times the slot count) so memory does not grow
with the input size, and a tqdm bar shows done/total, generated tokens/s and the ETA.

With `soft_thinking` the engine is bypassed: batches of `max_slots` prompts go through
`decode/soft.py` (Soft Thinking needs input embeddings, which the slot engine does not feed),
using the engine only for its model and params. `max_thinking_tokens` is then the soft-step
budget; Markovian chunks, s1 forcing, answer budgets and stop strings are refused.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Iterator

from jreason.decode import soft
from jreason.decode.budget import ThinkingBudget
from jreason.decode.engine import Engine, Request, Result
from jreason.decode.markovian import MarkovianConfig
from jreason.jobs.records import InputError, PromptRecord, ResultWriter, read_requests
from jreason.tokenizer import split_thinking


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    """Everything about how to generate; the CLI flags map one to one."""

    n: int = 1
    max_tokens: int = 1024
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    chat: bool = True  # "prompt" strings go through the chat template as a user message
    enable_thinking: bool = True
    # thinking budgets (budget.py)
    min_thinking_tokens: int = 0
    max_thinking_tokens: int | None = None
    continuation: str = "Wait"
    answer_prefix: str = ""
    max_answer_tokens: int | None = None
    # Markovian thinking (markovian.py); chunk_size None = off
    chunk_size: int | None = None
    keep_head: int = 0
    keep_tail: int | None = None
    max_chunks: int = 8
    # engine
    max_slots: int = 16
    max_len: int | None = None
    logprobs: bool = False  # also write token ids and their logprobs
    # Soft Thinking (decode/soft.py): concept tokens while thinking; the sampling fields above
    # then apply to the answer only
    soft_thinking: bool = False
    soft_top_k: int = 15
    soft_top_p: float = 0.95
    soft_min_p: float = 0.0
    soft_temperature: float = 0.6
    cold_stop_entropy: float | None = None  # None: Cold Stop off
    cold_stop_steps: int = 256

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n={self.n} must be >= 1")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if self.max_slots < 1:
            raise ValueError(f"max_slots={self.max_slots} must be >= 1")
        if self.soft_thinking:
            for name, off in (
                ("chunk_size", None),
                ("min_thinking_tokens", 0),
                ("max_answer_tokens", None),
                ("answer_prefix", ""),
                ("stop", ()),
            ):
                if getattr(self, name) != off:
                    raise ValueError(f"{name} is not supported with soft_thinking")
            for name, ok, allowed in (
                ("soft_top_k", self.soft_top_k >= 1, ">= 1"),
                ("soft_top_p", 0 < self.soft_top_p <= 1, "in (0, 1]"),
                ("soft_min_p", 0 <= self.soft_min_p <= 1, "in [0, 1]"),
                ("soft_temperature", self.soft_temperature >= 0, ">= 0"),
                ("cold_stop_entropy", (self.cold_stop_entropy or 0) >= 0, ">= 0"),
                ("cold_stop_steps", self.cold_stop_steps >= 1, ">= 1"),
            ):
                if not ok:
                    raise ValueError(f"{name}={getattr(self, name)} must be {allowed}")

    @property
    def uses_thinking_budget(self) -> bool:
        return (
            self.min_thinking_tokens > 0
            or self.max_thinking_tokens is not None
            or self.max_answer_tokens is not None
        )


def make_policies(opts: GenerateOptions, tokenizer):
    """(ThinkingBudget | None, MarkovianConfig | None) for every request of the job."""
    thinking = None
    if opts.uses_thinking_budget:
        if tokenizer.think_close_id is None:
            raise ValueError(
                f"thinking budgets need {tokenizer.think_close!r} to be a single token in "
                "this tokenizer"
            )
        thinking = ThinkingBudget(
            think_end_id=tokenizer.think_close_id,
            min_thinking_tokens=opts.min_thinking_tokens,
            max_thinking_tokens=opts.max_thinking_tokens,
            continuation_ids=tokenizer.encode(opts.continuation) if opts.continuation else (),
            answer_prefix_ids=tokenizer.encode(opts.answer_prefix) if opts.answer_prefix else (),
            max_answer_tokens=opts.max_answer_tokens,
        )
    markovian = None
    if opts.chunk_size is not None:
        markovian = MarkovianConfig(
            chunk_size=opts.chunk_size,
            keep_head=opts.keep_head,
            keep_tail=opts.keep_tail,
            max_chunks=opts.max_chunks,
        )
    return thinking, markovian


def sample_seed(seed: int, rid: str, sample: int) -> int:
    """A per-(id, sample) seed independent of submission order (so resume is exact)."""
    return zlib.crc32(f"{seed}\x00{rid}\x00{sample}".encode()) ^ (seed & 0xFFFFFFFF)


def prompt_ids(record: PromptRecord, tokenizer, opts: GenerateOptions) -> list[int]:
    if record.messages is not None:
        messages = record.messages
    elif opts.chat:
        messages = [{"role": "user", "content": record.prompt}]
    else:
        return tokenizer.encode(record.prompt, add_bos=tokenizer.add_bos_token)
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, enable_thinking=opts.enable_thinking, tokenize=True
    )


def build_request(record: PromptRecord, tokenizer, opts: GenerateOptions, policies) -> Request:
    thinking, markovian = policies
    return Request(
        prompt_ids=prompt_ids(record, tokenizer, opts),
        max_tokens=opts.max_tokens,
        temperature=opts.temperature,
        top_k=opts.top_k,
        top_p=opts.top_p,
        min_p=opts.min_p,
        seed=sample_seed(opts.seed, record.id, record.sample),
        stop_ids=sorted(tokenizer.stop_ids),
        stop_strings=opts.stop,
        thinking=thinking,
        markovian=markovian,
    )


def result_row(record: PromptRecord, result: Result, tokenizer, opts: GenerateOptions) -> dict:
    tokens = result.tokens
    if result.finish_reason == "stop" and tokens and tokens[-1] in tokenizer.stop_ids:
        tokens = tokens[:-1]  # the end-of-turn token is not part of the text
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    for special in ("<|im_end|>", "<|endoftext|>"):
        text = text.removesuffix(special)
    reasoning, answer = split_thinking(text, started_thinking=opts.enable_thinking)
    row = {
        "id": record.id,
        "sample": record.sample,
        "line_no": record.line_no,
        "completion": text,
        "reasoning": reasoning,
        "content": answer,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_len,
        "completion_tokens": len(result.tokens),
        "thinking_tokens": result.thinking_tokens,
        "chunks": len(result.chunks),
        "peak_context": result.peak_context,
    }
    if record.answer is not None:
        row["reference"] = record.answer
    if record.extra:
        row["extra"] = record.extra
    if opts.logprobs:
        row["token_ids"] = result.tokens
        # forced tokens (budget forcing) were not sampled: null instead of NaN (valid JSON)
        row["logprobs"] = [None if lp != lp else lp for lp in result.logprobs]
    return row


def error_row(item: PromptRecord | InputError, message: str) -> dict:
    return {"id": item.id, "sample": item.sample, "line_no": item.line_no, "error": message}


def _pending(input_path, n, done) -> Iterator[PromptRecord | InputError]:
    for item in read_requests(input_path, n):
        if item.key not in done:
            yield item


def run_generate(
    engine: Engine, tokenizer, input_path, output_path, opts: GenerateOptions, progress=True
) -> dict:
    """Runs (or resumes) the job; returns counts {"total", "skipped", "written", "errors",
    "generated_tokens", "seconds"}."""
    from tqdm import tqdm

    if opts.soft_thinking:
        return run_generate_soft(engine, tokenizer, input_path, output_path, opts, progress)
    policies = make_policies(opts, tokenizer)
    total = sum(1 for _ in read_requests(input_path, opts.n))
    stats = {"total": total, "skipped": 0, "written": 0, "errors": 0, "generated_tokens": 0}
    t0 = time.perf_counter()
    with ResultWriter(output_path) as out:
        stats["skipped"] = len(out.done)
        bar = tqdm(
            total=total, initial=len(out.done), disable=not progress, unit="req", smoothing=0.1
        )
        window = 4 * engine.max_slots
        items = _pending(input_path, opts.n, out.done)
        in_flight: dict[int, PromptRecord] = {}
        exhausted = False

        def write(row: dict) -> None:
            out.write(row)
            stats["written"] += 1
            stats["errors"] += "error" in row
            bar.update(1)

        while True:
            while not exhausted and len(in_flight) < window:
                item = next(items, None)
                if item is None:
                    exhausted = True
                    break
                if isinstance(item, InputError):
                    write(error_row(item, item.message))
                    continue
                try:
                    rid = engine.submit(build_request(item, tokenizer, opts, policies))
                except ValueError as e:
                    write(error_row(item, f"line {item.line_no}: {e}"))
                    continue
                in_flight[rid] = item
            if not engine.has_work():
                break
            for rid, result in engine.step():
                engine.results.pop(rid, None)
                write(result_row(in_flight.pop(rid), result, tokenizer, opts))
                stats["generated_tokens"] += len(result.tokens)
                elapsed = time.perf_counter() - t0
                bar.set_postfix(tok_s=f"{stats['generated_tokens'] / elapsed:,.0f}")
        bar.close()
    stats["seconds"] = time.perf_counter() - t0
    return stats


def run_generate_soft(
    engine: Engine, tokenizer, input_path, output_path, opts: GenerateOptions, progress=True
) -> dict:
    """`run_generate` with Soft Thinking: fixed batches of `engine.max_slots` prompts through
    soft.generate (a short last batch is padded with copies, so one compilation serves all);
    rows as `result_row` writes them plus `soft_steps`, `end_reason` and `cold_stop`."""
    from tqdm import tqdm

    if tokenizer.think_close_id is None:
        raise ValueError(
            f"soft thinking needs {tokenizer.think_close!r} to be a single token in this tokenizer"
        )
    stop_ids = sorted(tokenizer.stop_ids - {tokenizer.think_close_id})
    total = sum(1 for _ in read_requests(input_path, opts.n))
    stats = {"total": total, "skipped": 0, "written": 0, "errors": 0, "generated_tokens": 0}
    t0 = time.perf_counter()
    with ResultWriter(output_path) as out:
        stats["skipped"] = len(out.done)
        bar = tqdm(total=total, initial=len(out.done), disable=not progress, unit="req")

        def write(row: dict) -> None:
            out.write(row)
            stats["written"] += 1
            stats["errors"] += "error" in row
            bar.update(1)

        def flush(batch: list[tuple[PromptRecord, list[int]]]) -> None:
            pad = engine.max_slots - len(batch)
            prompts = [ids for _, ids in batch] + [batch[0][1]] * pad
            seeds = [sample_seed(opts.seed, r.id, r.sample) for r, _ in batch] + [0] * pad
            outs = soft.generate(
                engine.model,
                engine.params,
                prompts,
                think_end_id=tokenizer.think_close_id,
                max_new_tokens=opts.max_tokens,
                top_k=opts.soft_top_k,
                top_p=opts.soft_top_p,
                min_p=opts.soft_min_p,
                temperature=opts.soft_temperature,
                cold_stop_entropy=opts.cold_stop_entropy,
                cold_stop_steps=opts.cold_stop_steps,
                max_thinking_tokens=opts.max_thinking_tokens,
                thinking=opts.enable_thinking,
                stop_ids=stop_ids,
                answer_temperature=opts.temperature,
                answer_top_k=opts.top_k,
                answer_top_p=opts.top_p,
                answer_min_p=opts.min_p,
                seed=seeds,
                pad_id=tokenizer.pad_id or 0,
            )
            for (record, ids), o in zip(batch, outs):
                tokens = o["tokens"]
                result = Result(
                    tokens=tokens,
                    logprobs=[float("nan")] * len(tokens),  # soft.generate keeps no logprobs
                    finish_reason=o["finish_reason"],
                    prompt_len=len(ids),
                    chunks=[],
                    thinking_tokens=o["thinking_tokens"],
                    peak_context=len(ids) + len(tokens),
                )
                row = result_row(record, result, tokenizer, opts)
                row.update(
                    soft_steps=o["soft_steps"], end_reason=o["end_reason"], cold_stop=o["cold_stop"]
                )
                write(row)
                stats["generated_tokens"] += len(tokens)
            batch.clear()

        batch: list[tuple[PromptRecord, list[int]]] = []
        for item in _pending(input_path, opts.n, out.done):
            if isinstance(item, InputError):
                write(error_row(item, item.message))
                continue
            try:
                ids = prompt_ids(item, tokenizer, opts)
            except ValueError as e:
                write(error_row(item, f"line {item.line_no}: {e}"))
                continue
            if not ids or len(ids) + opts.max_tokens > engine.max_len:
                message = (
                    f"prompt of {len(ids)} tokens + max_tokens={opts.max_tokens} does not fit "
                    f"max_len={engine.max_len}"
                )
                write(error_row(item, f"line {item.line_no}: {message}"))
                continue
            batch.append((item, ids))
            if len(batch) == engine.max_slots:
                flush(batch)
        if batch:
            flush(batch)
        bar.close()
    stats["seconds"] = time.perf_counter() - t0
    return stats
