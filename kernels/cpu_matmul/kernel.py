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
# Few-row products of several weights sharing one input, one call each (cpu_matmul_fused.cc).
FUSED_SOURCE = Path(__file__).with_name("cpu_matmul_fused.cc")
MULTI_TARGET = "gemma4_cpu_matmul_multi"
GATE_UP_TARGET = "gemma4_cpu_matmul_gate_up"
# Activations the gated product applies to its gate.
GATE_ACTIVATIONS = {"gelu_tanh": lambda v: jax.nn.gelu(v, approximate=True)}


def load() -> str | None:
    """Build and register the custom calls once per process: None when ready, else why they are not."""
    return (cpu_build.load(SOURCE, "Gemma4CpuMatmul", TARGET)
            or cpu_build.load(SOURCE, "Gemma4CpuMatmulGated", GATED_TARGET)
            or cpu_build.load(FUSED_SOURCE, "Gemma4CpuMatmulMulti", MULTI_TARGET)
            or cpu_build.load(FUSED_SOURCE, "Gemma4CpuMatmulGateUp", GATE_UP_TARGET))


def _ready() -> None:
    """Raise RuntimeError with the reason when the kernels could not be built."""
    reason = load()
    if reason is not None:
        raise RuntimeError(reason)


def _check_activation(name: str, what: str) -> None:
    if name not in GATE_ACTIVATIONS:
        raise ValueError(f"{what} must be one of {sorted(GATE_ACTIVATIONS)}, got {name!r}")


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
def vectors_on_this_cpu() -> bool:
    """Whether this CPU runs the kernels' vector blocks at all (AVX-512; the build is -march=native). Without it the
    calls still work, through plain loops slower than XLA's own products, so the model routes nothing to them."""
    return "avx512f" in cpu_build.cpu_flags().split()


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
        _check_activation(gate_activation, "gate_activation")
    _ready()
    if gate is not None:
        call = jax.ffi.ffi_call(GATED_TARGET, jax.ShapeDtypeStruct((x.shape[0], n), x.dtype))
        table = jnp.asarray(activation_table(gate_activation))
        return call(x, w, gate, table, transposed=np.int64(bool(transposed)))
    out = jnp.float32 if float32_out or softcap is not None else x.dtype
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], n), out))
    return call(x, w, transposed=np.int64(bool(transposed)), softcap=np.float32(softcap or 0.0))


def _check_few_rows(x: jax.Array, weights, what: str) -> None:
    if x.ndim != 2 or not 1 <= x.shape[0] <= MANY_ROWS:
        raise ValueError(f"{what} takes x (M, K) with 1 to {MANY_ROWS} rows, got {x.shape}")
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"{what} takes float32 or bfloat16, got {x.dtype}")
    if not weights:
        raise ValueError(f"{what} needs at least one weight")
    for w in weights:
        if w.ndim != 2 or w.shape[0] != x.shape[1] or w.dtype != x.dtype:
            raise ValueError(f"{what}: each weight must be (K, N) = ({x.shape[1]}, N) {x.dtype}, got {w.shape} "
                             f"{w.dtype}")


def cpu_matmul_multi(x: jax.Array, weights) -> list[jax.Array]:
    """[x @ w for w in weights] from one call: x (M, K) with M <= MANY_ROWS, each w (K, N_i) of x's dtype (float32
    or bfloat16) -> (M, N_i) each, bit for bit `cpu_matmul(x, w)`. One parallel region over every product's
    columns: a layer's q/k/v projections without a barrier between them (cpu_matmul_fused.cc).
    Raises ValueError for shapes or dtypes it does not take, RuntimeError when the kernel could not be built."""
    weights = list(weights)
    _check_few_rows(x, weights, "cpu_matmul_multi")
    _ready()
    shapes = [jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), x.dtype) for w in weights]
    return list(jax.ffi.ffi_call(MULTI_TARGET, shapes)(x, *weights))


def cpu_matmul_gate_up(x: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                       activation: str = "gelu_tanh") -> jax.Array:
    """act(x @ w_gate) * (x @ w_up) from one call, bfloat16: x (M, K) with M <= MANY_ROWS, both weights (K, N) ->
    (M, N). Each product rounded to bfloat16 as `cpu_matmul` returns it, act looked up in `activation_table`: the
    bits of the MLP's separate products and elementwise graph (cpu_matmul_fused.cc).
    Raises ValueError for shapes or dtypes it does not take, RuntimeError when the kernel could not be built."""
    _check_few_rows(x, [w_gate, w_up], "cpu_matmul_gate_up")
    if x.dtype != jnp.bfloat16:
        raise ValueError(f"cpu_matmul_gate_up is bfloat16 only, got {x.dtype}")
    if w_gate.shape != w_up.shape:
        raise ValueError(f"gate and up weights must have one shape, got {w_gate.shape} and {w_up.shape}")
    _check_activation(activation, "activation")
    _ready()
    call = jax.ffi.ffi_call(GATE_UP_TARGET, jax.ShapeDtypeStruct((x.shape[0], w_gate.shape[1]), x.dtype))
    return call(x, w_gate, w_up, jnp.asarray(activation_table(activation)))
