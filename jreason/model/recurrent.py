"""Recurrent depth (Geiping et al. 2025, "Huginn"): a prelude, a core iterated r times, a coda.

    e    = prelude(embed(tokens))                          P layers, once
    s_0  ~ TruncNormal(0, std^2, +-3 std)                  random initial latent state
    s_i  = norm(core(adapter(concat(s_{i-1}, e))))         R layers, i = 1..r, e injected each time
    logits = lm_head(final_norm(coda(s_r)))                C layers, once

All three sections are the decoder's own `Block` stacked like `transformer._stacked_blocks`, so
attention, MLP, rope and masks are the code every other model here runs. What is new:

- `core.norm`: the paper's blocks are "sandwich" normed, so its state leaves every iteration
  normalized; our Blocks are pre-norm and their residual stream grows with each pass, so one
  RMSNorm after the core restores that (a state whose scale drifts could never converge, and
  convergence is what the exit rule below measures).
- Depth is a runtime value. Training samples it per step from the paper's distribution
  (`sample_recurrence`): tau ~ LogNormal(ln(mean) - sigma^2/2, sigma), r ~ Poisson(tau) + 1,
  so E[tau] = mean and E[r] = mean + 1 (the `+ 1` only keeps r >= 1).
- Truncated backprop: only the last k = `backprop_depth` iterations get gradients. The first
  max(r - k, 0) run in a `lax.fori_loop` with a traced trip count (a while loop) on
  stop-gradient'd params, which JAX never differentiates; the last k are a `lax.scan` of static
  length k (unrolled when `scan_layers` is false) whose step j counts (`jnp.where`) iff
  j >= k - min(r, k). r is therefore a traced
  int32 and no value of it ever recompiles the step.
- s_0 is drawn per token from `fold_in(key, position)`: a token's initial state depends on its
  position, not on how the sequence was split into prefill and decode calls, which is what
  makes cached decode reproduce the full forward exactly.

KV cache. `{"prelude": [...], "core": [...], "coda": [...]}`, each a list of per-layer
kv_cache.py dicts; every core layer's leaves carry a leading iteration axis of size
`max_recurrence` (one cache per iteration index, as in the paper), so the query of iteration i
attends to the keys of iteration i of earlier tokens. With fixed r, cached decode is exactly the
uncached forward. A token that stops at r_t < max_recurrence (a smaller fixed r, or an adaptive
exit) has its entries for iterations > r_t filled with its latest computed iteration's K/V
("reuse the latest computed iteration"): each iteration first copies the chunk's entries from
iteration i-1, and a stopped token's own write is dropped by giving it the out-of-range slot S
(kv_cache.write's mode="drop"). So any later token, running any number of iterations, and any
token of the same chunk still iterating, attends to something defined.

Adaptive exit (`apply_adaptive`, inference only): each token iterates until the KL divergence
KL(p_i || p_{i-1}) between the coda's output distributions of two successive iterates falls
below `exit_threshold` (so a token runs at least 2 iterations), or `max_steps` is reached.
Threshold 0 never exits early: exactly fixed r = max_steps. The per-iteration coda runs only
score the exit; the logits and the coda cache come from one last coda pass on the final states.

The training loss (`recurrent_cross_entropy_loss`) has the trainer's contract
`loss_fn(model, params, mb) -> (loss_sum, aux)`. r and s_0 come from `mb["rng"]` (raw uint32
key data), which train/step.py splits per microbatch from the run's seed and step number, so
every step draws a new depth and a resumed run the same ones; a batch without one (a caller
outside the step) falls back to a hash of its tokens. Either way the key is replicated across
devices: one r per microbatch, as the SPMD while loop needs. A preset YAML marked
`family: recurrent` (configs/models/tiny-recurrent.yaml) is what the SFT trainer builds this
model from (train/setup.py).

Decoding. The engine (decode/slots.py) and the sampler drive any model through `init_cache`,
`cache_len`, `cache_batch_axes` and `decode_params`; `with_depth(r, exit_threshold)` fixes how
deep their cached calls go (fixed r, or adaptive with r as the cap). The cache's `steps` array
records the iterations each position ran, so a caller can report adaptive depth's saving.

Left out: the paper's other exit rules and state inits (zeros, "like-init"), noise injection,
continuous-CoT KV sharing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jreason import config as config_lib
from jreason.model import kv_cache, vocab_head
from jreason.model.attention import make_mask
from jreason.model.config import ModelConfig, RopeConfig
from jreason.model.layers import (
    RMSNorm,
    dense,
    param,
    rms_normalize,
    rope_frequencies,
    rope_tables,
)
from jreason.model.transformer import (
    _split,
    _stacked_blocks,
    init_sharded,
    scan_layers,
    unrolled_layers,
)


@dataclasses.dataclass(frozen=True)
class RecurrentConfig:
    # The per-layer architecture, as in ModelConfig.
    vocab_size: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    # The marker a preset YAML carries (`family: recurrent`) so the trainer builds this config
    # and this model rather than a ModelConfig decoder (train/setup.py).
    family: Literal["recurrent"] = "recurrent"
    head_dim: int | None = None
    norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_seq_len: int = 4096
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    sliding_window: int | None = None
    init_std: float = 0.02
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attention_impl: Literal["reference", "xla", "cudnn"] = "xla"
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    scan_layers: bool = True
    # Sections (the paper's Huginn-3.5B: 2 / 4 / 2).
    n_prelude: int = 2
    n_core: int = 4
    n_coda: int = 2
    # Training depth r ~ Poisson(LogNormal(ln(mean) - sigma^2/2, sigma)) + 1; gradients flow
    # through the last backprop_depth iterations only.
    mean_recurrence: int = 32
    sigma: float = 0.5
    backprop_depth: int = 8
    # Inference: size of the core cache's iteration axis and adaptive exit's cap and threshold.
    max_recurrence: int = 64
    exit_threshold: float = 1e-3
    # std of the random initial state (truncated at +-3 std); None -> init_std, as the paper.
    state_init_std: float | None = None
    # Scale-free RMS normalization of e before it is injected. The paper's sandwich-normed,
    # sqrt(D)-scaled embeddings make e O(1) like the state; our pre-norm prelude leaves e at
    # the residual stream's init scale (~0.05 RMS) next to a unit-RMS state, so the adapter
    # would first have to learn a ~20x gain on its e half before the input mattered.
    inject_norm: bool = False
    # Adapter init. "normal": N(0, init_std^2) like every weight. "sum": that plus [I; I], so at
    # init u = s + e, a residual recurrence through which the token's embedding reaches every
    # iterate and the coda (additive injection, as looped transformers use). From scratch a
    # tiny model with "normal" starts from a random mix of state and input and takes far
    # longer to learn even to copy tokens (RESULTS.md, recurrent depth demo).
    adapter_init: Literal["normal", "sum"] = "normal"

    def __post_init__(self):
        # The Block fields are validated (and head_dim filled in) by ModelConfig itself.
        block = ModelConfig(**{f: getattr(self, f) for f in _BLOCK_FIELDS}, n_layers=1)
        object.__setattr__(self, "head_dim", block.head_dim)
        for name in (
            "n_prelude",
            "n_core",
            "n_coda",
            "mean_recurrence",
            "backprop_depth",
            "max_recurrence",
        ):
            if getattr(self, name) < 1:
                raise config_lib.ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.sigma < 0:
            raise config_lib.ConfigError(f"sigma: must be >= 0, got {self.sigma}")
        if self.exit_threshold < 0:
            raise config_lib.ConfigError(
                f"exit_threshold: must be >= 0 (0 = never exit early), got {self.exit_threshold}"
            )
        if self.adapter_init not in ("normal", "sum"):
            raise config_lib.ConfigError(
                f"adapter_init: must be 'normal' or 'sum', got {self.adapter_init!r}"
            )
        if self.state_init_std is not None and self.state_init_std <= 0:
            raise config_lib.ConfigError(
                f"state_init_std: must be > 0 (or null for init_std), got {self.state_init_std}"
            )

    def block_config(self, n_layers: int) -> ModelConfig:
        """The ModelConfig of one section: what `Block` and the layer runners read."""
        return ModelConfig(**{f: getattr(self, f) for f in _BLOCK_FIELDS}, n_layers=n_layers)

    @property
    def n_params(self) -> int:
        """Parameter count: the three sections' Blocks, embeddings, adapter (2D x D), 2 norms."""
        blocks = self.block_config(self.n_prelude + self.n_core + self.n_coda)
        return blocks.n_params + 2 * self.d_model * self.d_model + self.d_model

    @property
    def state_std(self) -> float:
        return self.init_std if self.state_init_std is None else self.state_init_std

    def replace(self, **kw) -> RecurrentConfig:
        return dataclasses.replace(self, **kw)


