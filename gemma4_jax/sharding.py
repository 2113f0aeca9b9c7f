"""One table from logical axes to mesh axes, and the mesh itself.

Mesh axes: "pp" (pipeline stage), "dp" (data) and "tp" (tensor / expert). Model code only speaks logical axes
(layers.param); this file alone turns them into PartitionSpecs. A logical axis whose size the mesh axis does not
divide is replicated instead (e.g. a single global KV head), so every config runs on every mesh.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("pp", "dp", "tp")

# logical axis -> mesh axis (None: replicated). Expert parallelism shares the tensor axis.
LOGICAL_RULES: dict[str, str | None] = {
    "vocab": "tp",
    "embed": None,
    "heads": "tp",
    "kv_heads": "tp",
    "head_dim": None,
    "mlp": "tp",
    "experts": "tp",
    "experts_replicated": None,
    "ple": None,
    "ple_layers": None,
    "layers": None,
    "norm": None,
}


class ShardingError(ValueError):
    """A mesh or parallelism request that cannot work."""


def make_mesh(pp: int = 1, tp: int = 1, dp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (pp, dp, tp) mesh over the first pp*dp*tp devices."""
    for name, v in (("pp", pp), ("tp", tp), ("dp", dp)):
        if not isinstance(v, int) or v < 1:
            raise ShardingError(f"{name} must be a positive integer, got {v!r}")
    devices = list(devices if devices is not None else jax.devices())
    need = pp * dp * tp
    if need > len(devices):
        raise ShardingError(f"pp={pp} x dp={dp} x tp={tp} needs {need} devices, only {len(devices)} available")
    return Mesh(np.array(devices[:need]).reshape(pp, dp, tp), MESH_AXES)


def partition_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec of one array from its logical axes; an indivisible or reused mesh axis is replicated."""
    used: set[str] = set()
    spec = []
    for axis, size in zip(axes, shape, strict=True):
        mesh_axis = LOGICAL_RULES.get(axis) if axis is not None else None
        if mesh_axis is None or mesh_axis in used or size % mesh.shape[mesh_axis]:
            spec.append(None)
            continue
        used.add(mesh_axis)
        spec.append(mesh_axis if mesh.shape[mesh_axis] > 1 else None)
    return PartitionSpec(*spec)


def named_sharding(axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    if axes is None:
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, partition_spec(axes, shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def bytes_per_device(shape: Sequence[int], dtype, sharding: NamedSharding) -> int:
    """Bytes one device holds of an array of this shape under this sharding."""
    shard = sharding.shard_shape(tuple(shape))
    return math.prod(shard) * np.dtype(dtype).itemsize
