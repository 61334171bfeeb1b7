"""jreason.train.metrics: FLOPs / MFU against hand arithmetic, and every sink read back from disk.

TensorBoard is not installed, so event files are parsed here from the TFRecord framing
(u64 length, masked crc32c, payload, masked crc32c) with a crc32c written in this file.
"""

import json
import math
import struct
import time

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from jreason.model import ModelConfig
from jreason.model.recurrent import RecurrentConfig
from jreason.train import metrics as M

# ---------------------------------------------------------------------------------------------
# FLOPs and MFU


def small_cfg(**kw):
    return ModelConfig(
        vocab_size=100, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=32, **kw
    )


def hand_flops_per_token(T):
    # D=16, N=4, K=2, H=16/4=4, F=32, V=100, L=2, written out weight by weight.
    q, k, v, o = 16 * 4 * 4, 16 * 2 * 4, 16 * 2 * 4, 4 * 4 * 16  # 256, 128, 128, 256
    gate, up, down = 16 * 32, 16 * 32, 32 * 16
    norms = 16 + 16  # attention and MLP RMSNorm scales
    per_layer = q + k + v + o + gate + up + down + norms  # 2336
    final_norm = 16
    lm_head = 16 * 100
    P = 2 * per_layer + final_norm + lm_head  # input embedding (a gather) left out
    # Attention per layer and token: QK^T + AV = 4*N*H*T fwd, x3 fwd+bwd, /2 causal.
    attn = 2 * (4 * 4 * 4 * T * 3 / 2)
    return 6 * P + attn


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("T", [1, 64, 1000])
def test_train_flops_per_token_matches_hand_count(tied, T):
    got = M.train_flops_per_token(small_cfg(tie_embeddings=tied), T)
    assert got == pytest.approx(hand_flops_per_token(T), rel=1e-12)


def test_train_flops_per_token_numbers():
    # 6 * 6288 + 192 * 64, worked out on paper from the shapes above.
    assert hand_flops_per_token(64) == 50016
    assert M.train_flops_per_token(small_cfg(), 64) == 50016


def test_recurrent_flops_count_each_core_pass():
    kw = dict(vocab_size=64, d_model=16, n_heads=2, n_kv_heads=1, d_ff=32, n_prelude=1, n_coda=2)
    adapter = 6 * 2 * 16 * 16  # the (2D, D) adapter, forward + backward, per iteration
    # backprop through every iteration (E[r] = 4 <= k): the model unrolled to 1 + 2 + 4 * 3 layers
    full = RecurrentConfig(**kw, n_core=3, mean_recurrence=3, backprop_depth=8)
    unrolled = M.train_flops_per_token(full.block_config(1 + 2 + 4 * 3), 64)
    assert M.train_flops_per_token(full, 64) == pytest.approx(unrolled + 4 * adapter)
    # k = 1: 4 forward passes of the core but 1 backward (2/3 of a pass's flops), so the core
    # costs (4 + 2 * 1) / 3 = 2 passes instead of 4
    f = M.train_flops_per_token
    layer = f(full.block_config(2), 64) - f(full.block_config(1), 64)
    one_pass = 3 * layer + adapter
    assert f(full.replace(backprop_depth=1), 64) == pytest.approx(f(full, 64) - 2 * one_pass)


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5e", 197e12),
        ("TPU v5p", 459e12),
        ("TPU v5", 459e12),
        ("TPU v6 lite", 918e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H200", 989e12),
        ("cpu", None),
        ("TFRT_CPU_0", None),
        ("some future chip", None),
    ],
)
def test_peak_flops(kind, peak):
    assert M.peak_flops(kind) == peak


def test_mfu():
    fpt = hand_flops_per_token(64)
    tps = 3.2e9
    expected = tps * fpt / (8 * 197e12)
    assert M.mfu(tps, fpt, "TPU v5 lite", 8) == pytest.approx(expected, rel=1e-12)
    assert M.mfu(tps, fpt, "NVIDIA H100 80GB HBM3", 1) == pytest.approx(tps * fpt / 989e12)
    assert M.mfu(tps, fpt, "cpu", 1) is None


# ---------------------------------------------------------------------------------------------
# MetricsLogger


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_tb_scalars(tb_dir):
    """{tag: [(step, value), ...]} from every event file in tb_dir."""
    assert _crc32c(b"123456789") == 0xE3069283  # the standard crc32c check value
    files = sorted(tb_dir.glob("events.out.tfevents.*"))
    assert files, f"no event files in {tb_dir}"
    out = {}
    for f in files:
        buf, pos = f.read_bytes(), 0
        while pos < len(buf):
            header = buf[pos : pos + 8]
            (n,) = struct.unpack("<Q", header)
            (hcrc,) = struct.unpack("<I", buf[pos + 8 : pos + 12])
            assert hcrc == _masked(header)
            data = buf[pos + 12 : pos + 12 + n]
            (dcrc,) = struct.unpack("<I", buf[pos + 12 + n : pos + 16 + n])
            assert dcrc == _masked(data)
            pos += 16 + n
            event = event_pb2.Event.FromString(data)
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


