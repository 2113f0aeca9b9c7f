"""Paged attention, reference side: the key sources a kernel reads in place, and the pure-jnp attention that the
kernel (kernel.py) must match.

A key source is one stretch of a row's keys: K/V pools (num_pages, page_size, K, H), a page table (B, P) and the
position of every logical key (B, P * page_size), -1 for an empty slot. Logical key i of row b lives in page
page_table[b, i // page_size] at offset i % page_size. A paged full-attention pool is one source, a sliding
window ring (rows, R, K, H) read at row slots[b] is one source (page_size R, page table slots[:, None]), and
dense keys (B, S, K, H) are one source too (their own pool, page table arange(B)[:, None]). Several sources are
concatenated on the key axis (a prefill chunk attends over its ring and over its own keys).

Masking is by position, never by index: query t of row b sees key s when q_pos >= 0, key_pos >= 0 and
(key_pos <= q_pos, or both carry the same vision block id >= 0), and, with a sliding window W,
key_pos > q_pos - W. A query that sees no key (a padding row, an empty context) gets 0 and log-sum-exp -inf.
Logits and softmax in float32; softmax scale 1 (Gemma 4 folds it into the q norm).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class KVSource(NamedTuple):
    """k_pages, v_pages: (num_pages, page_size, K, H); page_table: (B, P) int32; positions: (B, P * page_size)
    int32 (-1 empty); blocks: (B, P * page_size) int32 vision block ids (-1 none), or None."""

    k_pages: jax.Array
    v_pages: jax.Array
    page_table: jax.Array
    positions: jax.Array
    blocks: jax.Array | None = None


def dense_source(k: jax.Array, v: jax.Array, positions: jax.Array, blocks: jax.Array | None = None) -> KVSource:
    """Keys already laid out per row, k, v (B, S, K, H), as a source: each row is one page of its own pool."""
    return KVSource(k, v, jnp.arange(k.shape[0], dtype=jnp.int32)[:, None], positions, blocks)


def check_sources(q: jax.Array, sources, q_positions: jax.Array, q_blocks: jax.Array | None) -> tuple[int, int]:
    """Shape checks shared by the kernel and the reference. Returns (G query heads per KV head, K)."""
    if q.ndim != 4:
        raise ValueError(f"q must be (B, T, N, H), got shape {q.shape}")
    b, t, n, h = q.shape
    if not sources:
        raise ValueError("paged attention needs at least one key source")
    if q_positions.shape != (b, t):
        raise ValueError(f"q_positions must be (B, T) = {(b, t)}, got {q_positions.shape}")
    if q_blocks is not None and q_blocks.shape != (b, t):
        raise ValueError(f"q_blocks must be (B, T) = {(b, t)}, got {q_blocks.shape}")
    kv_heads = sources[0].k_pages.shape[2]
    for i, src in enumerate(sources):
        pages, page_size, k_heads, head_dim = src.k_pages.shape
        if src.v_pages.shape != src.k_pages.shape:
            raise ValueError(f"source {i}: v_pages {src.v_pages.shape} differs from k_pages {src.k_pages.shape}")
        if (k_heads, head_dim) != (kv_heads, h) or n % k_heads:
            raise ValueError(f"source {i}: K/V heads {k_heads} x dim {head_dim} do not fit q heads {n} x dim {h}")
        if src.page_table.ndim != 2 or src.page_table.shape[0] != b:
            raise ValueError(f"source {i}: page_table must be (B={b}, P), got {src.page_table.shape}")
        keys = src.page_table.shape[1] * page_size
        if src.positions.shape != (b, keys):
            raise ValueError(
                f"source {i}: positions must be (B, P * page_size) = {(b, keys)}, got {src.positions.shape}"
            )
        if (src.blocks is None) != (q_blocks is None):
            raise ValueError(f"source {i}: vision blocks must be given for the queries and every source, or none")
        if src.blocks is not None and src.blocks.shape != (b, keys):
            raise ValueError(f"source {i}: blocks must be (B, P * page_size) = {(b, keys)}, got {src.blocks.shape}")
    return n // kv_heads, kv_heads


def visible(q_pos: jax.Array, key_pos: jax.Array, sliding_window: int | None, q_blk=None, key_blk=None) -> jax.Array:
    """The mask rule, broadcasting: q_pos (..., Tq, 1) against key_pos (..., 1, S) (block ids alike)."""
    sees = key_pos <= q_pos
    if q_blk is not None:
        sees = sees | ((q_blk == key_blk) & (q_blk >= 0))
    sees = sees & (key_pos >= 0) & (q_pos >= 0)
    if sliding_window is not None:
        sees = sees & (key_pos > q_pos - sliding_window)
    return sees


def gather_source(src: KVSource) -> tuple[jax.Array, jax.Array]:
    """The source's keys and values laid out per row: (B, P * page_size, K, H) each."""
    b, p = src.page_table.shape
    shape = (b, p * src.k_pages.shape[1], *src.k_pages.shape[2:])
    return src.k_pages[src.page_table].reshape(shape), src.v_pages[src.page_table].reshape(shape)


def paged_attention_reference(
    q: jax.Array,
    sources,
    q_positions: jax.Array,
    *,
    sliding_window: int | None = None,
    q_blocks: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Attention of q (B, T, N, H) over the concatenated key sources. Returns (out (B, T, N, H) in q's dtype,
    lse (B, T, N) float32: the log-sum-exp of each query's visible logits, -inf when it sees none).

    Probabilities are cast to the values' compute dtype (q's) before the value product, as the model's
    reference attention does; K/V pools in another dtype are cast to q's dtype first."""
    sources = tuple(sources)
    groups, kv_heads = check_sources(q, sources, q_positions, q_blocks)
    b, t, n, h = q.shape
    gathered = [gather_source(src) for src in sources]
    k = jnp.concatenate([g[0] for g in gathered], 1).astype(q.dtype)
    v = jnp.concatenate([g[1] for g in gathered], 1).astype(q.dtype)
    key_pos = jnp.concatenate([src.positions for src in sources], 1)
    key_blk = None if q_blocks is None else jnp.concatenate([src.blocks for src in sources], 1)
    mask = visible(
        q_positions[:, :, None],
        key_pos[:, None, :],
        sliding_window,
        None if q_blocks is None else q_blocks[:, :, None],
        None if key_blk is None else key_blk[:, None, :],
    )  # (B, T, S)
    qg = q.reshape(b, t, kv_heads, groups, h)
    logits = jnp.einsum(
        "BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST
    )
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    weights = jnp.exp(logits - peak)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    probs = jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0).astype(v.dtype)
    out = jnp.einsum(
        "BKGTS,BSKH->BTKGH", probs, v, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST
    )
    lse = jnp.where(total[..., 0] > 0, peak[..., 0] + jnp.log(total[..., 0]), -jnp.inf)  # (B, K, G, T)
    lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(b, t, n)
    return out.reshape(b, t, n, h).astype(q.dtype), lse
