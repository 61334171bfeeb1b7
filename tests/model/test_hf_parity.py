"""Logits parity against transformers on random tiny Llama / Qwen2 / Qwen3 / Mistral models."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_fixtures import save_hf_model

from jreason.model import init_cache
from jreason.model.hf import load_hf, save_hf
from jreason.model.transformer import abstract_model

FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]

# Right-padded batch: row lengths 11, 7 and 3.
LENGTHS = [11, 7, 3]


def padded_batch(vocab, seed=0):
    rng = np.random.default_rng(seed)
    T = max(LENGTHS)
    tokens = rng.integers(0, vocab, size=(len(LENGTHS), T))
    mask = np.zeros_like(tokens)
    for b, n in enumerate(LENGTHS):
        mask[b, :n] = 1
    tokens = tokens * mask
    return tokens, mask


def hf_logits(model, tokens, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask))
    return out.logits.float().numpy()


def jr_logits(path, tokens, mask, **kw):
    cfg, params = load_hf(path, **kw)
    model, _ = abstract_model(cfg)
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    logits, _ = jax.jit(model.apply)(
        params, jnp.asarray(tokens), jnp.asarray(positions), None, jnp.asarray(mask)
    )
    return cfg, params, np.asarray(logits)


def assert_close_on_valid(a, b, mask, atol):
    valid = mask.astype(bool)
    diff = np.abs(a[valid] - b[valid]).max()
    assert diff <= atol, f"max abs diff {diff} > {atol}"


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_fp32(tmp_path, family):
    hf_model, path = save_hf_model(tmp_path, family)
    tokens, mask = padded_batch(hf_model.config.vocab_size)
    _, _, ours = jr_logits(path, tokens, mask, param_dtype="float32")
    assert_close_on_valid(ours, hf_logits(hf_model, tokens, mask), mask, 1e-4)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_both_attention_impls_match_transformers(tmp_path, impl):
    hf_model, path = save_hf_model(tmp_path, "qwen2")
    tokens, mask = padded_batch(hf_model.config.vocab_size)
    _, _, ours = jr_logits(path, tokens, mask, attention_impl=impl)
    assert_close_on_valid(ours, hf_logits(hf_model, tokens, mask), mask, 1e-4)


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("llama", dict(tie_word_embeddings=True)),
        ("llama", dict(attention_bias=True, mlp_bias=True)),
        (
            "llama",
            dict(
                rope_theta=500000.0,
                rope_scaling=dict(
                    rope_type="llama3",
                    factor=8.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=16,
                ),
            ),
        ),
        ("llama", dict(rope_scaling=dict(rope_type="linear", factor=4.0))),
        (
            "qwen2",
            dict(
                rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32)
            ),
        ),
        ("qwen3", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    ],
    ids=["tied", "biases", "llama3-rope", "linear-rope", "yarn-rope", "qwen3-tied-mqa"],
)
def test_variants_match_transformers(tmp_path, family, overrides):
    hf_model, path = save_hf_model(tmp_path, family, **overrides)
    tokens, mask = padded_batch(hf_model.config.vocab_size, seed=1)
    # long positions exercise the rope scaling: offset every position by 100
    cfg, params = load_hf(path)
    model, _ = abstract_model(cfg)
    positions = np.broadcast_to(np.arange(tokens.shape[1]) + 100, tokens.shape)
    ours, _ = model.apply(
        params, jnp.asarray(tokens), jnp.asarray(positions), None, jnp.asarray(mask)
    )
    with torch.no_grad():
        ref = hf_model(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions.copy()),
        ).logits.numpy()
    assert_close_on_valid(np.asarray(ours), ref, mask, 1e-4)


def test_bf16_logits_close(tmp_path):
    hf_model, path = save_hf_model(tmp_path, "qwen2")
    tokens, mask = padded_batch(hf_model.config.vocab_size)
    ref = hf_logits(hf_model, tokens, mask)
    _, _, ours = jr_logits(path, tokens, mask, param_dtype="bfloat16", dtype="bfloat16")
    # bf16 has ~3 significant digits; logits here are O(1).
    assert_close_on_valid(ours, ref, mask, 5e-2)
    # and the bf16 model agrees with transformers run in bf16 at the same order
    hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    assert_close_on_valid(ours, hf_logits(hf_bf16, tokens, mask), mask, 5e-2)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_export_round_trip(tmp_path, family):
    hf_model, path = save_hf_model(tmp_path, family)
    cfg, params = load_hf(path)
    out = save_hf(tmp_path / "export", cfg, params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens, mask = padded_batch(hf_model.config.vocab_size)
    np.testing.assert_array_equal(
        hf_logits(reloaded, tokens, mask), hf_logits(hf_model, tokens, mask)
    )
    # bit-identical tensors
    for name, p in hf_model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], p, rtol=0, atol=0)


def test_sharded_index_load_and_save(tmp_path):
    hf_model, path = save_hf_model(tmp_path, "llama")
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    tokens, mask = padded_batch(hf_model.config.vocab_size)
    cfg, params, ours = jr_logits(tmp_path / "sharded", tokens, mask)
    assert_close_on_valid(ours, hf_logits(hf_model, tokens, mask), mask, 1e-4)
    out = save_hf(tmp_path / "export", cfg, params, max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_array_equal(
        hf_logits(reloaded, tokens, mask), hf_logits(hf_model, tokens, mask)
    )


def test_load_sharded_over_mesh_equals_single_device(tmp_path):
    from jreason.sharding import make_mesh

    hf_model, path = save_hf_model(tmp_path, "qwen2", num_attention_heads=4, num_key_value_heads=4)
    mesh = make_mesh(data=1, fsdp=2, tensor=4)
    _, sharded = load_hf(path, mesh)
    _, single = load_hf(path)
    q = sharded["layers"]["attn"]["q_proj"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert len(q.addressable_shards) == 8
    assert q.addressable_shards[0].data.shape == (2, 32, 1, 16)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), sharded, single
    )


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_prefill_then_decode_equals_full_forward(tmp_path, family):
    """Rows of different lengths share a batch: prefill each's prompt, then decode one by one."""
    hf_model, path = save_hf_model(tmp_path, family)
    cfg, params = load_hf(path)
    model, _ = abstract_model(cfg)
    rng = np.random.default_rng(3)
    total = 16
    seqs = rng.integers(0, cfg.vocab_size, size=(3, total))
    prompt_lens = np.array([5, 9, 2])
    full, _ = model.apply(
        params, jnp.asarray(seqs), jnp.broadcast_to(jnp.arange(total), seqs.shape)
    )

    # right-padded prefill of the prompts: padding tokens are written past each row's length
    # but stay invisible (causality by position) until overwritten by that row's decode.
    P = prompt_lens.max()
    cache = init_cache(cfg, 3, 32)
    positions = np.broadcast_to(np.arange(P), (3, P))
    logits, cache = model.apply(params, jnp.asarray(seqs[:, :P]), jnp.asarray(positions), cache)
    for b, n in enumerate(prompt_lens):
        np.testing.assert_allclose(logits[b, :n], full[b, :n], atol=1e-5)
    step = jax.jit(model.apply)
    pos = prompt_lens.copy()
    while pos.min() < total:
        cur = np.minimum(pos, total - 1)
        tok = seqs[np.arange(3), cur][:, None]
        logits, cache = step(params, jnp.asarray(tok), jnp.asarray(cur[:, None]), cache)
        for b in range(3):
            if pos[b] < total:
                np.testing.assert_allclose(logits[b, 0], full[b, pos[b]], atol=1e-5)
        pos += 1