# ModelConfig fields a RecurrentConfig passes through to its Blocks: every one it shares, so the
# two cannot drift apart (n_layers is per section; `family` is the preset marker only)
_BLOCK_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(RecurrentConfig)
    if f.name in {g.name for g in dataclasses.fields(ModelConfig)} - {"n_layers", "family"}
)


def load_recurrent_config(path, overrides: list[str] = ()) -> RecurrentConfig:
    """A YAML file (+ `key=value` overrides) -> RecurrentConfig."""
    return config_lib.load(RecurrentConfig, path, overrides)


# ----------------------------------------------------------------------------------------------
# Depth sampling and the initial state.


def sample_recurrence(key, mean, sigma):
    """r ~ Poisson(tau) + 1, tau ~ LogNormal(ln(mean) - sigma^2/2, sigma): a traced int32 >= 1.

    The -sigma^2/2 makes E[tau] = mean, hence E[r] = mean + 1 and
    Var[r] = mean + mean^2 (exp(sigma^2) - 1).
    """
    k_tau, k_r = jax.random.split(key)
    mu = jnp.log(jnp.asarray(mean, jnp.float32)) - 0.5 * jnp.square(sigma)
    tau = jnp.exp(mu + sigma * jax.random.normal(k_tau, (), jnp.float32))
    return jax.random.poisson(k_r, tau, dtype=jnp.int32) + 1


