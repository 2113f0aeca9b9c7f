"""The CPU paged-attention custom call: registering cpu_attention.cc with XLA (kernels/cpu_build.py: built on first
use with the machine's C++ compiler) and calling it."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax.kernels import cpu_build
from gemma4_jax.kernels.paged_attention.reference import KVSource, check_sources

SOURCE = Path(__file__).with_name("cpu_attention.cc")
TARGET = "gemma4_cpu_paged_attention"
# Query tokens per task: a decode row (T = 1, or a few verify tokens) is one task per KV head; a prefill chunk is
# cut into tiles of up to TILE tokens, fewer over long key axes, so that a task's logits (tile * G rows x the keys,
# float32, kept per thread) stay within SCRATCH_FLOATS.
TILE = 16
SCRATCH_FLOATS = 1 << 20


def default_tile(groups: int, num_keys: int) -> int:
    return max(1, min(TILE, SCRATCH_FLOATS // max(1, groups * num_keys)))


def load() -> str | None:
    """Build and register the custom call once per process: None when ready, else why it is not."""
    return cpu_build.load(SOURCE, "Gemma4CpuPagedAttention", TARGET)


def supported_dtypes(q_dtype, pool_dtype) -> bool:
    """float32 queries over float32 pools, or bfloat16 queries over bfloat16 / uint16 (bfloat16 bits) pools."""
    q_dtype, pool_dtype = jnp.dtype(q_dtype), jnp.dtype(pool_dtype)
    if q_dtype == jnp.float32:
        return pool_dtype == jnp.float32
    return q_dtype == jnp.bfloat16 and pool_dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.uint16))


def cpu_paged_attention(
    q: jax.Array,
    source: KVSource,
    q_positions: jax.Array,
    *,
    sliding_window: int | None = None,
    q_blocks: jax.Array | None = None,
    tile: int | None = None,
) -> jax.Array:
    """Attention of q (B, T, N, H) over one key source read in place (reference.KVSource: pools (pages,
    page_size, K, H) in q's dtype, or uint16 bfloat16 bits for bfloat16 q; page table (B, P); key positions
    (B, P * page_size)). Returns (B, T, N, H) in q's dtype; equals `paged_attention_reference` (a query that sees
    nothing gets 0). tile: query tokens per task (None: `default_tile`). Raises ValueError for shapes or dtypes the
    kernel does not take, RuntimeError when it could not be built."""
    groups, _ = check_sources(q, (source,), q_positions, q_blocks)
    if not supported_dtypes(q.dtype, source.k_pages.dtype) or source.v_pages.dtype != source.k_pages.dtype:
        raise ValueError(
            f"the CPU attention kernel takes float32 q over float32 pools or bfloat16 q over bfloat16/uint16 pools, "
            f"got q {q.dtype}, pools {source.k_pages.dtype}/{source.v_pages.dtype}"
        )
    reason = load()
    if reason is not None:
        raise RuntimeError(reason)
    none = jnp.zeros((0,), jnp.int32)
    blocks = (none, none) if q_blocks is None else (q_blocks.astype(jnp.int32), source.blocks.astype(jnp.int32))
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, q.dtype))
    return call(
        q,
        source.k_pages,
        source.v_pages,
        source.page_table.astype(jnp.int32),
        source.positions.astype(jnp.int32),
        q_positions.astype(jnp.int32),
        *blocks,
        window=np.int64(sliding_window or 0),
        tile=np.int64(tile or default_tile(groups, source.positions.shape[1])),
    )
