"""NVFP4 grouped matmul, kernel side: the Pallas kernel (Triton lowering on GPU, interpret mode anywhere) over
(row tile, N tile), its tile -> group map and tile sizes, and `fp4_grouped_matmul`, the one dispatch between the
kernel and the reference (reference.py). docs/kernels.md describes the tiling."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gemma4_jax.kernels.fp4_grouped_matmul.reference import (
    BACKENDS,
    NVFP4_BLOCK,
    _check_operands,
    _group_bounds,
    fp4_grouped_matmul_reference,
)

# ---------------------------------------------------------------------------------------------------------------
# Pallas kernel
# ---------------------------------------------------------------------------------------------------------------


def _decode_e2m1(codes: jax.Array) -> jax.Array:
    """int32 E2M1 codes -> float32, from the bits (no table gather, which Triton has no cheap form of)."""
    exponent = (codes >> 1) & 3
    mantissa = codes & 1
    normal = jax.lax.bitcast_convert_type(((exponent + 126) << 23) | (mantissa << 22), jnp.float32)
    magnitude = jnp.where(exponent == 0, mantissa.astype(jnp.float32) * 0.5, normal)
    return jnp.where((codes & 8) != 0, -magnitude, magnitude)


def _decode_e4m3(bits: jax.Array) -> jax.Array:
    """int32 float8_e4m3fn bit patterns -> float32. Done arithmetically so that the kernel needs no fp8 support
    (Triton's fp8 converts exist only on recent GPUs)."""
    exponent = (bits >> 3) & 15
    mantissa = bits & 7
    normal = jax.lax.bitcast_convert_type(((exponent + 120) << 23) | (mantissa << 20), jnp.float32)
    magnitude = jnp.where(exponent == 0, mantissa.astype(jnp.float32) * (2.0**-9), normal)
    magnitude = jnp.where((bits & 0x7F) == 0x7F, jnp.nan, magnitude)  # e4m3fn has NaN and no inf
    return jnp.where((bits & 0x80) != 0, -magnitude, magnitude)


def _kernel(
    # tile -> group map, int32 [num_row_tiles] each (computed outside by _tile_map)
    tile_group_ref,
    tile_row_start_ref,
    tile_row_count_ref,
    # inputs
    x_ref,  # [M, K] bf16/f16/f32, rows sorted by group
    w_ref,  # uint8 [G, N, K//2]
    scale_bits_ref,  # uint8 [G, N, K//16], the float8_e4m3fn block scales bit-cast
    row_scale_ref,  # float32 [G, N]
    zeros_ref,  # [M, N] zeros, aliased to out_ref: rows no tile covers stay zero
    # output
    out_ref,  # [M, N]
    *,
    k_size: int,
    n_size: int,
    block_m: int,
    block_n: int,
    block_k: int,
    precision,
):
    del zeros_ref  # same buffer as out_ref
    tile, n_tile = pl.program_id(0), pl.program_id(1)
    group = tile_group_ref[tile]
    row_start = tile_row_start_ref[tile]
    row_count = tile_row_count_ref[tile]

    # Tiles past the last group's rows (the grid is sized for the worst case) do nothing, not even weight loads.
    @pl.when(row_count > 0)
    def _compute():
        row_ok = jnp.arange(block_m) < row_count  # [TM]
        n_start = pl.multiple_of(n_tile * block_n, block_n)
        col_ok = n_start + jnp.arange(block_n) < n_size  # [TN]
        rows = pl.ds(row_start, block_m)
        cols = pl.ds(n_start, block_n)

        def k_step(k_tile, acc):
            k_start = pl.multiple_of(k_tile * block_k, block_k)
            # K is a multiple of 16, so the tail of the last K tile is whole bytes and whole scale blocks: the
            # three masks below agree, and masked weights/scales load as 0 (a zero contribution, never NaN).
            k_ok = k_start + jnp.arange(block_k) < k_size  # [TK]
            byte_ok = k_start // 2 + jnp.arange(block_k // 2) < k_size // 2  # [TK/2]
            scale_ok = k_start // NVFP4_BLOCK + jnp.arange(block_k // NVFP4_BLOCK) < k_size // NVFP4_BLOCK
            x = plgpu.load(x_ref.at[rows, pl.ds(k_start, block_k)], mask=row_ok[:, None] & k_ok[None, :], other=0)
            packed = plgpu.load(
                w_ref.at[group, cols, pl.ds(k_start // 2, block_k // 2)],
                mask=col_ok[:, None] & byte_ok[None, :],
                other=0,
            )  # uint8 [TN, TK/2]
            scale_bits = plgpu.load(
                scale_bits_ref.at[group, cols, pl.ds(k_start // NVFP4_BLOCK, block_k // NVFP4_BLOCK)],
                mask=col_ok[:, None] & scale_ok[None, :],
                other=0,
            )  # uint8 [TN, TK/16]
            packed = packed.astype(jnp.int32)
            # Low nibble first: stacking on a new last axis and flattening is Triton's join + reshape.
            codes = jnp.stack([packed & 0x0F, packed >> 4], axis=-1)  # [TN, TK/2, 2]
            codes = codes.reshape(block_n, block_k // NVFP4_BLOCK, NVFP4_BLOCK)
            scales = _decode_e4m3(scale_bits.astype(jnp.int32))  # [TN, TK/16]
            # e2m1 * e4m3 has at most 6 significant bits and lies in [2^-10, 2688]: exact in bf16/f16, so the
            # tensor-core dot sees exact weights; the per-row float32 scale is applied to the float32 accumulator.
            weights = (_decode_e2m1(codes) * scales[:, :, None]).reshape(block_n, block_k).astype(x.dtype)
            return acc + jax.lax.dot_general(
                x, weights, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
            )

        acc = jax.lax.fori_loop(0, pl.cdiv(k_size, block_k), k_step, jnp.zeros((block_m, block_n), jnp.float32))
        row_scale = plgpu.load(row_scale_ref.at[group, cols], mask=col_ok, other=0.0)  # [TN]
        out = (acc * row_scale[None, :]).astype(out_ref.dtype)
        plgpu.store(out_ref.at[rows, cols], out, mask=row_ok[:, None] & col_ok[None, :])


def max_row_tiles(m: int, num_groups: int, block_m: int) -> int:
    """Static, tight upper bound on the row tiles of M rows split into G groups, each group starting a new tile.
    With G' non-empty groups, sum_g ceil(s_g / TM) <= floor((M - G') / TM) + G', which grows with G' and so peaks
    at G' = min(G, M) (reached when every group is one row into its last tile)."""
    busy_groups = min(num_groups, m)
    return max((m - busy_groups) // block_m + busy_groups, 1)


def _tile_map(group_sizes: jax.Array, m: int, block_m: int, num_tiles: int):
    """Row tile t -> (group, first row, valid rows). Each group's rows are cut into tiles of block_m starting at the
    group's first row (as megablox does with its padded group offsets), so no tile spans two groups and tiles write
    disjoint rows. Tiles past the last one get 0 valid rows. Returns three int32 [num_tiles] arrays."""
    starts, ends = _group_bounds(group_sizes, m)
    tiles_per_group = (ends - starts + block_m - 1) // block_m
    tile_ends = jnp.cumsum(tiles_per_group)  # exclusive end tile of each group
    tile = jnp.arange(num_tiles, dtype=jnp.int32)
    # compare_all: one (tiles, G) comparison. The default scan method is a while loop of log2(G) steps per call, and
    # on an H200 its selects and copies were ~0.6 ms of a 10 ms 26B-A4B decode step (480 copies, 240 loop steps).
    # Empty groups own no tile.
    group = jnp.searchsorted(tile_ends, tile, side="right", method="compare_all").astype(jnp.int32)
    in_use = group < group_sizes.shape[0]
    group = jnp.minimum(group, group_sizes.shape[0] - 1)
    row_start = starts[group] + (tile - (tile_ends[group] - tiles_per_group[group])) * block_m
    row_count = jnp.where(in_use, jnp.clip(ends[group] - row_start, 0, block_m), 0)
    return group, jnp.where(in_use, row_start, 0), row_count


def _is_pow2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def default_tiles(m: int, k: int, n: int, num_groups: int) -> tuple[int, int, int]:
    """(block_m, block_n, block_k) heuristics: rows per tile near the average group size (decode has a few rows per
    expert), 64-wide N and K tiles; all powers of two and >= 16 as Triton's dot requires."""
    block_m = min(64, max(16, 1 << max(0, math.ceil(math.log2(max(1, pl.cdiv(m, max(1, num_groups))))))))
    block_n = min(64, max(16, 1 << math.ceil(math.log2(max(1, n)))))
    block_k = min(64, max(32, 1 << math.ceil(math.log2(max(1, k)))))
    return block_m, block_n, block_k


@functools.partial(
    jax.jit, static_argnames=("out_dtype", "block_m", "block_n", "block_k", "interpret", "num_warps", "num_stages")
)
def _pallas(
    x, w, block_scale, row_scale, group_sizes, *, out_dtype, block_m, block_n, block_k, interpret, num_warps, num_stages
):
    m, k = x.shape
    g, n, _ = w.shape
    num_tiles = max_row_tiles(m, g, block_m)
    tile_group, tile_row_start, tile_row_count = _tile_map(group_sizes, m, block_m, num_tiles)
    kernel = functools.partial(
        _kernel,
        k_size=k,
        n_size=n,
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        # float32 activations: a true float32 dot (Triton would otherwise use tf32); bf16/f16: native tensor cores.
        precision=jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None,
    )
    operands = (
        tile_group,
        tile_row_start,
        tile_row_count,
        x,
        w,
        jax.lax.bitcast_convert_type(block_scale, jnp.uint8),
        row_scale,
        jnp.zeros((m, n), out_dtype),
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(num_tiles, pl.cdiv(n, block_n)),
        input_output_aliases={len(operands) - 1: 0},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="fp4_grouped_matmul",
    )(*operands)


def fp4_grouped_matmul_pallas(
    x,
    w,
    block_scale,
    row_scale,
    group_sizes,
    *,
    out_dtype=None,
    block_m=None,
    block_n=None,
    block_k=None,
    interpret=False,
    num_warps=4,
    num_stages=3,
):
    """The Pallas kernel (Triton lowering on GPU; interpret=True runs it anywhere), tile sizes exposed.

    Shapes as `fp4_grouped_matmul`. block_m, block_n: powers of two >= 16; block_k: a power of two >= 32 (so that a
    K tile holds whole bytes and whole 16-input scale blocks). Unset tiles come from `default_tiles`.
    """
    x, w, block_scale, row_scale, group_sizes = map(jnp.asarray, (x, w, block_scale, row_scale, group_sizes))
    m, k, g, n = _check_operands(x, w, block_scale, row_scale, group_sizes)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if m == 0 or n == 0 or g == 0:
        return jnp.zeros((m, n), out_dtype)
    default_m, default_n, default_k = default_tiles(m, k, n, g)
    block_m, block_n, block_k = block_m or default_m, block_n or default_n, block_k or default_k
    for name, value, minimum in (("block_m", block_m, 16), ("block_n", block_n, 16), ("block_k", block_k, 32)):
        if not _is_pow2(value) or value < minimum:
            raise ValueError(f"{name}={value} must be a power of two >= {minimum} (Triton block shapes)")
    return _pallas(
        x,
        w,
        block_scale,
        row_scale,
        group_sizes.astype(jnp.int32),
        out_dtype=out_dtype,
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        interpret=bool(interpret),
        num_warps=num_warps,
        num_stages=num_stages,
    )


# ---------------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------------


def fp4_grouped_matmul(x, w, block_scale, row_scale, group_sizes, *, out_dtype=None, backend="auto", interpret=False):
    """Grouped matmul against NVFP4 experts: for each row r of group g, out[r] = x[r] @ dequantize_nvfp4(w[g],
    block_scale[g], row_scale[g])^T, with the weights dequantized in float32 and a float32 accumulator.

    x: [M, K] (bf16, f16 or f32), rows sorted by group; w: uint8 [G, N, K//2] (ModelOpt layout [out, in/2]);
    block_scale: float8_e4m3fn [G, N, K//16]; row_scale: float32 [G, N]; group_sizes: int32 [G] with sum <= M
    (rows past the sum come out zero; a larger sum is clipped to M). Returns [M, N] in out_dtype (default x.dtype).

    backend: "auto" = the Pallas kernel on GPU (or anywhere when interpret=True), the reference elsewhere;
    "pallas" = the kernel (needs a GPU unless interpret=True); "reference" = `fp4_grouped_matmul_reference`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_gpu = jax.default_backend() == "gpu"
    if backend == "pallas" and not (on_gpu or interpret):
        raise ValueError(
            f"backend='pallas' needs a GPU (the default backend is {jax.default_backend()!r}); pass "
            "interpret=True to run the kernel in interpret mode, or use backend='reference'"
        )
    if backend == "reference" or (backend == "auto" and not (on_gpu or interpret)):
        return fp4_grouped_matmul_reference(x, w, block_scale, row_scale, group_sizes, out_dtype=out_dtype)
    return fp4_grouped_matmul_pallas(
        x, w, block_scale, row_scale, group_sizes, out_dtype=out_dtype, interpret=interpret
    )
