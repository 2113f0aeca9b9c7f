"""The CPU few-row weight product: registering cpu_matmul.cc with XLA (kernels/cpu_build.py) and calling it."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax.kernels import cpu_build

SOURCE = Path(__file__).with_name("cpu_matmul.cc")
TARGET = "gemma4_cpu_matmul"


def load() -> str | None:
    """Build and register the custom call once per process: None when ready, else why it is not."""
    return cpu_build.load(SOURCE, "Gemma4CpuMatmul", TARGET)


# Products above this many rows go through the packed panels (cpu_matmul.cc kManyRows; bfloat16 with an even K),
# which alone also give a float32 result of bfloat16 operands and the LM head's soft-cap.
MANY_ROWS = 4


def takes_packed(dtype, rows: int, k: int) -> bool:
    """Whether a product of `rows` rows and contraction K in this dtype runs in the packed panels."""
    return rows > MANY_ROWS and (jnp.dtype(dtype) == jnp.float32 or k % 2 == 0)


def cpu_matmul(x: jax.Array, w: jax.Array, *, transposed: bool = False, float32_out: bool = False,
               softcap: float | None = None) -> jax.Array:
    """x (M, K) @ w, w (K, N) or, transposed, (N, K) -> (M, N) in x's dtype; equals `matmul_reference`. x and w
    float32 or bfloat16, the same. float32_out: a float32 result (of bfloat16 operands: the rounded values widened);
    softcap: then tanh(y / softcap) * softcap (the LM head); both need `takes_packed` (more than MANY_ROWS rows).
    Raises ValueError for shapes or dtypes it does not take, RuntimeError when the kernel could not be built."""
    if x.ndim != 2 or w.ndim != 2:
        raise ValueError(f"cpu_matmul takes x (M, K) and a 2-D weight, got {x.shape} and {w.shape}")
    k, n = (w.shape[1], w.shape[0]) if transposed else w.shape
    if x.shape[1] != k:
        raise ValueError(f"x {x.shape} does not fit the weight {w.shape} (transposed={transposed})")
    if x.dtype != w.dtype or x.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"cpu_matmul takes float32 or bfloat16 x and weight of one dtype, got {x.dtype}, {w.dtype}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive, got {softcap}")
    if (float32_out or softcap is not None) and not takes_packed(x.dtype, x.shape[0], k):
        raise ValueError(f"a float32 result or a soft-cap needs more than {MANY_ROWS} rows (and an even K in "
                         f"bfloat16); got {x.dtype} x {x.shape}")
    reason = load()
    if reason is not None:
        raise RuntimeError(reason)
    out = jnp.float32 if float32_out or softcap is not None else x.dtype
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], n), out))
    return call(x, w, transposed=np.int64(bool(transposed)), softcap=np.float32(softcap or 0.0))
