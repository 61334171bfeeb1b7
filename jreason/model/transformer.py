"""The decoder: `logits, cache = model.apply(params, tokens, positions, cache, segment_ids)`.

Flax NNX modules are used functionally: `init_model` splits the module once into a static
graphdef (kept in `Model`) and a plain nested dict of arrays (`params`), and every call merges
them back inside whatever jitted function calls it. The params dict is what optax, orbax, the
HF converter and the sharding rules see.

The L decoder layers are stored stacked (each leaf has a leading L axis) and, for training, run
with `jax.lax.scan`, so compile time does not grow with depth and one remat policy applies per
layer. With a KV cache (prefill, decode) they run unrolled over per-layer params and per-layer
cache buffers instead (`unstack_layers`, `unrolled_layers`): decode is bound by reading weights
once per token, and a scan's per-layer slices of stacked weights are copies on XLA:CPU.

Two ways to call it:
- training: `cache=None`, packed rows with `segment_ids` (0 = padding) and per-document
  `positions`; attention never crosses documents.
- inference: a cache from `init_cache`; prefill T tokens or decode T=1 per row, each row at its
  own positions (see kv_cache.py for why slot index == position).
Out of scope here: sampling (decode/), losses (train/), recurrent depth (recurrent.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jreason.model import kv_cache, vocab_head
from jreason.model.attention import attention, cached_attention, make_mask
from jreason.model.config import ModelConfig
from jreason.model.layers import (
    MLP,
    RMSNorm,
    apply_rope,
    dense,
    dense_t,
    param,
    rope_frequencies,
    rope_tables,
)

REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        pd, std = cfg.param_dtype, cfg.init_std
        self.q_proj = param(rngs, (D, N, H), ("embed", "q_heads", "head_dim"), pd, std)
        self.k_proj = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), pd, std)
        self.v_proj = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), pd, std)
        self.o_proj = param(rngs, (N, H, D), ("q_heads", "head_dim", "embed"), pd, std)
        if cfg.qkv_bias:
            self.q_bias = param(rngs, (N, H), ("q_heads", "head_dim"), pd, 0)
            self.k_bias = param(rngs, (K, H), ("kv_heads", "head_dim"), pd, 0)
            self.v_bias = param(rngs, (K, H), ("kv_heads", "head_dim"), pd, 0)
        if cfg.o_bias:
            self.o_bias = param(rngs, (D,), ("embed",), pd, 0)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(H, cfg.norm_eps, pd, axis_name="head_dim", rngs=rngs)
            self.k_norm = RMSNorm(H, cfg.norm_eps, pd, axis_name="head_dim", rngs=rngs)
        self.cfg = cfg

    def __call__(self, x_btd, positions_bt, mask_bts, rope, kv=None):
        cfg, dt = self.cfg, x_btd.dtype
        # fused decode layouts (fuse_projections): k_proj zero-sized on its kv-heads axis, the
        # second one as stored, the first one output-major
        out_major = self.k_proj.shape[0] == 0
        mm = dense_t if out_major else dense
        if out_major or self.k_proj.shape[1] == 0:  # one matmul for q, k and v
            N, K = cfg.n_heads, cfg.n_kv_heads
            qkv_btch = mm(x_btd, self.q_proj[...].astype(dt))  # BTD,DCH|CHD->BTCH, C = N+2K
            if cfg.qkv_bias:
                qkv_btch = qkv_btch + self.q_bias[...].astype(dt)
            q_btnh, k_btkh, v_btkh = jnp.split(qkv_btch, [N, N + K], axis=2)
        else:
            q_btnh = dense(x_btd, self.q_proj[...].astype(dt))  # BTD,DNH->BTNH
            k_btkh = dense(x_btd, self.k_proj[...].astype(dt))  # BTD,DKH->BTKH
            v_btkh = dense(x_btd, self.v_proj[...].astype(dt))  # BTD,DKH->BTKH
            if cfg.qkv_bias:
                q_btnh = q_btnh + self.q_bias[...].astype(dt)
                k_btkh = k_btkh + self.k_bias[...].astype(dt)
                v_btkh = v_btkh + self.v_bias[...].astype(dt)
        if cfg.qk_norm:
            q_btnh, k_btkh = self.q_norm(q_btnh), self.k_norm(k_btkh)
        q_btnh, k_btkh = apply_rope(q_btnh, rope), apply_rope(k_btkh, rope)
        if kv is None:
            new_kv = None
            out_btnh = attention(q_btnh, k_btkh, v_btkh, mask_bts, impl=cfg.attention_impl)
        elif q_btnh.shape[1] == 1 or cfg.attention_impl == "reference":
            # decode: batched matmuls straight on the cache layout (kv_cache.py)
            new_kv = kv_cache.write(kv, k_btkh, v_btkh, positions_bt)
            k_bkhs, v_bksh = new_kv["k"], new_kv["v"]
            S_read = mask_bts.shape[-1]  # Decoder's attend_len: read only the first S_read slots
            if k_bkhs.shape[-1] > S_read:
                k_bkhs, v_bksh = k_bkhs[..., :S_read], v_bksh[:, :, :S_read]
            k_bkhs, v_bksh = k_bkhs.astype(dt), v_bksh.astype(dt)
            out_btnh = cached_attention(q_btnh, k_bkhs, v_bksh, mask_bts)
        else:
            # prefill / extend: the configured (e.g. fused cuDNN) kernel on (B, S, K, H) views
            new_kv = kv_cache.write(kv, k_btkh, v_btkh, positions_bt)
            keys_bskh = new_kv["k"].astype(dt).transpose(0, 3, 1, 2)
            values_bskh = new_kv["v"].astype(dt).transpose(0, 2, 1, 3)
            out_btnh = attention(q_btnh, keys_bskh, values_bskh, mask_bts, impl=cfg.attention_impl)
        out_btd = mm(out_btnh, self.o_proj[...].astype(dt), n_in=2)  # BTNH,NHD|DNH->BTD
        if cfg.o_bias:
            out_btd = out_btd + self.o_bias[...].astype(dt)
        return out_btd, new_kv


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x_btd, positions_bt, mask_bts, rope, kv=None):
        h_btd, kv = self.attn(self.attn_norm(x_btd), positions_bt, mask_bts, rope, kv)
        x_btd = x_btd + h_btd
        x_btd = x_btd + self.mlp(self.mlp_norm(x_btd))
        return x_btd, kv


def _stacked_blocks(cfg: ModelConfig, key) -> Block:
    """One Block whose every parameter has a leading L axis (built by vmapping the init)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Block(cfg, rngs=nnx.Rngs(0))))
    keys = jax.random.split(key, cfg.n_layers)
    stacked = jax.vmap(lambda k: nnx.split(Block(cfg, rngs=nnx.Rngs(params=k)))[1])(keys)
    return nnx.merge(graphdef, stacked)