def initial_state(key, positions_bt, d_model: int, std: float, dtype):
    """s_0 (B, T, D): truncated normal (+-3 std) from `fold_in(key, position)`, per token."""

    def one(p):
        return jax.random.truncated_normal(jax.random.fold_in(key, p), -3.0, 3.0, (d_model,))

    s_btd = jax.vmap(jax.vmap(one))(positions_bt) * std
    return s_btd.astype(dtype)


def _as_key(key):
    """A typed PRNG key from a typed key or raw uint32 key data (a batch field)."""
    if key is None:
        return jax.random.key(0)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


# ----------------------------------------------------------------------------------------------
# The modules.


class Core(nnx.Module):
    """One recurrence step: s -> norm(layers(adapter(concat(s, e))))."""

    def __init__(self, cfg: RecurrentConfig, *, rngs: nnx.Rngs):
        D, pd = cfg.d_model, cfg.param_dtype
        # Input dim 2D (state then embedding) split like every weight's D input; output whole.
        self.adapter = param(rngs, (2 * D, D), ("embed", None), pd, cfg.init_std)
        if cfg.adapter_init == "sum":
            eye = jnp.eye(D, dtype=jnp.float32)
            w = self.adapter[...].astype(jnp.float32) + jnp.concatenate([eye, eye])
            self.adapter[...] = w.astype(pd)  # `.value =` is deprecated from flax 0.12.12
        self.layers = _stacked_blocks(cfg.block_config(cfg.n_core), rngs.params())
        self.norm = RMSNorm(D, cfg.norm_eps, pd, rngs=rngs)
        self.remat, self.scan = cfg.remat, cfg.scan_layers

    def __call__(self, s_btd, e_btd, positions_bt, mask_bts, rope, kv=None):
        x_bt2d = jnp.concatenate([s_btd, e_btd], axis=-1)  # (B, T, 2D)
        u_btd = dense(x_bt2d, self.adapter[...].astype(s_btd.dtype))  # BT(2D),(2D)D->BTD
        if kv is None:
            x_btd = scan_layers(
                self.layers, u_btd, positions_bt, mask_bts, rope, self.remat, self.scan
            )
        else:
            x_btd, kv = unrolled_layers(self.layers, None, u_btd, positions_bt, mask_bts, rope, kv)
        return self.norm(x_btd), kv


