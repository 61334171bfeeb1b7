"""Shared by every tools/bench script: the device name and the BENCHMARKS.md report format."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "BENCHMARKS.md"


def random_qwen2(shape: tuple, *, tie: bool = True, seed: int = 0):
    """A random transformers Qwen2ForCausalLM: the reference every benchmark loads into jreason.

    shape = (hidden, layers, heads, kv_heads, intermediate, vocab).
    """
    import torch
    import transformers

    hidden, layers, heads, kv, inter, vocab = shape
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        max_position_embeddings=4096,
        tie_word_embeddings=tie,
    )
    return transformers.Qwen2ForCausalLM(cfg).eval()


def device_name() -> str:
    import jax

    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return getattr(d, "device_kind", d.platform)


def markdown_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def append_report(title: str, rows: list[dict], *, command: str, device: str, record: bool) -> str:
    date = datetime.date.today().isoformat()
    text = f"### {title}\n\n`{command.strip()}` on {device}, {date}\n\n{markdown_table(rows)}\n"
    print(text)
    if record:
        with BENCHMARKS.open("a") as f:
            f.write("\n" + text)
    return text
