"""tools/bench/mfu.py: the numbers its table reports, for the issue's 1B target, worked by hand.

The FLOP formula itself is tested in tests/train/test_metrics.py; here it is the script's use
of it: the preset it builds (the published Llama-3.2-1B size), the switches it applies, and what
a given step time means in tokens/s, MFU on an H100 and the fraction of a measured roof on CPU.
No step is run (that is the benchmark's job, not a test's).
"""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "bench" / "mfu.py"


@pytest.fixture(scope="module")
def mfu():
    spec = importlib.util.spec_from_file_location("bench_mfu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Llama-3.2-1B: D=2048, L=16, N=32, K=8, H=64, F=8192, V=128256, tied embeddings.
ATTN = 2048 * 32 * 64 * 2 + 2048 * 8 * 64 * 2  # q, o + k, v = 10,485,760
MLP = 3 * 2048 * 8192  # gate, up, down = 50,331,648
PER_LAYER = ATTN + MLP + 2 * 2048  # + two RMSNorm scales = 60,821,504
N_PARAMS = 16 * PER_LAYER + 128256 * 2048 + 2048  # + embedding + final norm
# Tied: the lm_head matmul uses the embedding once, so matmul params = all params.
FLOPS_PER_TOKEN_2048 = 6 * N_PARAMS + 6 * 16 * 32 * 64 * 2048  # 6P + causal attention


def test_preset_is_the_published_1b(mfu):
    args = mfu.parse_args(["--attention", "cudnn", "--remat", "dots", "--logits-chunk", "1024"])
    cfg = mfu.build_config(args, args.logits_chunk[0], args.remat[0])
    assert N_PARAMS == 1_235_814_400  # the parameter count Hugging Face lists for the model
    assert cfg.n_params == N_PARAMS
    assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "float32")
    assert (cfg.attention_impl, cfg.remat, cfg.logits_chunk) == ("cudnn", "dots", 1024)


def test_overrides_and_flags_reach_the_config(mfu):
    args = mfu.parse_args(
        ["--override", "n_layers=2", "d_model=256", "n_heads=4", "n_kv_heads=2"]
        + ["--dtype", "float32"]
        + ["--no-scan-layers", "--seq", "300000"]
    )
    cfg = mfu.build_config(args, 128, "full")
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.head_dim) == (2, 256, 4, 64)
    assert (cfg.dtype, cfg.scan_layers, cfg.remat, cfg.logits_chunk) == (
        "float32",
        False,
        "full",
        128,
    )
    assert cfg.max_seq_len == 300000  # raised to the benchmark's length, never lowered


def test_h100_mfu_of_a_step_time(mfu):
    args = mfu.parse_args([])
    cfg = mfu.build_config(args, 0, "none")
    # 8 x 2048 tokens in 0.3 s on one H100 SXM (989 TFLOP/s dense bf16)
    n = mfu.report_numbers(cfg, 8, 2048, 0.3, "NVIDIA H100 80GB HBM3", 1)
    assert FLOPS_PER_TOKEN_2048 == 7_817_539_584
    assert n["flops_per_token"] == FLOPS_PER_TOKEN_2048
    assert n["tokens_per_s"] == pytest.approx(16384 / 0.3)
    assert n["mfu"] == pytest.approx(16384 / 0.3 * 7_817_539_584 / 989e12)  # 43.2%
    assert n["mfu"] == pytest.approx(0.4317, abs=1e-4)
    assert n["roof_fraction"] is None
    # the 45% needs a step of at most 16384 * 7.8175e9 / (0.45 * 989e12) = 0.2878 s
    at_target = mfu.report_numbers(cfg, 8, 2048, 0.2878, "NVIDIA H100 80GB HBM3", 1)
    assert at_target["mfu"] == pytest.approx(0.45, abs=1e-4)


def test_cpu_has_no_mfu_but_a_measured_roof_fraction(mfu):
    args = mfu.parse_args([])
    cfg = mfu.build_config(args, 0, "none")
    n = mfu.report_numbers(cfg, 4, 2048, 10.0, "cpu", 2, roof_flops=1e11)
    assert n["mfu"] is None
    # 4 * 2048 / 10 tokens/s x FLOPs/token over 2 devices x 100 GFLOP/s
    assert n["roof_fraction"] == pytest.approx(819.2 * FLOPS_PER_TOKEN_2048 / 2e11)
