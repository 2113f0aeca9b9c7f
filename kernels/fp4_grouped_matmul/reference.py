"""NVFP4 grouped matmul, reference side: the format constants, dequantization and the pure-jnp grouped matmul
(float32 weights through `jax.lax.ragged_dot`) that the Pallas kernel (kernel.py) is tested against.
Layout and contract: see the package docstring."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# The 16 values of an E2M1 code (1 sign, 2 exponent, 1 mantissa bit; no inf/nan): 0..7 positive, 8..15 negative.
E2M1_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32
)
E2M1_VALUES.setflags(write=False)

NVFP4_BLOCK = 16  # inputs per block scale
_X_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
BACKENDS = ("auto", "pallas", "reference")


# ---------------------------------------------------------------------------------------------------------------
# Dequantization (pure jnp; also what the reference matmul uses)
# ---------------------------------------------------------------------------------------------------------------


def unpack_e2m1(packed: jax.Array) -> jax.Array:
    """uint8 [..., K//2] -> float32 [..., K]; element 2j is the low nibble of byte j, 2j+1 the high nibble."""
    packed = jnp.asarray(packed)
    if packed.dtype != jnp.uint8:
        raise ValueError(f"unpack_e2m1 expects packed uint8 E2M1 codes, got dtype {packed.dtype}")
    if packed.ndim == 0:
        raise ValueError("unpack_e2m1 expects an array with a last (packed) axis, got a scalar")
    codes = jnp.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])
    return jnp.asarray(E2M1_VALUES)[codes.astype(jnp.int32)]


