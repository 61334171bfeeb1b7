"""Building blocks of the decoder: parameters with logical axes, RMSNorm, rotary embeddings, MLP.

Every parameter carries logical axis names (`axes=("embed", "mlp")`) as NNX metadata; the one
rules table in `jreason.sharding` turns them into mesh shardings, so no layer knows the mesh.
Weights are stored in `param_dtype` and cast to the compute `dtype` where they are used; norms,
softmax and rotary angles are computed in float32 whatever the compute dtype (as Hugging Face
does), which is what keeps bf16 logits close to the reference.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jreason.model.config import ModelConfig, RopeConfig


def param(rngs: nnx.Rngs, shape, axes, dtype, std: float | None) -> nnx.Param:
    """A parameter with logical axis names; std=None means ones (norm scales), 0 means zeros."""
    assert len(shape) == len(axes), (shape, axes)
    if std is None:
        value = jnp.ones(shape, dtype)
    elif std == 0:
        value = jnp.zeros(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, axes=tuple(axes))


def dense(x, w, n_in: int = 1, preferred_element_type=None):
    """x (..., *in) @ w (*in, *out) -> (..., *out), computed as one 2-D matmul.

    Equivalent to the einsum it replaces (e.g. 'BTD,DNH->BTNH'), but XLA:CPU runs the weight
    gradient of a contraction over several dims (B and T) about 1.7x slower than a plain 2-D
    matmul; flattening is free on TPU/GPU, where XLA canonicalizes to the same dot anyway.
    """
    lead, in_shape, out_shape = x.shape[: x.ndim - n_in], w.shape[:n_in], w.shape[n_in:]
    k = math.prod(in_shape)
    y = jnp.matmul(
        x.reshape(-1, k), w.reshape(k, -1), preferred_element_type=preferred_element_type
    )
    return y.reshape(*lead, *out_shape)


def dense_t(x, w_out_in, n_in: int = 1, preferred_element_type=None):
    """x (..., *in) @ w (*out, *in) contracted on the weight's last n_in axes -> (..., *out).

    The same product as `dense` for a weight stored output-major (torch's Linear layout), which
    the fused decode layout uses on XLA:CPU (transformer.fuse_projections). It is computed as
    w @ x.T, transposed back: with the weight as the right operand (x @ w.T) XLA:CPU fused a
    transposing copy of the whole weight into every 1-row decode matmul (the 100M model's
    batch-1 decode: 57 -> 40 tok/s); as the left operand it reads the weight in place.
    """
    lead, in_shape = x.shape[: x.ndim - n_in], w_out_in.shape[w_out_in.ndim - n_in :]
    out_shape, k = w_out_in.shape[: w_out_in.ndim - n_in], math.prod(in_shape)
    w_oi, x_ri = w_out_in.reshape(-1, k), x.reshape(-1, k)
    y = jnp.matmul(w_oi, x_ri.T, preferred_element_type=preferred_element_type).T
    return y.reshape(*lead, *out_shape)


def rms_normalize(x, eps: float):
    """x / rms(x) over the last axis, computed in float32, returned in x's dtype (no scale)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return x32.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype, *, axis_name: str = "norm", rngs):
        self.scale = param(rngs, (dim,), (axis_name,), param_dtype, None)
        self.eps = eps

    def __call__(self, x):
        # HF casts back to the input dtype before multiplying by the weight.
        return self.scale[...].astype(x.dtype) * rms_normalize(x, self.eps)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, F, pd, std = cfg.d_model, cfg.d_ff, cfg.param_dtype, cfg.init_std
        self.gate_proj = param(rngs, (D, F), ("embed", "mlp"), pd, std)
        self.up_proj = param(rngs, (D, F), ("embed", "mlp"), pd, std)
        self.down_proj = param(rngs, (F, D), ("mlp", "embed"), pd, std)
        if cfg.mlp_bias:
            self.gate_bias = param(rngs, (F,), ("mlp",), pd, 0)
            self.up_bias = param(rngs, (F,), ("mlp",), pd, 0)
            self.down_bias = param(rngs, (D,), ("embed",), pd, 0)
        self.bias = cfg.mlp_bias

    def __call__(self, x_btd):
        dt = x_btd.dtype
        # fused decode layouts (transformer.fuse_projections): up_proj is zero-sized on its
        # output axis, the last one as stored, the first one output-major
        out_major = self.up_proj.shape[0] == 0
        mm = dense_t if out_major else dense
        if out_major or self.up_proj.shape[-1] == 0:
            gu_btg = mm(x_btd, self.gate_proj[...].astype(dt))  # BTD,D(2F)|(2F)D->BT(2F)
            if self.bias:
                gu_btg = gu_btg + self.gate_bias[...].astype(dt)
            gate_btf, up_btf = jnp.split(gu_btg, 2, axis=-1)
        else:
            gate_btf = dense(x_btd, self.gate_proj[...].astype(dt))  # BTD,DF->BTF
            up_btf = dense(x_btd, self.up_proj[...].astype(dt))  # BTD,DF->BTF
            if self.bias:
                gate_btf = gate_btf + self.gate_bias[...].astype(dt)
                up_btf = up_btf + self.up_bias[...].astype(dt)
        h_btf = jax.nn.silu(gate_btf) * up_btf
        out_btd = mm(h_btf, self.down_proj[...].astype(dt))  # BTF,FD|DF->BTD
        if self.bias:
            out_btd = out_btd + self.down_bias[...].astype(dt)
        return out_btd


# ----------------------------------------------------------------------------------------------
# Rotary embeddings. Frequencies are computed once on the host in float64 numpy (they depend only
# on the config), then the angles per position are computed in float32 inside the jitted step.


def rope_frequencies(rope: RopeConfig, head_dim: int, max_seq_len: int) -> tuple[np.ndarray, float]:
    """Returns (inv_freq of shape (H/2,), attention_factor) following HF's rope_type semantics."""
    dim = head_dim
    # float32 throughout, as the reference computes it: float64 here would shift the angles at
    # long positions by more than the parity tolerance.
    inv_freq = (1.0 / (rope.theta ** (np.arange(0, dim, 2).astype(np.float32) / dim))).astype(
        np.float32
    )
    if rope.type == "default":
        return inv_freq.astype(np.float32), 1.0
    if rope.type == "linear":
        return (inv_freq / rope.factor).astype(np.float32), 1.0
    original = rope.original_max_position_embeddings or max_seq_len
    if rope.type == "llama3":
        low_wavelen = original / rope.low_freq_factor
        high_wavelen = original / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (original / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    if rope.type == "yarn":
        factor = rope.factor
        attention_factor = rope.attention_factor
        if attention_factor is None:
            attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

        def correction_dim(num_rotations):
            return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (
                2 * math.log(rope.theta)
            )

        low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
        if rope.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # avoid a division by zero, as the reference does
        # The ramp is computed in float32 in the reference; keep that to match it bit for bit.
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        pos_freqs = rope.theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
        extrapolation = 1.0 / pos_freqs
        interpolation = 1.0 / (factor * pos_freqs)
        keep = 1 - ramp
        inv = interpolation * (1 - keep) + extrapolation * keep
        return inv.astype(np.float32), float(attention_factor)
    raise ValueError(
        f"rope.type: unknown rope type {rope.type!r}; supported: default, linear, llama3, yarn"
    )


def rope_tables(positions_bt, inv_freq_h: np.ndarray, attention_factor: float):
    """(cos_bt1h, sin_bt1h) float32 at `positions_bt`, made once per forward pass for every
    layer's `apply_rope`.

    Left to itself, XLA fuses a copy of the cos/sin evaluation into each layer's q and k
    rotation (2L copies; ~5 us each on XLA:CPU, 5-10% of the demo model's decode step), and it
    drops optimization barriers before fusion. A conditional's result is materialized once, so
    the tables are made in a `lax.cond` whose branches are the same computation: the predicate
    only has to be unknown at compile time.
    """

    def make():
        angles_bth = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_h)
        cos_bt1h = (jnp.cos(angles_bth) * attention_factor)[:, :, None, :]
        sin_bt1h = (jnp.sin(angles_bth) * attention_factor)[:, :, None, :]
        return cos_bt1h, sin_bt1h

    return jax.lax.cond(jnp.any(positions_bt > 0), make, make)


def apply_rope(x_btnh, tables):
    """Rotates pairs (i, i + H/2) of each head ("rotate_half" layout, as in HF Llama/Qwen) by
    the angles of `rope_tables`."""
    dtype = x_btnh.dtype
    # HF casts cos/sin to the activation dtype before rotating.
    cos_bt1h, sin_bt1h = (t.astype(dtype) for t in tables)
    x1, x2 = jnp.split(x_btnh, 2, axis=-1)
    return jnp.concatenate([x1 * cos_bt1h - x2 * sin_bt1h, x2 * cos_bt1h + x1 * sin_bt1h], axis=-1)
