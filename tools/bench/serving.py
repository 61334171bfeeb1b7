"""Serving workload: jreason's continuous-batching engine vs transformers in static batches.

The workload of the decode-engine issue: N requests (default 64) with mixed prompt lengths
(uniform in 8..96 tokens) and mixed output lengths, submitted at once. Each request gets its own
`max_tokens` from a skewed distribution: most are short (16..64), a few are long (128..256).
A greedy random model almost never emits a given stop id, so "some requests stop early" is
realized by these per-request budgets rather than by stop tokens: the engine ends each request
at its own budget, exactly as it would on a stop id.

Two ways to serve it, same random Qwen2 weights (saved by transformers, loaded with
`jreason.model.hf.load_hf`), fp32, greedy:
- (a) jreason `Engine` with `--slots` slots (default 16): all N requests are submitted, a
  finished request frees its slot for the next queued one at once.
- (b) transformers `generate` in static batches of `--slots` requests in submission order:
  prompts left-padded with an attention mask, each batch runs until its longest `max_tokens`
  (as a static-batch server must), and each row is then truncated to its own `max_tokens`.
  The compute spent on rows that are already done is the cost continuous batching removes.
Both produce the same useful tokens (the sum of the budgets); the table reports useful tok/s.

Before timing, the engine is warmed up on a separate set of requests whose prompts cover every
prefill bucket the workload uses (its compile time is reported separately), and a few workload
requests are checked token for token against transformers run alone on the unpadded prompt
(left padding can move HF's numerics slightly, so the padded batches are only compared for
information: "padded HF rows equal"). Then both systems serve the whole workload alternately
(`--reps`, fresh prompt tokens each repetition, same lengths and budgets), medians reported.
Prints a table and appends it, with the command, date and device, to BENCHMARKS.md.

Time on the 2-core CPU machine (3 reps): demo ~2-3 min (transformers' static batches take
~47 s per repetition, the engine ~4 s); 100m takes several times longer, so the default is the
demo model only; the script prints a projection after the first repetition.

    python tools/bench/serving.py                        # demo model, 64 requests, 16 slots
    python tools/bench/serving.py --size 100m --reps 1
    python tools/bench/serving.py --quick --no-record    # 8 requests, 4 slots, tiny lengths
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_report, device_name, random_qwen2  # noqa: E402
from forward import SIZES as FORWARD_SIZES  # noqa: E402

SIZES = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab)
    "demo": (128, 4, 4, 2, 384, 512),
    "100m": FORWARD_SIZES["100m"],
}


def make_workload(n: int, prompt_range, short_range, long_range, long_frac: float, seed: int):
    """(prompt lengths, max_tokens) of n requests: many short budgets, a few long ones."""
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(prompt_range[0], prompt_range[1] + 1, size=n)
    is_long = rng.random(n) < long_frac
    short = rng.integers(short_range[0], short_range[1] + 1, size=n)
    long = rng.integers(long_range[0], long_range[1] + 1, size=n)
    return prompt_lens.tolist(), np.where(is_long, long, short).tolist()


def random_prompts(rng, lens: list[int], vocab: int) -> list[list[int]]:
    # ids from 1: 0 is the pad id of both systems
    return [rng.integers(1, vocab, size=n).tolist() for n in lens]


def engine_serve(engine, prompts, budgets) -> list[list[int]]:
    from jreason.decode.engine import Request

    rids = [engine.submit(Request(p, max_tokens=m)) for p, m in zip(prompts, budgets)]
    results = engine.run_until_idle()
    return [results.pop(r).tokens for r in rids]


def hf_generate_one(ref, prompt: list[int], max_new: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = ref.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def hf_serve_static(ref, prompts, budgets, batch: int) -> tuple[list[list[int]], int]:
    """Static batches in submission order; returns (per-request tokens, tokens computed)."""
    import torch

    outs, computed = [], 0
    for i in range(0, len(prompts), batch):
        ps, ms = prompts[i : i + batch], budgets[i : i + batch]
        P, new = max(len(p) for p in ps), max(ms)  # the batch runs until its longest budget
        ids = torch.zeros((len(ps), P), dtype=torch.long)
        mask = torch.zeros((len(ps), P), dtype=torch.long)
        for r, p in enumerate(ps):  # left padding: every row's last prompt token at column P-1
            ids[r, P - len(p) :] = torch.tensor(p)
            mask[r, P - len(p) :] = 1
        with torch.no_grad():
            out = ref.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        out = out[:, P:].numpy()
        assert out.shape == (len(ps), new), f"transformers gave {out.shape}"
        outs += [out[r, :m].tolist() for r, m in enumerate(ms)]  # the per-row budget
        computed += len(ps) * new
    return outs, computed


def bench(args) -> list[dict]:
    from jreason.decode.engine import Engine
    from jreason.decode.slots import prefill_buckets
    from jreason.model.hf import load_hf
    from jreason.model.transformer import abstract_model

    with tempfile.TemporaryDirectory() as tmp:
        ref = random_qwen2(SIZES[args.size])
        ref.save_pretrained(tmp)
        cfg, params = load_hf(tmp, param_dtype="float32")
    model, _ = abstract_model(cfg)

    prompt_lens, budgets = make_workload(
        args.requests, args.prompt_range, args.short, args.long, args.long_frac, args.seed
    )
    useful = sum(budgets)
    max_len = max(prompt_lens) + max(budgets)
    engine = Engine(model, params, max_slots=args.slots, max_len=max_len)
    buckets = sorted({engine.bucket(n) for n in prompt_lens})
    print(
        f"{args.size} ({cfg.n_params / 1e6:.2f}M): {args.requests} requests, prompts "
        f"{min(prompt_lens)}..{max(prompt_lens)} tokens, max_tokens {min(budgets)}..{max(budgets)} "
        f"(median {int(np.median(budgets))}), {useful} useful tokens; engine max_len {max_len}, "
        f"prefill buckets used {buckets} of {prefill_buckets(max_len)}",
        flush=True,
    )
    rng = np.random.default_rng(args.seed + 1)

    # Warm-up / compile: one request per prefill bucket the workload uses (prompt = the bucket's
    # largest length the workload has), with short budgets; a different set from the timed one.
    warm_lens = [max(n for n in prompt_lens if engine.bucket(n) == b) for b in buckets]
    warm = random_prompts(rng, warm_lens, cfg.vocab_size)
    t0 = time.perf_counter()
    engine_serve(engine, warm, [4] * len(warm))
    engine_warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf_serve_static(ref, warm, [4] * len(warm), args.slots)
    hf_warmup = time.perf_counter() - t0
    print(f"warm-up: engine {engine_warmup:.2f} s (compile), transformers {hf_warmup:.2f} s")

    # Greedy equality on a few workload requests: the engine (serving them together) vs
    # transformers on each unpadded prompt alone: the longest prompt and the longest budgets.
    prompts = random_prompts(rng, prompt_lens, cfg.vocab_size)
    by_budget = sorted(range(len(prompts)), key=lambda i: budgets[i], reverse=True)
    longest_prompt = max(range(len(prompts)), key=lambda i: prompt_lens[i])
    check = sorted(list(dict.fromkeys([longest_prompt, *by_budget]))[: args.check])
    ours = engine_serve(engine, [prompts[i] for i in check], [budgets[i] for i in check])
    for i, toks in zip(check, ours):
        theirs = hf_generate_one(ref, prompts[i], budgets[i])
        diff = next((t for t, (a, b) in enumerate(zip(toks, theirs)) if a != b), None)
        print(
            f"request {i} (prompt {prompt_lens[i]}, max_tokens {budgets[i]}): engine vs "
            f"transformers alone: {'equal' if diff is None else f'differ at token {diff}'}",
            flush=True,
        )
        assert len(toks) == len(theirs) == budgets[i] and diff is None, (
            f"greedy outputs differ for request {i}: refusing to time different computations"
        )

    e_t, hf_t, padded_equal, computed = [], [], [], 0
    t_start = time.perf_counter()
    for rep in range(args.reps):
        # fresh tokens each repetition (same lengths and budgets), so nothing is a cached input
        p = prompts if rep == 0 else random_prompts(rng, prompt_lens, cfg.vocab_size)
        runs = [("engine", lambda p=p: engine_serve(engine, p, budgets))]
        runs.append(("hf", lambda p=p: hf_serve_static(ref, p, budgets, args.slots)))
        if rep % 2:  # alternate which system goes first
            runs.reverse()
        out = {}
        for name, fn in runs:
            t0 = time.perf_counter()
            out[name] = fn()
            (e_t if name == "engine" else hf_t).append(time.perf_counter() - t0)
        (hf_out, computed) = out["hf"]
        assert [len(t) for t in out["engine"]] == budgets, "engine did not honour max_tokens"
        padded_equal.append(sum(a == b for a, b in zip(out["engine"], hf_out)))
        if rep == 0 and args.reps > 1:
            spent = time.perf_counter() - t_start
            print(
                f"rep 1: engine {e_t[0]:.1f} s, transformers {hf_t[0]:.1f} s; projected "
                f"{spent * (args.reps - 1):.0f} s more for {args.reps - 1} reps",
                flush=True,
            )

    e, hf = statistics.median(e_t), statistics.median(hf_t)
    return [
        {
            "model": f"Qwen2 {args.size} ({cfg.n_params / 1e6:.2f}M)",
            "requests": args.requests,
            "slots / batch": args.slots,
            "useful tokens": f"{useful:,}",
            "tf tokens computed": f"{computed:,}",
            "engine s": f"{e:.2f}",
            "transformers s": f"{hf:.2f}",
            "engine useful tok/s": f"{useful / e:,.1f}",
            "transformers useful tok/s": f"{useful / hf:,.1f}",
            "engine / tf": f"{hf / e:.2f}x",
            "warm-up s (engine compile, tf)": f"{engine_warmup:.2f}, {hf_warmup:.2f}",
            "greedy check": f"{len(check)} equal alone",
            "padded tf rows equal": f"{min(padded_equal)}/{args.requests}",
        }
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", default="demo", choices=sorted(SIZES))
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--slots", type=int, default=16, help="engine max_slots = tf batch size")
    ap.add_argument("--prompt-range", type=int, nargs=2, default=[8, 96], metavar=("MIN", "MAX"))
    ap.add_argument("--short", type=int, nargs=2, default=[16, 64], metavar=("MIN", "MAX"))
    ap.add_argument("--long", type=int, nargs=2, default=[128, 256], metavar=("MIN", "MAX"))
    ap.add_argument("--long-frac", type=float, default=0.2, help="share of long budgets")
    ap.add_argument("--check", type=int, default=4, help="requests checked against tf alone")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--quick", action="store_true", help="8 requests, 4 slots, tiny lengths (a smoke test)"
    )
    ap.add_argument(
        "--no-record", action="store_true", help="print only; do not touch BENCHMARKS.md"
    )
    ap.add_argument(
        "--cpu-threads", type=int, default=None, help="XLA:CPU pool size (jreason/cpu_threads.py)"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.slots, args.check = 8, 4, 2
        args.prompt_range, args.short, args.long = [8, 24], [4, 12], [24, 32]
        args.long_frac = 0.25
    import torch

    from jreason import cpu_threads

    cores = len(os.sched_getaffinity(0))
    xla_threads = cpu_threads.start_backend(args.cpu_threads) or cores
    torch.set_num_threads(cores)
    rows = bench(args)
    append_report(
        f"Serving workload (fp32, greedy): jreason Engine continuous batching vs transformers "
        f"static batches; prompts {args.prompt_range[0]}..{args.prompt_range[1]} tokens, "
        f"max_tokens {args.short[0]}..{args.short[1]} ({1 - args.long_frac:.0%}) or "
        f"{args.long[0]}..{args.long[1]} ({args.long_frac:.0%}); threads: XLA:CPU "
        f"{xla_threads}, torch {cores}",
        rows,
        command="python tools/bench/serving.py " + " ".join(sys.argv[1:]),
        device=device_name(),
        record=not args.no_record,
    )


if __name__ == "__main__":
    main()
