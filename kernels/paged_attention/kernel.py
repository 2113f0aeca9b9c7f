"""Paged attention, kernel side: one Pallas flash-attention kernel (Triton lowering on GPU, interpret mode
anywhere) that reads K/V pools in place through a page table, for decode (few query rows per sequence, the key
axis split across programs, flash-decoding) and prefill (query tiles, key blocks outside each tile's reach
skipped), and `paged_attention`, its entry point. Semantics: reference.py; layout and tiling: docs/kernels.md.

Query rows: the G = N / K query heads that share a KV head are packed with the T tokens into T * G rows
(row r = token r // G, head r % G), so each program loads a key block once for all of them (GQA) and a decode
step with one token still fills a 16-row tile when G >= 2. Grid: (B, K, query tiles, splits).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gemma4_jax.kernels.paged_attention.reference import KVSource, check_sources, visible

# Finite: a fully masked block gives exp(_MASK - _MASK) = 1 as its correction, never inf - inf = NaN; masked
# probabilities are zeroed explicitly, so the value never reaches a sum.
_MASK = -1e30
# Enough programs to fill an H200 (132 SMs) twice over before the key axis is split.
_TARGET_PROGRAMS = 264


def _is_pow2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _pow2_at_least(value: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, value))))


# ---------------------------------------------------------------------------------------------------------------
# Pallas kernel
# ---------------------------------------------------------------------------------------------------------------


def _kernel(
    # per (row, query tile) range of key blocks that can hold a visible key, int32 (B, n_q_tiles) each
    tile_lo_ref,
    tile_hi_ref,
    # inputs
    page_table_ref,  # (B, P) int32
    q_ref,  # (B, K, Rq, H): T * G packed query rows per KV head, padded to whole tiles
    q_pos_ref,  # (B, Rq) int32, -1 on padding rows
    q_blk_ref,  # (B, Rq) int32 vision block ids, or None
    k_ref,  # (num_pages * page_size, K, H): the pool with pages flattened (a free reshape)
    v_ref,  # (num_pages * page_size, K, H)
    key_pos_ref,  # (B, S) int32, S = P * page_size, -1 on empty slots
    key_blk_ref,  # (B, S) int32, or None
    # outputs
    o_ref,  # (splits, B, K, Rq, H): float32 partials when several are combined, else q's dtype
    lse_ref,  # (splits, B, K, Rq) float32
    *,
    block_q: int,
    block_k: int,
    page_size: int,
    num_keys: int,
    num_splits: int,
    sliding_window: int | None,
    precision,
):
    b, kv_head, q_tile, split = (pl.program_id(axis) for axis in range(4))
    rows = pl.ds(pl.multiple_of(q_tile * block_q, block_q), block_q)
    # This split's share of the tile's key-block range: ragged rows get ragged ranges, and a split whose share is
    # empty runs no iteration (an empty context, a padding row).
    lo, hi = tile_lo_ref[b, q_tile], tile_hi_ref[b, q_tile]
    share = (hi - lo + num_splits - 1) // num_splits
    start = lo + split * share
    stop = jnp.minimum(hi, start + share)

    q = plgpu.load(q_ref.at[b, kv_head, rows, :])  # (TQ, H)
    q_pos = plgpu.load(q_pos_ref.at[b, rows])  # (TQ,)
    q_blk = None if q_blk_ref is None else plgpu.load(q_blk_ref.at[b, rows])
    head_dim = q.shape[-1]
    cols = jnp.arange(head_dim)[None, :]

    def body(j, carry):
        acc, peak, total = carry
        lane = j * block_k + jnp.arange(block_k)  # logical key index of each lane
        lane_ok = lane < num_keys
        lane = jnp.where(lane_ok, lane, 0)
        # Page of each lane from the table, then its row in the flattened pool: one pointer per key row, so a
        # block may span pages of any size (a 16-token page, a ring of R slots, a dense row).
        page = plgpu.load(page_table_ref.at[b, lane // page_size], mask=lane_ok, other=0)
        pool_row = (page * page_size + lane % page_size)[:, None]
        key_pos = plgpu.load(key_pos_ref.at[b, lane], mask=lane_ok, other=-1)
        key_blk = None if key_blk_ref is None else plgpu.load(key_blk_ref.at[b, lane], mask=lane_ok, other=-1)
        k = plgpu.load(k_ref.at[pool_row, kv_head, cols], mask=lane_ok[:, None], other=0).astype(q.dtype)
        logits = jax.lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )  # (TQ, TK) float32
        sees = visible(
            q_pos[:, None],
            key_pos[None, :],
            sliding_window,
            None if q_blk is None else q_blk[:, None],
            None if key_blk is None else key_blk[None, :],
        )
        logits = jnp.where(sees, logits, _MASK)
        new_peak = jnp.maximum(peak, jnp.max(logits, axis=1))
        correction = jnp.exp(peak - new_peak)
        probs = jnp.where(sees, jnp.exp(logits - new_peak[:, None]), 0.0)
        total = correction * total + jnp.sum(probs, axis=1)
        v = plgpu.load(v_ref.at[pool_row, kv_head, cols], mask=lane_ok[:, None], other=0).astype(q.dtype)
        # Probabilities in the values' dtype for the tensor-core product (as the reference casts them).
        acc = acc * correction[:, None] + jax.lax.dot_general(
            probs.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )
        return acc, new_peak, total

    init = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), _MASK, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    acc, peak, total = jax.lax.fori_loop(start, stop, body, init)
    seen = total > 0
    safe_total = jnp.where(seen, total, 1.0)
    out = acc / safe_total[:, None]  # rows that saw nothing keep acc == 0
    lse = jnp.where(seen, peak + jnp.log(safe_total), -jnp.inf)
    plgpu.store(o_ref.at[split, b, kv_head, rows, :], out.astype(o_ref.dtype))
    plgpu.store(lse_ref.at[split, b, kv_head, rows], lse)


# ---------------------------------------------------------------------------------------------------------------
# Tiles and ranges
# ---------------------------------------------------------------------------------------------------------------


def default_tiles(rows: int, num_keys: int, head_dim: int) -> tuple[int, int]:
    """(block_q, block_k): powers of two >= 16 (Triton's dot minimum). Narrower tiles for head dim 512, whose
    float32 accumulator (block_q x 512) must stay in registers; not yet tuned on a GPU."""
    cap_q, cap_k = (32, 32) if head_dim >= 512 else (64, 64)
    block_q = min(cap_q, max(16, _pow2_at_least(rows)))
    block_k = min(cap_k, max(16, _pow2_at_least(num_keys)))
    return block_q, block_k


def default_splits(programs: int, num_key_blocks: int) -> int:
    """Flash-decoding: split the key axis when (B, K, query tiles) alone cannot fill the GPU, keeping at least two
    key blocks per split."""
    if programs >= _TARGET_PROGRAMS:
        return 1
    return max(1, min(pl.cdiv(_TARGET_PROGRAMS, programs), num_key_blocks // 2, 16))


def tile_ranges(
    q_pos_rows: jax.Array,
    q_blk_rows: jax.Array | None,
    key_pos: jax.Array,
    key_blk: jax.Array | None,
    *,
    block_q: int,
    block_k: int,
    sliding_window: int | None,
) -> tuple[jax.Array, jax.Array]:
    """For each query tile, the range [lo, hi) of key blocks that may hold a key one of its rows sees. From
    position bounds only, so it holds for any key order (a ring, a dense row): a block is needed when its lowest
    position is <= the tile's highest (causal) or their vision-block ids overlap, and, with a window W, its
    highest position is > the tile's lowest - W. Blocks outside the range are never loaded (prefill's upper
    triangle, keys out of every query's window, pages past a row's length). q_pos_rows, q_blk_rows: (B, Rq);
    key_pos, key_blk: (B, S). Returns int32 (B, Rq / block_q) each."""
    b, num_rows = q_pos_rows.shape
    num_keys = key_pos.shape[1]
    num_blocks = pl.cdiv(num_keys, block_k)
    big = jnp.iinfo(jnp.int32).max

    def bounds(values, valid, shape):
        values, valid = values.reshape(shape), valid.reshape(shape)
        return (
            jnp.min(jnp.where(valid, values, big), -1),
            jnp.max(jnp.where(valid, values, -1), -1),
            jnp.any(valid, -1),
        )

    pad = num_blocks * block_k - num_keys
    key_pos = jnp.pad(key_pos, ((0, 0), (0, pad)), constant_values=-1)
    key_valid = key_pos >= 0
    k_shape, q_shape = (b, num_blocks, block_k), (b, num_rows // block_q, block_q)
    k_min, k_max, k_any = bounds(key_pos, key_valid, k_shape)
    q_min, q_max, q_any = bounds(q_pos_rows, q_pos_rows >= 0, q_shape)
    reach = k_min[:, None, :] <= q_max[:, :, None]
    if q_blk_rows is not None:
        key_blk = jnp.pad(key_blk, ((0, 0), (0, pad)), constant_values=-1)
        kb_min, kb_max, kb_any = bounds(key_blk, key_valid & (key_blk >= 0), k_shape)
        qb_min, qb_max, qb_any = bounds(q_blk_rows, (q_pos_rows >= 0) & (q_blk_rows >= 0), q_shape)
        reach |= (
            kb_any[:, None, :]
            & qb_any[:, :, None]
            & (kb_min[:, None, :] <= qb_max[:, :, None])
            & (qb_min[:, :, None] <= kb_max[:, None, :])
        )
    needed = k_any[:, None, :] & q_any[:, :, None] & reach  # (B, n_q_tiles, n_key_blocks)
    if sliding_window is not None:
        needed &= k_max[:, None, :] > q_min[:, :, None] - sliding_window
    some = jnp.any(needed, -1)
    lo = jnp.argmax(needed, -1)
    hi = num_blocks - jnp.argmax(needed[..., ::-1], -1)
    return jnp.where(some, lo, 0).astype(jnp.int32), jnp.where(some, hi, 0).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


def _pack_rows(a: jax.Array, groups: int, num_rows: int, fill) -> jax.Array:
    """(B, T) per token -> (B, num_rows) per packed query row (token r // G), padded with `fill`."""
    a = jnp.repeat(a, groups, axis=1)
    return jnp.pad(a, ((0, 0), (0, num_rows - a.shape[1])), constant_values=fill)


def combine(outs: jax.Array, lses: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Merge partial attentions over disjoint key sets (splits, sources): outs (P, ..., H) each normalized over
    its own keys, lses (P, ...) their log-sum-exp (-inf: saw nothing). -> (float32 out (..., H), lse (...))."""
    peak = jnp.max(lses, axis=0)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    weights = jnp.exp(lses - peak)  # 0 for empty partials
    total = jnp.sum(weights, axis=0)
    safe = jnp.where(total > 0, total, 1.0)
    out = jnp.sum(weights[..., None] * outs.astype(jnp.float32), axis=0) / safe[..., None]
    return out, jnp.where(total > 0, peak + jnp.log(safe), -jnp.inf)


@functools.partial(
    jax.jit,
    static_argnames=("sliding_window", "num_splits", "block_q", "block_k", "interpret", "num_warps", "num_stages"),
)
def _paged_attention(
    q, sources, q_positions, q_blocks, *, sliding_window, num_splits, block_q, block_k, interpret, num_warps, num_stages
):
    groups, kv_heads = check_sources(q, sources, q_positions, q_blocks)
    b, t, n, h = q.shape
    rows = t * groups
    num_rows = pl.cdiv(rows, block_q) * block_q
    num_q_tiles = num_rows // block_q
    # (B, T, K, G, H) -> (B, K, T * G, H): the rows of one KV head are contiguous.
    q_rows = q.reshape(b, t, kv_heads, groups, h).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, rows, h)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, num_rows - rows), (0, 0)))
    q_pos_rows = _pack_rows(q_positions.astype(jnp.int32), groups, num_rows, -1)
    q_blk_rows = None if q_blocks is None else _pack_rows(q_blocks.astype(jnp.int32), groups, num_rows, -1)
    single = len(sources) == 1 and num_splits == 1
    out_dtype = q.dtype if single else jnp.float32
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

    partial_outs, partial_lses = [], []
    for src in sources:
        pages, page_size = src.k_pages.shape[:2]
        num_keys = src.positions.shape[1]
        key_pos = src.positions.astype(jnp.int32)
        key_blk = None if src.blocks is None else src.blocks.astype(jnp.int32)
        lo, hi = tile_ranges(
            q_pos_rows, q_blk_rows, key_pos, key_blk, block_q=block_q, block_k=block_k, sliding_window=sliding_window
        )
        kernel = functools.partial(
            _kernel,
            block_q=block_q,
            block_k=block_k,
            page_size=page_size,
            num_keys=num_keys,
            num_splits=num_splits,
            sliding_window=sliding_window,
            precision=precision,
        )
        flat = (pages * page_size, kv_heads, h)
        operands = (
            lo,
            hi,
            src.page_table.astype(jnp.int32),
            q_rows,
            q_pos_rows,
            q_blk_rows,
            src.k_pages.reshape(flat),
            src.v_pages.reshape(flat),
            key_pos,
            key_blk,
        )
        present = [x is not None for x in operands]

        # None operands (no vision blocks) are left out of the call and passed to the kernel as None.
        def kernel_with_gaps(*refs, kernel=kernel, present=present):
            refs = iter(refs)
            inputs = [next(refs) if p else None for p in present]
            return kernel(*inputs, *refs)

        out, lse = pl.pallas_call(
            kernel_with_gaps,
            out_shape=(
                jax.ShapeDtypeStruct((num_splits, b, kv_heads, num_rows, h), out_dtype),
                jax.ShapeDtypeStruct((num_splits, b, kv_heads, num_rows), jnp.float32),
            ),
            grid=(b, kv_heads, num_q_tiles, num_splits),
            compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
            interpret=interpret,
            name="paged_attention",
        )(*[x for x in operands if x is not None])
        partial_outs.append(out)
        partial_lses.append(lse)

    if single:
        out, lse = partial_outs[0][0], partial_lses[0][0]
    else:
        out, lse = combine(jnp.concatenate(partial_outs), jnp.concatenate(partial_lses))
    # (B, K, Rq, H) -> (B, T, N, H)
    out = out[:, :, :rows].reshape(b, kv_heads, t, groups, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)
    lse = lse[:, :, :rows].reshape(b, kv_heads, t, groups).transpose(0, 2, 1, 3).reshape(b, t, n)
    return out.astype(q.dtype), lse


def paged_attention(
    q: jax.Array,
    sources,
    q_positions: jax.Array,
    *,
    sliding_window: int | None = None,
    q_blocks: jax.Array | None = None,
    num_splits: int | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool = False,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> tuple[jax.Array, jax.Array]:
    """Attention of q (B, T, N, H) over key sources (reference.KVSource, concatenated on the key axis) read in
    place. Same result as `paged_attention_reference`: (out (B, T, N, H) in q's dtype, lse (B, T, N) float32).

    One kernel serves decode (T small: the key axis split `num_splits` ways, flash-decoding, partials merged by
    log-sum-exp) and prefill (T * G packed rows cut into `block_q` tiles, each visiting only the key blocks it can
    see). Unset tiles, splits and warps come from `default_tiles` / `default_splits` / the head dim.
    interpret=True runs the kernel anywhere (Pallas interpret mode); otherwise it needs a GPU.
    """
    sources = tuple(KVSource(*src) for src in sources)
    groups, _ = check_sources(q, sources, q_positions, q_blocks)
    b, t, _, h = q.shape
    longest = max(src.positions.shape[1] for src in sources)
    default_q, default_k = default_tiles(t * groups, longest, h)
    block_q, block_k = block_q or default_q, block_k or default_k
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        if not _is_pow2(value) or value < 16:
            raise ValueError(f"{name}={value} must be a power of two >= 16 (Triton block shapes)")
    if num_splits is None:
        programs = b * sources[0].k_pages.shape[2] * pl.cdiv(t * groups, block_q)
        num_splits = default_splits(programs, pl.cdiv(longest, block_k))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    return _paged_attention(
        q,
        sources,
        q_positions,
        q_blocks,
        sliding_window=sliding_window,
        num_splits=num_splits,
        block_q=block_q,
        block_k=block_k,
        interpret=bool(interpret),
        num_warps=num_warps or (8 if h >= 512 else 4),
        num_stages=num_stages,
    )
