"""NVFP4 grouped matmul: the MoE expert projection with the experts kept packed (4 bits per weight) in memory.
A kernel folder: kernel.py (Pallas), reference.py (pure jnp), test_fp4_grouped_matmul.py (interpret mode vs the
reference, and the reference vs a numpy float64 oracle).

Layout (ModelOpt NVFP4, as stored in e.g. nvidia/Gemma-4-26B-A4B-NVFP4, one expert per group):
  w            uint8          [G, N, K//2]   two E2M1 codes per byte; input 2j is the LOW nibble of byte j
  block_scale  float8_e4m3fn  [G, N, K//16]  one scale per 16 consecutive inputs of an output row
  row_scale    float32        [G, N]         the per-tensor `weight_scale_2`, broadcast per output row so that a
                                             fused gate/up expert can carry one scale per half
  weight[g, n, k] = e2m1(w) * float32(block_scale[g, n, k // 16]) * row_scale[g, n]

Entry points: `fp4_grouped_matmul` dispatches between the Pallas kernel (GPU, via the Triton lowering; or any
backend in interpret mode) and `fp4_grouped_matmul_reference`, a pure-jnp version that dequantizes to float32 and
uses `jax.lax.ragged_dot`. `fp4_grouped_matmul_pallas` is the kernel with its tile sizes exposed. The tiling and
the tile -> group map are described in docs/kernels.md.
"""

from gemma4_jax.kernels.fp4_grouped_matmul.kernel import (
    default_tiles,
    fp4_grouped_matmul,
    fp4_grouped_matmul_pallas,
    max_row_tiles,
)
from gemma4_jax.kernels.fp4_grouped_matmul.reference import (
    BACKENDS,
    E2M1_VALUES,
    NVFP4_BLOCK,
    dequantize_nvfp4,
    fp4_grouped_matmul_reference,
    unpack_e2m1,
)

__all__ = [
    "BACKENDS", "E2M1_VALUES", "NVFP4_BLOCK", "default_tiles", "dequantize_nvfp4", "fp4_grouped_matmul",
    "fp4_grouped_matmul_pallas", "fp4_grouped_matmul_reference", "max_row_tiles", "unpack_e2m1",
]