def scan_layers(layers: Block, x_btd, positions_bt, mask_bts, rope, remat: str, scan: bool = True):
    """Training and cache-free forwards: `lax.scan` over the stacked layers, or (scan=False) a
    Python loop over static slices of them (`ModelConfig.scan_layers`)."""
    graphdef, state = nnx.split(layers)

    def body(x_btd, layer_state):
        return nnx.merge(graphdef, layer_state)(x_btd, positions_bt, mask_bts, rope)[0], None

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    if scan:
        return jax.lax.scan(body, x_btd, state)[0]
    for i in range(jax.tree.leaves(state)[0].shape[0]):
        x_btd = body(x_btd, jax.tree.map(lambda a, i=i: a[i], state))[0]
    return x_btd


def unrolled_layers(layers: Block, layer_params, x_btd, positions_bt, mask_bts, rope, cache):
    """Inference: a Python loop over layers, each with its own params and cache buffers.

    Decode reads every weight once per token, so how a layer's weights are reached matters
    more than compile time: on XLA:CPU a scan's dynamic slice (or a static slice) of stacked
    weights copies them every step (3x the cost of the 2-core decode step at 100M params).
    `layer_params` are per-layer dicts (`unstack_layers`); without them the stacked ones are
    sliced here, which is correct but pays that copy.
    """
    graphdef, state = nnx.split(layers)
    if layer_params is None:
        layer_params = [jax.tree.map(lambda a, i=i: a[i], state) for i in range(len(cache))]
    new_cache = []
    for lp, kv in zip(layer_params, cache, strict=True):
        x_btd, kv = nnx.merge(graphdef, lp)(x_btd, positions_bt, mask_bts, rope, kv)
        new_cache.append(kv)
    return x_btd, new_cache


