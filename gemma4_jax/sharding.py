"""One table from logical axes to mesh axes, the mesh, the pipeline stages and what each device holds.

Mesh axes: "pp" (pipeline stage), "dp" (data) and "tp" (tensor / expert). Model code only speaks logical axes
(layers.param); this file alone turns them into PartitionSpecs. A logical axis whose size the mesh axis does not
divide is replicated instead (e.g. a single global KV head), so every config runs on every mesh; the axes whose
split is the point of tensor parallelism (query heads, MLP width, experts) are checked up front instead
(`validate`), so a request that would silently replicate them fails with the numbers.

Pipeline: stage s is the sub-mesh at index s of the "pp" axis (`stage_meshes`); it owns a contiguous range of
layers (`stage_layers`) and every parameter under them (`param_stage`). The first stage also owns the embeddings
(token and per-layer tables), the last the final norm and the LM head. See docs/sharding.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemma4_jax.config import ConfigError, TextConfig

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


# Logical axes of a KV pool (pages or ring rows, slots, KV heads, head dim): sharded by KV head where the layer's
# head count allows, replicated where it does not (e.g. the single global KV head of keys-as-values layers).
KV_POOL_AXES = (None, None, "kv_heads", "head_dim")

# Parameters outside the decoder layers, by the stage that owns them.
_FIRST_STAGE_PARAMS = ("embed_tokens", "embed_tokens_per_layer", "per_layer_model_projection",
                       "per_layer_projection_norm", "vision_tower", "embed_vision", "audio")
_LAST_STAGE_PARAMS = ("norm", "lm_head")


class ShardingError(ConfigError):
    """A mesh or parallelism request that cannot work (a ConfigError: it is a property of config x mesh)."""


def _check_degrees(pp, tp, dp) -> None:
    for name, v in (("pp", pp), ("tp", tp), ("dp", dp)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
            raise ShardingError(f"{name} must be a positive integer, got {v!r}")


def make_mesh(pp: int = 1, tp: int = 1, dp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (pp, dp, tp) mesh over the first pp*dp*tp devices."""
    _check_degrees(pp, tp, dp)
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
    # Trailing Nones dropped: the canonical form XLA gives to jit outputs. A donated KV pool placed as
    # P(None, None, "tp", None) would come back as P(None, None, "tp") and the next step would compile again.
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def named_sharding(axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    if axes is None:
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, partition_spec(axes, shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def validate(cfg: TextConfig, pp: int = 1, tp: int = 1, dp: int = 1, num_devices: int | None = None) -> None:
    """Refuse a parallel layout that cannot work or would silently not shard, naming the numbers.

    - pp*dp*tp must not exceed the devices available;
    - pp <= num_hidden_layers (every stage owns at least one layer);
    - tp must divide the query heads, every layer's MLP width and the number of experts: replicating those would
      give no tensor/expert parallelism at all. KV heads and vocabularies that tp does not divide are replicated
      (one global KV head is normal), by the rules table.
    """
    _check_degrees(pp, tp, dp)
    n = len(jax.devices()) if num_devices is None else num_devices
    if pp * dp * tp > n:
        raise ShardingError(f"pp={pp} x dp={dp} x tp={tp} = {pp * dp * tp} devices requested, only {n} available")
    if pp > cfg.num_hidden_layers:
        raise ShardingError(f"pp={pp} pipeline stages but the model has only {cfg.num_hidden_layers} layers "
                            "(each stage needs at least one)")
    if tp == 1:
        return
    if cfg.num_attention_heads % tp:
        raise ShardingError(f"tp={tp} does not divide num_attention_heads={cfg.num_attention_heads}; "
                            "tensor parallelism splits the query heads")
    widths = sorted({s.intermediate_size for s in cfg.layers if s.intermediate_size % tp})
    if widths:
        raise ShardingError(f"tp={tp} does not divide the MLP intermediate size(s) {widths}")
    if cfg.enable_moe_block:
        if cfg.num_experts % tp:
            raise ShardingError(f"tp={tp} does not divide num_experts={cfg.num_experts}; expert parallelism "
                                "places num_experts / tp experts on each device of the tensor axis")


def stage_layers(num_layers: int, pp: int) -> tuple[range, ...]:
    """Contiguous layer ranges of the pp stages, sizes differing by at most one (earlier stages get the extra)."""
    if not 1 <= pp <= num_layers:
        raise ShardingError(f"pp={pp} pipeline stages but the model has only {num_layers} layers")
    base, extra = divmod(num_layers, pp)
    out, start = [], 0
    for s in range(pp):
        size = base + (1 if s < extra else 0)
        out.append(range(start, start + size))
        start += size
    return tuple(out)


def stage_meshes(mesh: Mesh) -> tuple[Mesh, ...]:
    """The sub-mesh of each pipeline stage: the devices at index s of "pp", keeping all three axis names (pp of
    size 1), so the one rules table applies inside a stage unchanged."""
    return tuple(Mesh(mesh.devices[s : s + 1], MESH_AXES) for s in range(mesh.shape["pp"]))


def param_stage(path: Sequence, stages: Sequence[range]) -> int:
    """Stage that owns a parameter, by its path ("layers", i, ...) / ("embed_tokens", ...) / ("norm", ...)."""
    head = str(path[0])
    if head == "layers":
        layer = int(path[1])
        for s, layers in enumerate(stages):
            if layer in layers:
                return s
        raise ShardingError(f"layer {layer} is in no pipeline stage {list(stages)}")
    if head in _FIRST_STAGE_PARAMS:
        return 0
    if head in _LAST_STAGE_PARAMS:
        return len(stages) - 1
    raise ShardingError(f"parameter {'.'.join(map(str, path))} has no pipeline stage rule")


def kv_pool_sharding(shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    """Sharding of one layer's K or V pool (pages|rows, page|ring, K, H): by KV head when tp divides K."""
    return named_sharding(KV_POOL_AXES, shape, mesh)


def batch_sharding(shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    """Inputs (B, ...) split over the data axis when dp divides B, else replicated (same result, no speed-up)."""
    dp = mesh.shape["dp"]
    if dp > 1 and shape and shape[0] % dp == 0:
        return NamedSharding(mesh, PartitionSpec("dp", *([None] * (len(shape) - 1))))
    return NamedSharding(mesh, PartitionSpec())