class RecurrentDecoder(nnx.Module):
    """Embedding, prelude, core, coda, head; `__call__` is the whole forward (see module doc)."""

    def __init__(self, cfg: RecurrentConfig, *, rngs: nnx.Rngs):
        V, D, pd = cfg.vocab_size, cfg.d_model, cfg.param_dtype
        self.embed = param(rngs, (V, D), ("vocab", "embed"), pd, cfg.init_std)
        self.prelude = _stacked_blocks(cfg.block_config(cfg.n_prelude), rngs.params())
        self.core = Core(cfg, rngs=rngs)
        self.coda = _stacked_blocks(cfg.block_config(cfg.n_coda), rngs.params())
        self.final_norm = RMSNorm(D, cfg.norm_eps, pd, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (D, V), ("embed", "vocab"), pd, cfg.init_std)
        self.cfg = cfg

    # -- the pieces, public so a test can assemble its own loop ------------------------------

    def context(self, positions_bt, segment_ids_bt=None, cache=None):
        """(mask_bts, rope): as transformer.Decoder builds them, for packed rows or a cache."""
        cfg = self.cfg
        if cache is None:
            kv_positions_bs, kv_segments_bs = positions_bt, segment_ids_bt
        else:
            if segment_ids_bt is not None:
                raise ValueError("segment_ids are for packed training rows; not with a cache")
            B, S = positions_bt.shape[0], kv_cache.cache_len(cache["prelude"])
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
        return mask_bts, rope

    def encode(self, tokens_bt, positions_bt, mask_bts, rope, cache=None):
        """Embedding + prelude -> (e_btd, prelude cache)."""
        x_btd = jnp.take(self.embed[...], tokens_bt, axis=0).astype(self.cfg.dtype)
        e_btd, cache = self._run(self.prelude, x_btd, positions_bt, mask_bts, rope, cache)
        if self.cfg.inject_norm:
            e_btd = rms_normalize(e_btd, self.cfg.norm_eps)
        return e_btd, cache

    def decode(self, s_btd, positions_bt, mask_bts, rope, cache=None):
        """Coda + final norm + lm_head -> (float32 logits_btv, coda cache)."""
        h_btd, cache = self._run(self.coda, s_btd, positions_bt, mask_bts, rope, cache)
        h_btd = self.final_norm(h_btd)
        w_dv = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
        return vocab_head.logits(h_btd, w_dv), cache

    def _run(self, layers, x_btd, positions_bt, mask_bts, rope, cache):
        if cache is None:
            cfg = self.cfg
            x_btd = scan_layers(
                layers, x_btd, positions_bt, mask_bts, rope, cfg.remat, cfg.scan_layers
            )
            return x_btd, None
        return unrolled_layers(layers, None, x_btd, positions_bt, mask_bts, rope, cache)

    # -- the forwards ------------------------------------------------------------------------

    def __call__(
        self,
        tokens_bt,
        positions_bt,
        cache=None,
        segment_ids_bt=None,
        *,
        num_steps,
        key,
        backprop_depth: int | None = None,
        adaptive: bool = False,
        threshold=None,
    ):
        cfg = self.cfg
        mask_bts, rope = self.context(positions_bt, segment_ids_bt, cache)
        e_btd, prelude_cache = self.encode(
            tokens_bt, positions_bt, mask_bts, rope, None if cache is None else cache["prelude"]
        )
        s_btd = initial_state(_as_key(key), positions_bt, cfg.d_model, cfg.state_std, cfg.dtype)
        if cache is None:
            k = cfg.backprop_depth if backprop_depth is None else backprop_depth
            s_btd = truncated_recurrence(
                self.core, s_btd, e_btd, positions_bt, mask_bts, rope, num_steps, k
            )
            logits_btv, _ = self.decode(s_btd, positions_bt, mask_bts, rope)
            return logits_btv, None, None
        s_btd, core_cache, steps_bt = self._cached_recurrence(
            s_btd,
            e_btd,
            positions_bt,
            mask_bts,
            rope,
            cache,
            limit=num_steps,
            adaptive=adaptive,
            threshold=threshold,
        )
        logits_btv, coda_cache = self.decode(s_btd, positions_bt, mask_bts, rope, cache["coda"])
        rows_b1 = jnp.arange(positions_bt.shape[0])[:, None]
        steps_bs = cache["steps"].at[rows_b1, positions_bt].set(steps_bt, mode="drop")
        new_cache = {
            "prelude": prelude_cache,
            "core": core_cache,
            "coda": coda_cache,
            "steps": steps_bs,
        }
        return logits_btv, new_cache, steps_bt

    def _cached_recurrence(
        self, s_btd, e_btd, positions_bt, mask_bts, rope, cache, *, limit, adaptive, threshold
    ):
        """The core iterated over the cache's iteration axis: a `lax.scan` over i < R.

        Iteration i first copies this chunk's entries of iteration i-1 into iteration i (the
        "latest computed" rule), then, if any token is still running, runs the core on cache
        slice i with stopped tokens writing to the dropped slot S. `limit` caps every token
        at that many iterations; `adaptive` also stops a token once its KL criterion is met.
        Returns (final state, new core cache, iterations used per token (B, T)).
        """
        core_cache = cache["core"]
        S = kv_cache.cache_len(cache["prelude"])
        B, T = positions_bt.shape
        rows_b1 = jnp.arange(B)[:, None]
        R = jax.tree.leaves(core_cache)[0].shape[0]
        limit = jnp.clip(jnp.asarray(limit, jnp.int32), 1, R)

        def copy_latest(prev, cur):
            # advanced indices (rows, positions) lead: both gathers are (B, T, K, H)
            k_btkh = prev["k"][rows_b1, :, :, positions_bt]
            v_btkh = prev["v"][rows_b1, :, positions_bt]
            return kv_cache.write(cur, k_btkh, v_btkh, positions_bt)

        def run(active_bt, operands):
            s_btd, cur, logp_prev = operands
            # stopped: write dropped (rope's tables are positions_bt's; a stopped token's
            # output is discarded below, so only the write position matters)
            write_pos_bt = jnp.where(active_bt, positions_bt, S)
            new_btd, cur = self.core(s_btd, e_btd, write_pos_bt, mask_bts, rope, cur)
            s_btd = jnp.where(active_bt[..., None], new_btd, s_btd)
            if adaptive:
                logits_btv, _ = self.decode(s_btd, positions_bt, mask_bts, rope, cache["coda"])
                logp_prev = jax.nn.log_softmax(logits_btv, axis=-1)
            return s_btd, cur, logp_prev

        def body(carry, xs):
            s_btd, prev, done_bt, steps_bt, logp_prev = carry
            i, cur = xs
            cur = [copy_latest(p, c) for p, c in zip(prev, cur, strict=True)]
            active_bt = ~done_bt
            s_btd, cur, logp = jax.lax.cond(
                active_bt.any(),
                lambda ops: run(active_bt, ops),
                lambda ops: ops,
                (s_btd, cur, logp_prev),
            )
            steps_bt = jnp.where(active_bt, i + 1, steps_bt)
            done_bt = done_bt | (i + 1 >= limit)
            if adaptive:
                kl_bt = jnp.sum(jnp.exp(logp) * (logp - logp_prev), axis=-1)
                # threshold 0 never exits, even where rounding makes a KL slightly negative
                converged_bt = (i >= 1) & (threshold > 0) & (kl_bt < threshold)
                done_bt = done_bt | (active_bt & converged_bt)
            return (s_btd, cur, done_bt, steps_bt, logp), cur

        prev0 = [jax.tree.map(lambda a: a[0], layer) for layer in core_cache]
        V = self.cfg.vocab_size
        logp0 = jnp.zeros((B, T, V) if adaptive else (), jnp.float32)
        zeros_bt = jnp.zeros((B, T), jnp.int32)
        carry = (s_btd, prev0, zeros_bt.astype(bool), zeros_bt, logp0)
        (s_btd, _, _, steps_bt, _), new_core = jax.lax.scan(
            body, carry, (jnp.arange(R, dtype=jnp.int32), core_cache)
        )
        return s_btd, new_core, steps_bt


