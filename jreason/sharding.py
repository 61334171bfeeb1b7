"""Meshes and the one table that maps logical axis names onto mesh axes.

Parameters, caches and activations are named with logical axes ("embed", "mlp", "batch", ...);
`AXIS_RULES` says which mesh axis (data, fsdp, tensor) each one is split over. Changing the
parallelism of a run is therefore a config change, never a model change (as in MaxText).

A dimension that does not divide evenly over its mesh axes is replicated instead of failing,
so a tiny test model (2 kv heads) runs on tensor=4 and a real one shards as intended.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (None = replicated). Order matters only for readability.
AXIS_RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": None,
    "layers": None,
    "norm": None,
    "seq": None,
    "cache_seq": None,
    "act_embed": None,  # activations keep D whole; params are what fsdp splits
}


def make_mesh(
    data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None, *, dcn_data: int = 1
) -> Mesh:
    """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices.

    Device order follows the interconnect: on TPU and GPU `mesh_utils.create_device_mesh` lays
    the axes onto the physical topology (tensor on the fastest links). `dcn_data > 1` splits the
    data axis over that many slices (TPU multislice; hosts on GPU, where the granule is the
    process): fsdp and tensor stay inside a slice and only data-parallel gradient reductions
    cross the slower data-center network (MaxText's dcn_data_parallelism).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices do not divide by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if any(s < 1 for s in sizes):
        raise ValueError(f"mesh: sizes must be >= 1 (or one -1), got {dict(zip(MESH_AXES, sizes))}")
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh: data*fsdp*tensor = {math.prod(sizes)} but {len(devices)} devices are "
            f"available ({dict(zip(MESH_AXES, sizes))}); use -1 to fill"
        )
    if dcn_data < 1 or sizes[0] % dcn_data:
        raise ValueError(f"mesh.dcn_data={dcn_data} must be >= 1 and divide mesh.data={sizes[0]}")
    # Auto axes: with_sharding_constraint and jit in/out shardings drive the partitioner.
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return Mesh(_device_array(devices, sizes, dcn_data), MESH_AXES, axis_types=axis_types)


def _device_array(devices: list, sizes: list[int], dcn_data: int) -> np.ndarray:
    from jax.experimental import mesh_utils

    if dcn_data > 1:
        # slices on a multislice TPU; elsewhere (one slice, or no slice_index) processes
        by_slice = len({getattr(d, "slice_index", 0) for d in devices}) > 1
        granules = {d.slice_index if by_slice else d.process_index for d in devices}
        if len(granules) != dcn_data:
            what = "slices" if by_slice else "processes"
            raise ValueError(
                f"mesh.dcn_data={dcn_data}: the devices span {len(granules)} {what}; "
                f"dcn_data must equal that number (or be 1)"
            )
        return mesh_utils.create_hybrid_device_mesh(
            [sizes[0] // dcn_data, *sizes[1:]],
            [dcn_data, 1, 1],
            devices,
            process_is_granule=not by_slice,
            allow_split_physical_axes=True,
        )
    if devices[0].platform in ("tpu", "gpu", "cuda", "rocm") and devices == jax.devices():
        return mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    return np.asarray(devices).reshape(sizes)


def logical_to_spec(
    names: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None
) -> PartitionSpec:
    """Logical names -> PartitionSpec; drops mesh axes that do not divide the dimension."""
    spec, used = [], set()
    for i, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in AXIS_RULES:
            raise ValueError(
                f"logical axis {name!r} has no sharding rule; known: {sorted(AXIS_RULES)}"
            )
        axes = [a for a in (AXIS_RULES[name] or ()) if a not in used]
        if mesh is not None:
            axes = [a for a in axes if mesh.shape[a] > 1]
            if shape is not None:
                # keep the longest prefix of mesh axes whose product divides the dimension
                while axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
                    axes.pop()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def is_axes(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(n, str | None) for n in x)


def param_shardings(axes_tree, mesh: Mesh, shapes_tree=None):
    """A pytree of NamedShardings for a pytree of logical-axis tuples (and optional shapes)."""
    if shapes_tree is None:
        return jax.tree.map(
            lambda names: NamedSharding(mesh, logical_to_spec(names, None, mesh)),
            axes_tree,
            is_leaf=is_axes,
        )
    return jax.tree.map(
        lambda names, x: NamedSharding(mesh, logical_to_spec(names, x.shape, mesh)),
        axes_tree,
        shapes_tree,
        is_leaf=is_axes,
    )


def shard(x, names: Sequence[str | None], mesh: Mesh | None = None):
    """with_sharding_constraint by logical names; a no-op outside a mesh."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh is None or mesh.empty:
            return x
    spec = logical_to_spec(names, x.shape, mesh)
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, spec) if isinstance(mesh, Mesh) else spec
    )