LOGGED = [
    (0, {"loss": 2.5, "lr": 1e-4, "mfu": None, "tokens": 4096}),
    (
        1,
        {"loss": np.float32(2.25), "lr": jnp.float32(2e-4), "mfu": None, "tokens": jnp.int32(8192)},
    ),
    (2, {"loss": jnp.array(2.0, jnp.bfloat16), "lr": 3e-4, "mfu": 0.41, "tokens": np.int64(12288)}),
]


def test_jsonl_and_tensorboard_round_trip(tmp_path):
    run = tmp_path / "run"
    t0 = time.time()
    with M.MetricsLogger(run, total_steps=3, console=False) as log:
        for step, m in LOGGED:
            log.log(step, m)
        log.log(2, {"accuracy": 0.75}, prefix="eval_")
    t1 = time.time()

    lines = (run / "metrics.jsonl").read_text().splitlines()
    raw = [json.loads(line) for line in lines]
    assert raw == M.read_jsonl(run / "metrics.jsonl")
    assert len(raw) == 4
    assert '"mfu": null' in lines[0]
    expected = [
        {"step": s, **{k: (None if v is None else float(v)) for k, v in m.items()}}
        for s, m in LOGGED
    ]
    expected.append({"step": 2, "eval_accuracy": 0.75})
    for rec, exp in zip(raw, expected):
        assert t0 <= rec.pop("time") <= t1
        assert rec == exp
    assert all(isinstance(r["tokens"], int) for r in raw[:3])  # numpy / jax ints stay ints

    scalars = read_tb_scalars(run / "tb")
    assert "mfu" in scalars and [s for s, _ in scalars["mfu"]] == [2]  # None skipped
    for key in ("loss", "lr", "tokens", "mfu"):
        want = [(s, np.float32(float(m[key]))) for s, m in LOGGED if m[key] is not None]
        assert [(s, np.float32(v)) for s, v in scalars[key]] == want
    assert scalars["eval_accuracy"] == [(2, 0.75)]


def test_disabled_creates_nothing(tmp_path):
    run = tmp_path / "run"
    with M.MetricsLogger(run, enabled=False, total_steps=5) as log:
        log.log(0, {"loss": 1.0})
        log.log(1, {"loss": 0.5}, prefix="eval_")
    log.close()
    assert list(tmp_path.iterdir()) == []


def test_resume_appends_and_torn_line_dropped(tmp_path):
    run = tmp_path / "run"
    with M.MetricsLogger(run, tensorboard=False, console=False) as log:
        log.log(0, {"loss": 1.0})
    with M.MetricsLogger(run, tensorboard=False, console=False, start_step=1) as log:
        log.log(1, {"loss": 0.5})
    assert not (run / "tb").exists()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # killed mid-write
    assert [(r["step"], r["loss"]) for r in M.read_jsonl(run / "metrics.jsonl")] == [
        (0, 1.0),
        (1, 0.5),
    ]


def test_nan_kept_and_bad_values_rejected(tmp_path):
    with M.MetricsLogger(tmp_path, tensorboard=False, console=False) as log:
        log.log(0, {"loss": float("nan")})
        with pytest.raises(ValueError, match="reserved"):
            log.log(1, {"time": 3.0})
        with pytest.raises(TypeError, match="'grad'"):
            log.log(1, {"grad": np.zeros(3)})
    (rec,) = M.read_jsonl(tmp_path / "metrics.jsonl")
    assert math.isnan(rec["loss"])


def test_progress_bar(tmp_path, capsys):
    with M.MetricsLogger(tmp_path, total_steps=10, tensorboard=False, start_step=2) as log:
        log.log(7, {"loss": 0.125})
    err = capsys.readouterr().err
    assert "7/10" in err
    assert "loss=0.125" in err


# ---------------------------------------------------------------------------------------------
# plot_metrics


def test_plot_metrics_png(tmp_path):
    import matplotlib.image

    records = [{"step": s, "time": 0.0, "loss": 3.0 / (s + 1)} for s in range(40)]
    records += [{"step": s, "time": 0.0, "eval_accuracy": s / 40} for s in (0, 10, 20, 30)]
    records.append({"step": 40, "time": 0.0, "eval_accuracy": None})
    out = M.plot_metrics(
        records, tmp_path / "sub" / "plot.png", keys=("loss", "eval_accuracy", "absent")
    )
    assert out == tmp_path / "sub" / "plot.png"

    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    n_rows = 2  # "absent" occurs in no record
    want_h = round(M.PLOT_ROW_HEIGHT_IN * n_rows * M.PLOT_DPI)
    want_w = round(M.PLOT_WIDTH_IN * M.PLOT_DPI)
    assert data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (want_w, want_h)
    img = matplotlib.image.imread(out)
    assert img.shape[:2] == (want_h, want_w)
    assert img[..., :3].std() > 0  # something was drawn

    with pytest.raises(ValueError, match="absent"):
        M.plot_metrics(records, tmp_path / "none.png", keys=("absent",))