# Smallest d_model whose decode layout is output-major on CPU (unstack_layers). Engine decode,
# 32 + 128 tokens, output-major / (in, out) at batch 1 and 16: d 768 (the 100M model) 1.03x and
# 1.22x (319 -> 388 tok/s; 349 with the stored head), d 512 (8 layers) 1.04x / 1.03x, d 256
# 0.99x / 0.93x, d 128 (the demo model, one XLA:CPU thread) 0.85x at batch 16.
OUT_MAJOR_MIN_D = 512


def unstack_layers(params, out_major: bool | None = None) -> dict:
    """params with `layers` as a list of L per-layer dicts, projections fused: what the decode
    engine runs on.

    `out_major` (default: on CPU from d_model OUT_MAJOR_MIN_D) stores every projection
    output-major (`fuse_projections`) and adds the head that way, `head_vd` (V, D): the
    embedding itself when tied, so a tied head costs no copy. On XLA:CPU the 100M model's
    16-row decode step reads its (D, V) head in 9.0 ms and `head_vd` in 6.6 ms (1-row steps:
    the same). Otherwise a tied head on CPU gets a (D, V) copy, `head_dv`: XLA:CPU transposes
    the embedding into a copy on every call (4% of the demo model's decode step, 0.748 ->
    0.719 ms at batch 16). On GPU and TPU a transposed operand is free, so the stored layout
    is kept there. Params already unstacked are returned as they are, whatever `out_major`."""
    layers = params["layers"]
    if isinstance(layers, list):
        return params
    on_cpu = jax.default_backend() == "cpu"
    if out_major is None:
        out_major = on_cpu and params["embed"].shape[-1] >= OUT_MAJOR_MIN_D
    n = jax.tree.leaves(layers)[0].shape[0]
    out = {
        **params,
        "layers": [
            fuse_projections(jax.tree.map(lambda a, i=i: a[i], layers), out_major) for i in range(n)
        ],
    }
    if out_major:
        out["head_vd"] = params["lm_head"].T if "lm_head" in params else params["embed"]
    elif on_cpu and "lm_head" not in params:
        out["head_dv"] = params["embed"].T
    return out


def fuse_projections(layer: dict, out_major: bool = False) -> dict:
    """One layer's params with q/k/v concatenated into `q_proj` and gate/up into `gate_proj`.

    Decode runs at a handful of rows, where XLA:CPU pays a fixed ~85 us per matmul call (most of
    a small model's step), so 7 projection matmuls per layer become 4. `k_proj`, `v_proj` and
    `up_proj` are left zero-sized on their output axis (kv heads, F): the marker Attention and
    MLP read to take the fused path.

    `out_major` stores the four remaining weights with their output axes first and their input
    axes last, (out, in) like torch's Linear, and the markers in that order too (k_proj
    (0, H, D), up_proj (0, D)); the layers then multiply with `dense_t`. XLA:CPU (YNNPACK) runs
    16-row products of a weight read that way faster than of the (in, out) one: a 12-layer chain
    of the 100M model's decode matmuls takes 43.3 ms from (in, out) and 31-34 ms output-major
    (torch, (out, in): 37.6 ms); at 1 row the two are within noise.
    """
    attn, mlp = dict(layer["attn"]), dict(layer["mlp"])
    for name, others in (("q_proj", ("k_proj", "v_proj")), ("q_bias", ("k_bias", "v_bias"))):
        if name in attn:
            parts = [attn[name], *(attn[o] for o in others)]
            attn[name] = jnp.concatenate(parts, axis=-2)  # the heads axis
            for o in others:
                attn[o] = parts[0][..., :0, :]
    for name, other in (("gate_proj", "up_proj"), ("gate_bias", "up_bias")):
        if name in mlp:
            mlp[name] = jnp.concatenate([mlp[name], mlp[other]], axis=-1)
            mlp[other] = mlp[name][..., :0]
    if out_major:
        attn["q_proj"] = jnp.moveaxis(attn["q_proj"], 0, -1)  # DCH -> CHD
        attn["o_proj"] = jnp.moveaxis(attn["o_proj"], -1, 0)  # NHD -> DNH
        for o in ("k_proj", "v_proj"):
            attn[o] = attn[o].transpose(1, 2, 0)  # (D, 0, H) -> (0, H, D)
        mlp["gate_proj"], mlp["down_proj"] = mlp["gate_proj"].T, mlp["down_proj"].T
        mlp["up_proj"] = mlp["up_proj"].T  # (0, D)
    return {**layer, "attn": attn, "mlp": mlp}


class Decoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        V, D, pd = cfg.vocab_size, cfg.d_model, cfg.param_dtype
        self.embed = param(rngs, (V, D), ("vocab", "embed"), pd, cfg.init_std)
        self.layers = _stacked_blocks(cfg, rngs.params())
        self.final_norm = RMSNorm(D, cfg.norm_eps, pd, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (D, V), ("embed", "vocab"), pd, cfg.init_std)
        self.cfg = cfg

    def embed_tokens(self, tokens_bt):
        return jnp.take(self.embed[...], tokens_bt, axis=0).astype(self.cfg.dtype)

    def head_weight(self):
        """The output projection (D, V): the embedding's transpose when tied."""
        return self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]

    def logits(self, h_btd, w_dv=None, w_vd=None):
        """Final-norm'd hidden states -> float32 logits (the head given apart, if it is:
        `w_dv` (D, V) or output-major `w_vd` (V, D); unstack_layers)."""
        if w_vd is not None:
            return vocab_head.logits_t(h_btd, w_vd)
        return vocab_head.logits(h_btd, self.head_weight() if w_dv is None else w_dv)

    def __call__(
        self,
        tokens_bt,
        positions_bt,
        cache=None,
        segment_ids_bt=None,
        *,
        inputs_embeds_btd=None,
        return_hidden: bool = False,
        head: bool = True,
        layer_params=None,
        head_dv=None,
        head_vd=None,
        attend_len: int | None = None,
    ):
        """(logits_btv, cache); `return_hidden` adds the final-norm'd h_btd; `head=False`
        returns (h_btd, cache) instead, for losses that apply the head chunk by chunk
        (vocab_head.py). `attend_len` (static; one-token decode with a cache): attention reads
        only the cache's first attend_len slots, which must hold every position the queries
        see; writes still reach the whole cache."""
        cfg = self.cfg
        x_btd = self.embed_tokens(tokens_bt) if inputs_embeds_btd is None else inputs_embeds_btd
        x_btd = x_btd.astype(cfg.dtype)
        B = x_btd.shape[0]
        if cache is None:
            kv_positions_bs, kv_segments_bs = positions_bt, segment_ids_bt
        else:
            if segment_ids_bt is not None:
                raise ValueError("segment_ids are for packed training rows; not with a cache")
            if attend_len is not None and tokens_bt.shape[1] > 1:
                raise ValueError(
                    f"attend_len={attend_len} is for one-token decode steps, got "
                    f"{tokens_bt.shape[1]} tokens per row"
                )
            S = kv_cache.cache_len(cache) if attend_len is None else attend_len
            kv_positions_bs = jnp.broadcast_to(jnp.arange(S, dtype=positions_bt.dtype), (B, S))
            kv_segments_bs = None
        mask_bts = make_mask(
            positions_bt,
            kv_positions_bs,
            q_segment_ids_bt=segment_ids_bt,
            kv_segment_ids_bs=kv_segments_bs,
            sliding_window=cfg.sliding_window,
        )
        rope = rope_tables(positions_bt, *rope_frequencies(cfg.rope, cfg.head_dim, cfg.max_seq_len))
        if cache is None and layer_params is None:
            x_btd = scan_layers(
                self.layers, x_btd, positions_bt, mask_bts, rope, cfg.remat, cfg.scan_layers
            )
        else:
            kv = cache if cache is not None else [None] * cfg.n_layers
            x_btd, cache = unrolled_layers(
                self.layers, layer_params, x_btd, positions_bt, mask_bts, rope, kv
            )
            cache = cache if cache[0] is not None else None
        h_btd = self.final_norm(x_btd)
        if not head:
            return h_btd, cache
        logits_btv = self.logits(h_btd, head_dv, head_vd)
        if return_hidden:
            return logits_btv, cache, h_btd
        return logits_btv, cache