def dequantize_nvfp4(w: jax.Array, block_scale: jax.Array, row_scale: jax.Array) -> jax.Array:
    """NVFP4 -> float32 weights.

    w: uint8 [..., N, K//2]; block_scale: float8_e4m3fn [..., N, K//16]; row_scale: float32 [..., N] (anything that
    broadcasts to w.shape[:-1], e.g. a per-tensor scalar). Returns float32 [..., N, K] =
    e2m1 * float32(block_scale) * row_scale, all products in float32 (the scaled weights are not exact in bf16).
    """
    w, block_scale, row_scale = jnp.asarray(w), jnp.asarray(block_scale), jnp.asarray(row_scale)
    if w.dtype != jnp.uint8 or w.ndim < 2:
        raise ValueError(f"NVFP4 weight must be uint8 [..., N, K//2], got {w.dtype} {w.shape}")
    if block_scale.dtype != jnp.float8_e4m3fn:
        raise ValueError(f"NVFP4 block_scale must be float8_e4m3fn, got {block_scale.dtype}")
    k = 2 * w.shape[-1]
    if k % NVFP4_BLOCK:
        raise ValueError(f"NVFP4 weight {w.shape} has K={k} inputs, not a multiple of the block size {NVFP4_BLOCK}")
    expected_scale = (*w.shape[:-1], k // NVFP4_BLOCK)
    if block_scale.shape != expected_scale:
        raise ValueError(
            f"NVFP4 block_scale shape {block_scale.shape} does not match weight {w.shape}: "
            f"expected {expected_scale} (one scale per {NVFP4_BLOCK} inputs)"
        )
    if row_scale.dtype != jnp.float32:
        raise ValueError(f"NVFP4 row_scale must be float32, got {row_scale.dtype}")
    try:
        row_scale = jnp.broadcast_to(row_scale, w.shape[:-1])
    except ValueError:
        raise ValueError(f"NVFP4 row_scale shape {row_scale.shape} does not broadcast to {w.shape[:-1]}") from None
    values = unpack_e2m1(w).reshape(*w.shape[:-1], k // NVFP4_BLOCK, NVFP4_BLOCK)
    scaled = values * block_scale.astype(jnp.float32)[..., None] * row_scale[..., None, None]
    return scaled.reshape(*w.shape[:-1], k)


# ---------------------------------------------------------------------------------------------------------------
# Operand checks and the shared group bookkeeping
# ---------------------------------------------------------------------------------------------------------------


def _check_operands(x, w, block_scale, row_scale, group_sizes) -> tuple[int, int, int, int]:
    """Validates shapes/dtypes of a grouped NVFP4 matmul; returns (M, K, G, N)."""
    if x.ndim != 2:
        raise ValueError(f"x must be [M, K], got shape {x.shape}")
    if x.dtype not in _X_DTYPES:
        raise ValueError(f"x dtype must be bfloat16, float16 or float32, got {x.dtype}")
    m, k = x.shape
    if k % NVFP4_BLOCK:
        raise ValueError(
            f"K={k} (x shape {x.shape}) must be a multiple of {NVFP4_BLOCK}: NVFP4 scales blocks of "
            f"{NVFP4_BLOCK} inputs"
        )
    if w.dtype != jnp.uint8 or w.ndim != 3:
        raise ValueError(f"w must be packed uint8 [G, N, K//2], got {w.dtype} shape {w.shape}")
    g, n, half_k = w.shape
    if 2 * half_k != k:
        raise ValueError(f"w shape {w.shape} holds K={2 * half_k} inputs but x shape {x.shape} has K={k}")
    if block_scale.dtype != jnp.float8_e4m3fn:
        raise ValueError(f"block_scale must be float8_e4m3fn, got {block_scale.dtype}")
    if block_scale.shape != (g, n, k // NVFP4_BLOCK):
        raise ValueError(
            f"block_scale shape {block_scale.shape} must be [G, N, K//16] = {(g, n, k // NVFP4_BLOCK)} "
            f"for w shape {w.shape}"
        )
    if row_scale.dtype != jnp.float32 or row_scale.shape != (g, n):
        raise ValueError(f"row_scale must be float32 [G, N] = {(g, n)}, got {row_scale.dtype} shape {row_scale.shape}")
    if group_sizes.ndim != 1 or group_sizes.shape[0] != g or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(
            f"group_sizes must be an integer [G] = [{g}] array, got {group_sizes.dtype} shape {group_sizes.shape}"
        )
    return m, k, g, n


def _group_bounds(group_sizes: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """Row range [start, end) of each group, clipped to the M rows that exist (so a bad sum can't write past M)."""
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), m)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    return starts, ends


# ---------------------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def _reference(x, w, block_scale, row_scale, group_sizes, out_dtype):
    m = x.shape[0]
    starts, ends = _group_bounds(group_sizes, m)
    weights = dequantize_nvfp4(w, block_scale, row_scale)  # [G, N, K] float32
    out = jax.lax.ragged_dot(
        x.astype(jnp.float32),
        jnp.swapaxes(weights, 1, 2),  # [G, K, N]
        ends - starts,
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )
    # ragged_dot leaves rows past sum(group_sizes) unspecified; the contract says zeros.
    out = jnp.where((jnp.arange(m) < ends[-1])[:, None], out, 0.0)
    return out.astype(out_dtype)


def fp4_grouped_matmul_reference(
    x, w, block_scale, row_scale, group_sizes, *, out_dtype=None, backend="reference", interpret=False
):
    """Pure-jnp grouped NVFP4 matmul (same signature as `fp4_grouped_matmul`; backend/interpret are ignored).

    Dequantizes every expert to float32 and runs `jax.lax.ragged_dot` in float32 at HIGHEST precision.
    x: [M, K]; w: uint8 [G, N, K//2]; block_scale: float8_e4m3fn [G, N, K//16]; row_scale: float32 [G, N];
    group_sizes: int [G]. Returns [M, N] in out_dtype (default x.dtype).
    """
    del backend, interpret
    x, w, block_scale, row_scale, group_sizes = map(jnp.asarray, (x, w, block_scale, row_scale, group_sizes))
    m, _, g, n = _check_operands(x, w, block_scale, row_scale, group_sizes)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if m == 0 or n == 0 or g == 0:
        return jnp.zeros((m, n), out_dtype)
    return _reference(x, w, block_scale, row_scale, group_sizes, out_dtype)


