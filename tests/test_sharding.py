"""Meshes over 8 fake CPU devices; the sharded forward equals the single-device one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jreason.model import init_model, load_config
from jreason.model.transformer import param_axes
from jreason.sharding import logical_to_spec, make_mesh, param_shardings


def test_make_mesh_fills_and_validates():
    assert dict(make_mesh(data=2, fsdp=-1, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="data\\*fsdp\\*tensor = 4 but 8 devices"):
        make_mesh(data=2, fsdp=2)
    with pytest.raises(ValueError, match="at most one"):
        make_mesh(data=-1, fsdp=-1)


def test_dcn_data_is_checked_against_data_and_the_process_count():
    with pytest.raises(ValueError, match=r"mesh.dcn_data=3 must be >= 1 and divide mesh.data=2"):
        make_mesh(2, -1, 1, dcn_data=3)
    # one process (CPU devices have no slice_index): the data axis cannot span 2 granules
    with pytest.raises(ValueError, match=r"mesh.dcn_data=2: the devices span 1 processes"):
        make_mesh(2, -1, 1, dcn_data=2)
    assert make_mesh(2, -1, 1, dcn_data=1).shape["data"] == 2


def test_rules_drop_axes_that_do_not_divide():
    mesh = make_mesh(data=1, fsdp=2, tensor=4)
    assert logical_to_spec(("embed", "mlp"), (64, 160), mesh) == P("fsdp", "tensor")
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh) == P(
        "fsdp", None, None
    )
    assert logical_to_spec(("batch", "seq"), (8, 5), make_mesh(data=2, fsdp=4)) == P(
        ("data", "fsdp"), None
    )
    with pytest.raises(ValueError, match="no sharding rule"):
        logical_to_spec(("bogus",))


@pytest.mark.parametrize("shape", [dict(data=8), dict(fsdp=8), dict(data=2, fsdp=2, tensor=2)])
def test_sharded_forward_equals_single_device(shape):
    cfg = load_config("tiny-llama", ["n_heads=4", "n_kv_heads=4"])
    model, params = init_model(cfg, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (8, 12), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(12), tokens.shape)
    expected, _ = model.apply(params, tokens, positions)

    mesh = make_mesh(**shape)
    shardings = param_shardings(param_axes(cfg), mesh, params)
    sharded = jax.device_put(params, shardings)
    batch_sharding = jax.sharding.NamedSharding(
        mesh, logical_to_spec(("batch", "seq"), tokens.shape, mesh)
    )
    out, _ = jax.jit(model.apply)(
        sharded, jax.device_put(tokens, batch_sharding), jax.device_put(positions, batch_sharding)
    )
    np.testing.assert_allclose(out, expected, atol=2e-5)