def truncated_recurrence(core: Core, s_btd, e_btd, positions_bt, mask_bts, rope, num_steps, k):
    """s_r after r = num_steps (traced) iterations, with gradients through the last k only.

    The first max(r - k, 0) iterations run on stop-gradient'd params and e in a while loop,
    which reverse mode never has to differentiate (no tangent reaches it); the last min(r, k)
    are the active tail of a static length-k scan.
    """
    graphdef, state = nnx.split(core)
    r = jnp.asarray(num_steps, jnp.int32)

    def step(state, s_btd, e_btd):
        return nnx.merge(graphdef, state)(s_btd, e_btd, positions_bt, mask_bts, rope)[0]

    frozen, e_frozen = jax.lax.stop_gradient((state, e_btd))
    s_btd = jax.lax.fori_loop(
        0,
        jnp.maximum(r - k, 0),
        lambda _, s: step(frozen, s, e_frozen),
        jax.lax.stop_gradient(s_btd),
    )
    first_active = k - jnp.minimum(r, k)

    def body(s_btd, j):
        # jnp.where, not lax.cond: r < k is rare at training depths (mean 32, k 8) and a cond
        # under reverse mode compiles noticeably slower for the compute it would save
        return jnp.where(j >= first_active, step(state, s_btd, e_btd), s_btd), None

    # unrolled when the core's layers are (scan_layers false: a small model): a rolled scan
    # stacks each iteration's residuals for the backward pass into (k, ...) buffers with
    # dynamic-update-slices (tiny-recurrent's SFT step 0.83 -> 0.69 s on 2 cores); a large
    # core keeps the rolled scan, which compiles one iteration instead of k
    return jax.lax.scan(body, s_btd, jnp.arange(k), unroll=not core.scan)[0]