@dataclasses.dataclass(frozen=True)
class Model:
    """The static half of a split Decoder; `apply` takes the params as a plain pytree."""

    cfg: ModelConfig
    graphdef: Any

    def module(self, params) -> Decoder:
        return nnx.merge(self.graphdef, params)

    def apply(self, params, tokens_bt, positions_bt, cache=None, segment_ids_bt=None, **kw):
        """`params` as stored (stacked layers) or from `unstack_layers` (the decode layout)."""
        if isinstance(params["layers"], list):
            # the module is built on layer 0 only for its structure; the layers run from the list
            kw["layer_params"] = params["layers"]
            params = {**params, "layers": params["layers"][0]}
            for name in ("head_dv", "head_vd"):
                if name in params:
                    kw[name] = params.pop(name)
        return self.module(params)(tokens_bt, positions_bt, cache, segment_ids_bt, **kw)

    # -- what the decode engine needs of a model (RecurrentModel has the same methods) ---------

    def init_cache(self, batch: int, max_len: int, dtype=None) -> list[dict]:
        return kv_cache.init_cache(self.cfg, batch, max_len, dtype)

    @staticmethod
    def cache_len(cache) -> int:
        return kv_cache.cache_len(cache)

    @staticmethod
    def cache_batch_axes(cache):
        """The batch (slot) axis of every cache array: 0 throughout."""
        return jax.tree.map(lambda _: 0, cache)

    @staticmethod
    def decode_params(params):
        """The layout the cached forward reads fastest (per-layer weights; see unstack_layers)."""
        return unstack_layers(params)

    def head_weight(self, params):
        """The (D, V) output projection of `params` (stored or any decode layout)."""
        if "head_dv" in params:
            return params["head_dv"]
        if "head_vd" in params:
            return params["head_vd"].T
        return params["embed"].T if self.cfg.tie_embeddings else params["lm_head"]

    def apply_at(self, params, tokens_bt, positions_bt, cache, index_b):
        """(logits_bv float32 at position index_b[b] of each row, cache): a prefill needs only
        each row's last logits, and T x V of them (4096 x 152k fp32 = 2.5 GB for a Qwen2
        vocabulary) would dwarf the model step; the head runs on the B gathered rows."""
        h_btd, cache = self.apply(params, tokens_bt, positions_bt, cache, head=False)
        h_bd = jnp.take_along_axis(h_btd, index_b[:, None, None], axis=1)[:, 0]
        if "head_vd" in params:
            return vocab_head.logits_t(h_bd, params["head_vd"]), cache
        return vocab_head.logits(h_bd, self.head_weight(params)), cache

    def token_stats(self, params, tokens_bt, positions_bt, segment_ids_bt, targets_bt, **kw):
        """Training forward -> vocab_head.token_stats of `targets_bt` (chunked by the config's
        `logits_chunk`, so full logits are never materialized when it is set)."""
        h_btd, _ = self.apply(params, tokens_bt, positions_bt, None, segment_ids_bt, head=False)
        w_dv = self.head_weight(params)
        return vocab_head.token_stats(h_btd, w_dv, targets_bt, chunk=self.cfg.logits_chunk, **kw)


def _split(decoder: nnx.Module):
    graphdef, state = nnx.split(decoder)
    return graphdef, nnx.to_pure_dict(state)


def init_params(cfg: ModelConfig, key):
    """Random params as a plain nested dict (jit this with out_shardings to init sharded)."""
    return _split(Decoder(cfg, rngs=nnx.Rngs(params=key)))[1]


def abstract_model(cfg: ModelConfig) -> tuple[Model, Any]:
    """(Model, params as ShapeDtypeStructs): the target of a checkpoint or HF load."""
    graphdef, params = _split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    return Model(cfg, graphdef), params


def init_model(cfg: ModelConfig, key=None, *, mesh=None) -> tuple[Model, Any]:
    """(Model, random params); with a mesh the params are created already sharded."""
    model, shapes = abstract_model(cfg)
    init = functools.partial(init_params, cfg)
    return model, init_sharded(init, shapes, lambda: param_axes(cfg), key, mesh)


def init_sharded(init, shapes, axes, key=None, mesh=None):
    """`init(key)` jitted, its params created with the shardings of `axes()` on `mesh` (shared by
    every model family: transformer.py, recurrent.py)."""
    from jreason import sharding

    key = jax.random.key(0) if key is None else key
    out_shardings = None if mesh is None else sharding.param_shardings(axes(), mesh, shapes)
    return jax.jit(init, out_shardings=out_shardings)(key)


def param_axes(cfg: ModelConfig) -> dict:
    """Logical axis names of every parameter, as a dict mirroring params."""
    decoder = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    _, state = nnx.split(decoder)

    def axes(path, var):
        names = tuple(var.get_metadata()["axes"])
        # Stacked layers carry a leading L axis that the per-layer init did not name.
        return ("layers", *names) if path[0] == "layers" else names

    flat = nnx.to_flat_state(state)
    out: dict = {}
    for path, var in flat:
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = axes(path, var)
    return out
