"""What each device holds for a layout, from shapes alone (jax.eval_shape: no weights allocated).

`memory_per_device(config, pp=, tp=, dp=)` answers "will it fit" before anything is loaded: parameter bytes per
device (each parameter sharded by the one rules table on its pipeline stage's sub-mesh, the tied head's copy on
the last stage) and KV bytes for a context budget (paged full-attention pools plus sliding-window rings).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from gemma4_jax import sharding
from gemma4_jax.config import preset
from gemma4_jax.model import abstract_model, resolve_dtype


@functools.lru_cache(maxsize=8)
def _abstract_params(cfg, dtype) -> tuple[tuple[tuple, tuple[int, ...], int, tuple], ...]:
    """(path, shape, itemsize, logical axes) of every parameter, via jax.eval_shape (cached: tracing a 60-layer
    model takes seconds)."""
    _, state = abstract_model(cfg, dtype)
    return tuple((path, tuple(var.shape), np.dtype(var.dtype).itemsize, var.get_metadata().get("logical_axes"))
                 for path, var in nnx.to_flat_state(state))


def memory_per_device(config, pp: int = 1, tp: int = 1, dp: int = 1, dtype: Any = "bfloat16",
                      context_tokens: int = 0, max_seqs: int = 0,
                      devices: Sequence[jax.Device] | None = None) -> list[dict]:
    """Parameter and KV bytes per device of a layout, from `jax.eval_shape` shapes (no weights allocated).

    config: a ModelConfig or preset name. KV: `context_tokens` tokens in paged full-attention pools plus `max_seqs`
    sliding-window rings. Returns one row per device: {"device", "stage", "param_bytes", "kv_bytes",
    "kv_bytes_per_token"} (KV bytes per token of context: full-attention layers that own a cache).
    """
    cfg = preset(config) if isinstance(config, str) else config
    text = cfg.text
    devices = list(devices if devices is not None else jax.devices())
    sharding.validate(text, pp=pp, tp=tp, dp=dp, num_devices=len(devices))
    dt = resolve_dtype(dtype)
    params = _abstract_params(cfg, dt)
    mesh = sharding.make_mesh(pp=pp, tp=tp, dp=dp, devices=devices)
    meshes = sharding.stage_meshes(mesh)
    stages = sharding.stage_layers(text.num_hidden_layers, pp)
    rows = {d.id: {"device": d.id, "stage": s, "param_bytes": 0, "kv_bytes": 0, "kv_bytes_per_token": 0}
            for s, m in enumerate(meshes) for d in m.devices.flat}

    def add(key, mesh_, shape, itemsize, axes):
        ns = sharding.named_sharding(axes, shape, mesh_)
        nbytes = int(np.prod(ns.shard_shape(tuple(shape)))) * itemsize
        for d in mesh_.devices.flat:
            rows[d.id][key] += nbytes

    for path, shape, itemsize, axes in params:
        s = sharding.param_stage(path, stages)
        add("param_bytes", meshes[s], shape, itemsize, axes)
        if path == ("embed_tokens", "embedding") and text.tie_word_embeddings and pp > 1:
            add("param_bytes", meshes[-1], shape, itemsize, axes)  # the head's own copy
    pages = -(-context_tokens // 16)
    for spec in text.layers:
        if spec.is_kv_shared:
            continue
        s = next(i for i, r in enumerate(stages) if spec.index in r)
        item = np.dtype(dt).itemsize
        if spec.is_sliding:
            shape = (max_seqs, text.sliding_window, spec.num_kv_heads, spec.head_dim)
        else:
            shape = (pages, 16, spec.num_kv_heads, spec.head_dim)
            add("kv_bytes_per_token", meshes[s], (1, 1, spec.num_kv_heads, spec.head_dim), 2 * item,
                sharding.KV_POOL_AXES)
        add("kv_bytes", meshes[s], shape, 2 * item, sharding.KV_POOL_AXES)  # K and V
    return [rows[d.id] for m in meshes for d in m.devices.flat]