# ----------------------------------------------------------------------------------------------
# The functional API.


@dataclasses.dataclass(frozen=True)
class RecurrentModel:
    """The static half of a split RecurrentDecoder; `apply` takes the params as a plain pytree.

    `decode_steps` / `exit_threshold` set the depth of cached calls that do not pass num_steps,
    which is how the decode engine runs it (`with_depth`): fixed r, or adaptive exit when a
    threshold is set. The engine needs nothing else beyond the cache methods below.
    """

    cfg: RecurrentConfig
    graphdef: Any
    decode_steps: int | None = None  # None: cfg.mean_recurrence
    exit_threshold: float | None = None  # set: adaptive exit, up to decode_steps

    def with_depth(self, steps: int | None = None, exit_threshold: float | None = None):
        """This model decoding at `steps` core iterations (<= max_recurrence), or adaptively
        (KL between successive iterates < exit_threshold) with `steps` as the cap."""
        steps = steps if steps is not None else self.cfg.mean_recurrence
        if not 1 <= steps <= self.cfg.max_recurrence:
            raise ValueError(
                f"recurrence: {steps} is outside [1, max_recurrence={self.cfg.max_recurrence}]"
            )
        if exit_threshold is not None and exit_threshold < 0:
            raise ValueError(f"exit_threshold: must be >= 0, got {exit_threshold}")
        return dataclasses.replace(self, decode_steps=steps, exit_threshold=exit_threshold)

    def init_cache(self, batch: int, max_len: int, dtype=None):
        return init_recurrent_cache(self.cfg, batch, max_len, dtype)

    @staticmethod
    def cache_len(cache) -> int:
        return kv_cache.cache_len(cache["prelude"])

    @staticmethod
    def cache_batch_axes(cache):
        """Slot axis of each cache array: 1 under the core's leading iteration axis, else 0."""
        axes = jax.tree.map(lambda _: 0, cache)
        axes["core"] = jax.tree.map(lambda _: 1, cache["core"])
        return axes

    @staticmethod
    def decode_params(params):
        return params  # the sections' layers run from their stacks (_run's unrolled path)

    def module(self, params) -> RecurrentDecoder:
        return nnx.merge(self.graphdef, params)

    def apply(
        self,
        params,
        tokens_bt,
        positions_bt,
        cache=None,
        segment_ids_bt=None,
        *,
        num_steps=None,
        key=None,
        backprop_depth: int | None = None,
    ):
        """(logits_btv, cache) after a fixed number of core iterations.

        num_steps: r, a Python int or a traced int32 (no recompile); default mean_recurrence.
        With a cache it is clipped to [1, max_recurrence]. key: draws s_0 (a typed key or raw
        uint32 key data); default a fixed key(0), so inference is deterministic.
        backprop_depth: k for the cache-free (training) forward; default cfg.backprop_depth.
        """
        if num_steps is None:
            if self.exit_threshold is not None and cache is not None:
                return self.apply_adaptive(
                    params, tokens_bt, positions_bt, cache, key=key,
                    max_steps=self.decode_steps, threshold=self.exit_threshold,
                )[:2]  # fmt: skip
            num_steps = self.decode_steps
        num_steps = self.cfg.mean_recurrence if num_steps is None else num_steps
        if isinstance(num_steps, int) and cache is not None:
            _check_steps(num_steps, cache)
        logits_btv, cache, _ = self.module(params)(
            tokens_bt,
            positions_bt,
            cache,
            segment_ids_bt,
            num_steps=num_steps,
            key=key,
            backprop_depth=backprop_depth,
        )
        return logits_btv, cache

    def apply_at(self, params, tokens_bt, positions_bt, cache, index_b):
        """(logits_bv at position index_b[b] of each row, cache), as Model.apply_at; here the
        full logits are computed first (adaptive exit needs every token's distribution)."""
        logits_btv, cache = self.apply(params, tokens_bt, positions_bt, cache)
        return jnp.take_along_axis(logits_btv, index_b[:, None, None], axis=1)[:, 0], cache

    def token_stats(
        self, params, tokens_bt, positions_bt, segment_ids_bt, targets_bt, *, temperature=1.0,
        entropy: bool = False,
    ) -> dict:  # fmt: skip
        """`vocab_head.logit_stats` of `targets_bt` at the depth this model decodes at
        (`decode_steps`, default mean_recurrence; the cap when adaptive exit is set, which has
        no fixed depth to score), with the engine's fixed s_0: the policy RL rollouts sample
        from, so the trainer's log-probs equal the engine's. Gradients flow through the last
        `backprop_depth` iterations, as in SFT."""
        steps = self.decode_steps if self.decode_steps is not None else self.cfg.mean_recurrence
        logits_btv, _ = self.apply(
            params, tokens_bt, positions_bt, None, segment_ids_bt, num_steps=steps
        )
        return vocab_head.logit_stats(logits_btv, targets_bt, temperature, entropy)

    def apply_adaptive(
        self, params, tokens_bt, positions_bt, cache, *, key=None, max_steps=None, threshold=None
    ):
        """(logits_btv, cache, steps_bt): per-token exit on KL(p_i || p_{i-1}) < threshold.

        Inference only, so a cache is required (`init_recurrent_cache`). max_steps defaults to
        the cache's iteration axis (cfg.max_recurrence); threshold to cfg.exit_threshold.
        steps_bt is the number of core iterations each token ran.
        """
        if cache is None:
            raise ValueError("apply_adaptive: needs a cache (init_recurrent_cache)")
        max_steps = _iterations(cache) if max_steps is None else max_steps
        if isinstance(max_steps, int):
            _check_steps(max_steps, cache)
        threshold = self.cfg.exit_threshold if threshold is None else threshold
        return self.module(params)(
            tokens_bt,
            positions_bt,
            cache,
            num_steps=max_steps,
            key=key,
            adaptive=True,
            threshold=jnp.asarray(threshold, jnp.float32),
        )


