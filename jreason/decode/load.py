"""Model directory -> (Engine, tokenizer): the one loader `generate`, `eval` and `serve` share.

`serve/` and `jobs/` reach the model only through `decode/` (DESIGN.md), so loading lives here.
"""

from __future__ import annotations

from pathlib import Path

from jreason.decode.engine import Engine

# The cache is max_slots x max_len per layer, allocated up front: a 128k-context model would not
# fit, so the default is capped (pass max_len, or think in Markovian chunks).
DEFAULT_MAX_LEN = 4096


def load_engine(
    model_path: str | Path,
    *,
    max_slots: int = 16,
    max_len: int | None = None,
    param_dtype: str | None = None,
    dtype: str | None = None,
    recurrence: int | None = None,
    exit_threshold: float | None = None,
):
    """(Engine, tokenizer) for a Hugging Face or jreason model directory with its tokenizer.

    `recurrence` / `exit_threshold`: test-time depth of a recurrent-depth model (fixed r, or
    adaptive exit capped at r; RecurrentModel.with_depth); an error for any other model.
    """
    from jreason.model.store import abstract, load_model
    from jreason.tokenizer import load_tokenizer

    model_path = Path(model_path)
    cfg, params = load_model(model_path, param_dtype=param_dtype, dtype=dtype)
    tokenizer = load_tokenizer(model_path)
    model, _, _ = abstract(cfg)
    if hasattr(model, "with_depth"):
        model = model.with_depth(recurrence, exit_threshold)
    elif recurrence is not None or exit_threshold is not None:
        raise ValueError(
            f"--recurrence / --exit-threshold: {model_path} is not a recurrent-depth model"
        )
    engine = Engine(
        model,
        params,
        max_slots=max_slots,
        max_len=max_len or min(cfg.max_seq_len, DEFAULT_MAX_LEN),
        pad_id=tokenizer.pad_id or 0,
        detokenize=tokenizer.decode,
        think_end_id=tokenizer.think_close_id,
    )
    return engine, tokenizer
