"""The CPU few-row weight product: registering cpu_matmul.cc with XLA (kernels/cpu_build.py) and calling it."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax.kernels import cpu_build

SOURCE = Path(__file__).with_name("cpu_matmul.cc")
TARGET = "gemma4_cpu_matmul"
GATED_TARGET = "gemma4_cpu_matmul_gated"
# Activations the gated product applies to its gate.
GATE_ACTIVATIONS = {"gelu_tanh": lambda v: jax.nn.gelu(v, approximate=True)}


def load() -> str | None:
    """Build and register the custom calls once per process: None when ready, else why they are not."""
    return cpu_build.load(SOURCE, "Gemma4CpuMatmul", TARGET) or cpu_build.load(
        SOURCE, "Gemma4CpuMatmulGated", GATED_TARGET)


@functools.cache
def activation_table(name: str) -> np.ndarray:
    """(65537,) uint16: the bfloat16 bits of GATE_ACTIVATIONS[name](v) for every bfloat16 v, indexed by v's bits,
    and a pad entry (the kernel's 32-bit gathers read one past the last). Evaluated by XLA here, op by op (each
    operation rounded to bfloat16, as in the model's fused graph: the same bits for all 65536 inputs, NaNs
    included), outside whatever program is being traced."""
    bits = np.arange(65536, dtype=np.uint16)
    with jax.ensure_compile_time_eval():
        values = jax.lax.bitcast_convert_type(jnp.asarray(bits), jnp.bfloat16)
        out = jax.lax.bitcast_convert_type(GATE_ACTIVATIONS[name](values), jnp.uint16)
        table = np.asarray(out)
    return np.concatenate([table, table[:1]])


# Products above this many rows go through the packed panels (cpu_matmul.cc kManyRows; bfloat16 with an even K),
# which alone also give a float32 result of bfloat16 operands and the LM head's soft-cap.
MANY_ROWS = 4


@functools.cache
def packed_on_this_cpu(dtype) -> bool:
    """Whether this CPU runs the packed panels in this dtype (the build is -march=native: cpu_matmul.cc compiles
    them for AVX-512, and bfloat16 for AVX512-BF16); elsewhere a packed-only request (the epilogues) is refused by
    the call at run time, so it must not be made."""
    flags = cpu_build.cpu_flags().split()
    return "avx512f" in flags and (jnp.dtype(dtype) == jnp.float32 or "avx512_bf16" in flags)


def takes_packed(dtype, rows: int, k: int) -> bool:
    """Whether a product of `rows` rows and contraction K in this dtype runs in the packed panels."""
    return rows > MANY_ROWS and (jnp.dtype(dtype) == jnp.float32 or k % 2 == 0) and packed_on_this_cpu(dtype)


def cpu_matmul(x: jax.Array, w: jax.Array, *, transposed: bool = False, float32_out: bool = False,
               softcap: float | None = None, gate: jax.Array | None = None,
               gate_activation: str = "gelu_tanh") -> jax.Array:
    """x (M, K) @ w, w (K, N) or, transposed, (N, K) -> (M, N) in x's dtype; equals `matmul_reference`. x and w
    float32 or bfloat16, the same. float32_out: a float32 result (of bfloat16 operands: the rounded values widened);
    softcap: then tanh(y / softcap) * softcap (the LM head); gate (M, N), bfloat16 only: act(gate) * y, act
    (gate_activation) looked up in `activation_table` (the MLP's up projection: the same bits as XLA's
    elementwise graph). All three need `takes_packed` (more than MANY_ROWS rows).
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
    epilogue = float32_out or softcap is not None or gate is not None
    if epilogue and not takes_packed(x.dtype, x.shape[0], k):
        raise ValueError(f"a float32 result, a soft-cap or a gate needs more than {MANY_ROWS} rows (and an even K in "
                         f"bfloat16); got {x.dtype} x {x.shape}")
    if gate is not None:
        if float32_out or softcap is not None:
            raise ValueError("a gated product takes neither float32_out nor softcap")
        if x.dtype != jnp.bfloat16:
            raise ValueError(f"a gated product is bfloat16 only, got {x.dtype}")
        if gate.shape != (x.shape[0], n) or gate.dtype != x.dtype:
            raise ValueError(f"gate must be ({x.shape[0]}, {n}) {x.dtype}, got {gate.shape} {gate.dtype}")
        if gate_activation not in GATE_ACTIVATIONS:
            raise ValueError(f"gate_activation must be one of {sorted(GATE_ACTIVATIONS)}, got {gate_activation!r}")
    reason = load()
    if reason is not None:
        raise RuntimeError(reason)
    if gate is not None:
        call = jax.ffi.ffi_call(GATED_TARGET, jax.ShapeDtypeStruct((x.shape[0], n), x.dtype))
        table = jnp.asarray(activation_table(gate_activation))
        return call(x, w, gate, table, transposed=np.int64(bool(transposed)))
    out = jnp.float32 if float32_out or softcap is not None else x.dtype
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], n), out))
    return call(x, w, transposed=np.int64(bool(transposed)), softcap=np.float32(softcap or 0.0))