def _iterations(cache) -> int:
    return jax.tree.leaves(cache["core"])[0].shape[0]


def _check_steps(n: int, cache) -> None:
    R = _iterations(cache)
    if not 1 <= n <= R:
        raise ValueError(
            f"num_steps: {n} is outside [1, {R}], the cache's iterations (max_recurrence)"
        )


def init_recurrent_cache(cfg: RecurrentConfig, batch: int, max_len: int, dtype=None) -> dict:
    """Zeros: prelude / coda as kv_cache.init_cache, core with a leading (max_recurrence) axis,
    and `steps` (B, S) int32: the core iterations each cached position ran (adaptive depth's
    cost, per token, for whoever reads the cache back)."""

    def section(n):
        return kv_cache.init_cache(cfg.block_config(n), batch, max_len, dtype)

    R = cfg.max_recurrence
    core = [
        {name: jnp.zeros((R, *a.shape), a.dtype) for name, a in layer.items()}
        for layer in section(cfg.n_core)
    ]
    return {
        "prelude": section(cfg.n_prelude),
        "core": core,
        "coda": section(cfg.n_coda),
        "steps": jnp.zeros((batch, max_len), jnp.int32),
    }


def cache_axes(cache: dict) -> dict:
    """Logical axes of every cache array (the core's iteration axis is replicated)."""
    return {
        "prelude": kv_cache.cache_axes(cache["prelude"]),
        "core": [{n: (None, *kv_cache.CACHE_AXES[n]) for n in layer} for layer in cache["core"]],
        "coda": kv_cache.cache_axes(cache["coda"]),
        "steps": ("batch", "cache_seq"),
    }


def abstract_recurrent(cfg: RecurrentConfig) -> tuple[RecurrentModel, Any]:
    """(RecurrentModel, params as ShapeDtypeStructs)."""
    graphdef, params = _split(nnx.eval_shape(lambda: RecurrentDecoder(cfg, rngs=nnx.Rngs(0))))
    return RecurrentModel(cfg, graphdef), params


def init_recurrent(cfg: RecurrentConfig, key=None, *, mesh=None) -> tuple[RecurrentModel, Any]:
    """(RecurrentModel, random params); with a mesh the params are created already sharded."""
    model, shapes = abstract_recurrent(cfg)

    def init(k):
        return _split(RecurrentDecoder(cfg, rngs=nnx.Rngs(params=k)))[1]

    return model, init_sharded(init, shapes, lambda: param_axes(cfg), key, mesh)


def param_axes(cfg: RecurrentConfig) -> dict:
    """Logical axis names of every parameter, as a dict mirroring params."""
    _, state = nnx.split(nnx.eval_shape(lambda: RecurrentDecoder(cfg, rngs=nnx.Rngs(0))))
    out: dict = {}
    for path, var in nnx.to_flat_state(state):
        names = tuple(var.get_metadata()["axes"])
        # stacked sections carry a leading L axis that the per-layer init did not name
        if path[0] in ("prelude", "coda") or path[:2] == ("core", "layers"):
            names = ("layers", *names)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = names
    return out


# ----------------------------------------------------------------------------------------------
# The training loss.

# Odd 32-bit multipliers (golden ratio, Knuth) for the token hash.
_HASH_MUL, _HASH_ADD = 0x9E3779B1, 0x7F4A7C15


def batch_key(mb: dict):
    """The microbatch's key: `mb["rng"]` (uint32 key data) if present, else a token hash.

    The hash sums every token times a position-dependent odd multiplier (uint32, wrapping), so
    it is one replicated scalar however the rows are sharded, and fold_in turns distinct
    hashes into unrelated keys.
    """
    if "rng" in mb:
        return _as_key(mb["rng"])
    tokens = mb["inputs"].astype(jnp.uint32)
    weights = jnp.arange(math.prod(tokens.shape), dtype=jnp.uint32).reshape(tokens.shape)
    weights = weights * jnp.uint32(_HASH_MUL) + jnp.uint32(_HASH_ADD)
    h = jnp.sum(tokens * weights + weights, dtype=jnp.uint32)
    return jax.random.fold_in(jax.random.key(0), h)


def recurrent_cross_entropy_loss(model: RecurrentModel, params, mb):
    """SFT cross-entropy at a sampled depth: `loss_fn(model, params, mb) -> (loss_sum, aux)`.

    aux also reports the sampled r as `recurrence_steps` over `recurrence_count` (one per
    microbatch), so the step's metrics show its mean.
    """
    cfg = model.cfg
    k_r, k_s = jax.random.split(batch_key(mb))
    r = sample_recurrence(k_r, cfg.mean_recurrence, cfg.sigma)
    logits_btv, _ = model.apply(
        params, mb["inputs"], mb["positions"], None, mb["segment_ids"], num_steps=r, key=k_s
    )
    ce_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, mb["targets"])
    mask_bt = mb["loss_mask"]
    correct_bt = (jnp.argmax(logits_btv, axis=-1) == mb["targets"]) * mask_bt
    aux = {
        "n_tokens": mask_bt.sum(),
        "accuracy": correct_bt.sum(),
        "recurrence_steps": r.astype(jnp.float32),
        "recurrence_count": jnp.ones((), jnp.float32),
    }
    return (ce_bt * mask_bt).sum(), aux
