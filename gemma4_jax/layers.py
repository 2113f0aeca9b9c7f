"""Building blocks shared by every model part: parameters with logical axes, linear maps, RMSNorm, embeddings.

Each weight is declared once, here or in a module, through `param(...)`: its shape, dtype, initialiser and logical
axes ("embed", "heads", "kv_heads", "head_dim", "mlp", "experts", "vocab", ...). Sharding (sharding.py), the
abstract tree and the checkpoint targets all read those axes from the nnx.Param metadata `logical_axes`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gemma4_jax import quant
from gemma4_jax.kernels import cpu_matmul

Axes = tuple[str | None, ...]


def param(
    rngs: nnx.Rngs,
    shape: Sequence[int],
    axes: Axes,
    dtype: jnp.dtype,
    init: str = "normal",
    scale: float | None = None,
) -> nnx.Param:
    """Declare a weight. `init`: "normal" (std `scale`, default fan-in^-0.5), "ones" or "zeros"."""
    shape = tuple(int(s) for s in shape)
    if len(axes) != len(shape):
        raise ValueError(f"param of shape {shape} given {len(axes)} logical axes {axes}")
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        std = scale if scale is not None else 1.0 / math.sqrt(max(shape[0], 1))
        value = (jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


# Platforms on which weight_einsum pads one-row products to two rows (read at trace time). On an H200 (JAX 0.11.2)
# a one-row bfloat16 product became a float32 matrix-vector product after converting the whole weight to float32
# on every call: E4B's batch-1 decode step ran 14.35 ms unpadded, 7.76 ms padded; 26B-A4B NVFP4 14.40 -> 10.20 ms
# (docs/benchmarks.md, "On one H200"). benchmarks/gpu_models.py --one-row-variant times the other choice.
ONE_ROW_PAD_BACKENDS: tuple[str, ...] = ("cpu", "gpu")

# XLA options of every program that multiplies by the model's weights (`model_jit`). XLA:GPU's dot merger turns two
# products sharing an input (gate and up, q/k/v) into one product against the concatenation of their weights, and
# since weights are arguments of the program it concatenates them on every call: E4B's MLP weights (2 x 52 MB per
# layer) were copied each decode step, ~2 ms of a 7.8 ms step on an H200 (docs/benchmarks.md, "On one H200").
# Other backends ignore the option.
# No loop-invariant code motion out of while loops (the multi-step decode's scan, `xla-rows`' map): the model's
# weights are loop invariants, and what XLA hoists out of the loop is a whole-weight transform materialized on every
# call. On CPU it hoisted the float32 (or, gathered as bits, uint16) copy of the embedding tables that a bfloat16
# lookup implies: a bench-100m bfloat16 decode at 4 steps per call ran 59.5-61.7 ms per step at 64 rows and
# 19.6-20.0 ms at 1 row with the pass, 44.7-46.7 and 9.2-9.6 without it (docs/benchmarks.md).
MODEL_COMPILER_OPTIONS: dict[str, int | str] = {
    "xla_gpu_dot_merger_threshold_mb": 0,
    "xla_disable_hlo_passes": "while-loop-invariant-code-motion",
}


def model_jit(fun=None, /, **jit_kwargs):
    """`jax.jit` with MODEL_COMPILER_OPTIONS, for programs that run the model's weights; usable as
    `@model_jit`, `@functools.partial(model_jit, static_argnames=...)` or `model_jit(fn, ...)`."""
    if fun is None:
        return lambda f: model_jit(f, **jit_kwargs)
    return jax.jit(fun, compiler_options=MODEL_COMPILER_OPTIONS, **jit_kwargs)


# Which products go to the CPU custom call (kernels/cpu_matmul) on CPU: the ranges of row counts it takes, by dtype
# (None: no upper end). Few rows (1-4): it streams each weight once at close to the memory's rate where XLA's GEMM
# reads a one-row bfloat16 product at 10-31 GB/s. More rows: weight panels packed once per task; bfloat16 pairs run
# 600-900 GFLOP/s where XLA's YNNPACK GEMM runs 310-650 (from 5 rows, an even K); float32 panels gain from ~32 rows
# (1.1-1.2x at 64, with the LM head's epilogue) and lose ~5% at 8-16 and to XLA's float32 GEMM from a few hundred
# (docs/benchmarks.md, "Packed products").
CPU_MATMUL_ROWS = {jnp.dtype(jnp.bfloat16): ((1, None),), jnp.dtype(jnp.float32): ((1, 4), (32, 128))}
# bfloat16 with an odd K: only the few-row blocks take it (the packed pairs need K even); (K, N) and (N, K) weights.
CPU_MATMUL_ODD_K_MAX_ROWS = (8, 4)


def cpu_matmul_takes(dtype, rows: int, k: int, transposed: bool) -> bool:
    """Whether the CPU custom call takes a product of `rows` rows and contraction K in this dtype (none on a CPU
    without AVX-512, where it has only plain loops)."""
    if not cpu_matmul.vectors_on_this_cpu():
        return False
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bfloat16 and k % 2:
        return rows <= CPU_MATMUL_ODD_K_MAX_ROWS[transposed]
    return any(lo <= rows and (hi is None or rows <= hi) for lo, hi in CPU_MATMUL_ROWS.get(dtype, ()))


def _on_one_cpu() -> bool:
    """Whether a program traced now runs on the CPU backend with no multi-device mesh (a custom call under a mesh
    would get its sharded weights gathered whole)."""
    if jax.default_backend() != "cpu":
        return False
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


def cpu_weight_matmul(spec: str, x: jax.Array, w: jax.Array, n_in: int,
                      logits_softcap: float | None = None, gate: jax.Array | None = None) -> jax.Array | None:
    """`weight_einsum` through the CPU custom call when it applies (read at trace time): the CPU backend, a
    product `cpu_matmul_takes` (dtype, rows, K), no multi-device mesh (a custom call would get the sharded weight
    gathered whole), the kernel built, and a spec whose weight holds the contracted axes first (Linear's
    (in..., out...)) or last (the tied LM head's (V, D)) with the other axes in the output's order. Else None.
    logits_softcap: not None = the LM head's float32 logits, soft-capped when > 0, from the custom call's epilogue
    (products of the packed panels only; None for anything else). gate (..., out...) in x's dtype:
    gelu_tanh(gate) * the product from the epilogue (packed panels only; None for anything else)."""
    lead = x.shape[: x.ndim - n_in]
    rows = math.prod(lead)
    k = math.prod(x.shape[x.ndim - n_in :])
    if not _on_one_cpu():
        return None
    inputs, out = spec.replace(" ", "").split("->")
    x_spec, w_spec = inputs.split(",")
    ins, outs = x_spec.removeprefix("...")[-n_in:], out.removeprefix("...")
    if w_spec == ins + outs:
        transposed = False
    elif w_spec == outs + ins:
        transposed = True
    else:
        return None
    if not cpu_matmul_takes(x.dtype, rows, k, transposed) or cpu_matmul.load() is not None:
        return None
    epilogue = {}
    out_shape = w.shape[: w.ndim - n_in] if transposed else w.shape[n_in:]
    n = math.prod(out_shape)
    if logits_softcap is not None or gate is not None:
        if not cpu_matmul.takes_packed(x.dtype, rows, k):
            return None
        if logits_softcap is not None:
            epilogue = {"float32_out": True, "softcap": logits_softcap or None}
        if gate is not None:
            if gate.shape != (*lead, *out_shape) or gate.dtype != x.dtype:
                return None
            epilogue["gate"] = gate.reshape(rows, n)
    y = cpu_matmul.cpu_matmul(x.reshape(rows, k), w.reshape((n, k) if transposed else (k, n)), transposed=transposed,
                              **epilogue)
    return y.reshape(*lead, *out_shape)


def weight_einsum(spec: str, x: jax.Array, w: jax.Array, n_in: int = 1) -> jax.Array:
    """einsum(spec, x, w) of activations x (..., *in) and a weight, accumulated in float32, the result in x's dtype.

    spec: "...<in letters>,<weight letters>-><...out letters>"; n_in: how many trailing axes of x it contracts.
    In float32 this is the plain einsum. In bfloat16 (or float16) the result is the plain einsum's too (XLA:CPU
    converts both operands to float32, multiplies and rounds the result; GPUs accumulate in float32), but on CPU:
    - asking for the float32 result lets XLA hand the bfloat16 operands straight to its YNNPACK GEMM, where the
      plain einsum converts the whole weight to float32 first, on every call: a bench-100m decode step at 64 rows
      runs 2-3x faster, and faster than in float32;
    - a one-row product (batch-1 decode) goes to XLA's own matrix-vector loop, which converts the weight too; it is
      padded to two rows so it reaches the GEMM (~5x faster; still slower than float32, which `--dtype auto` picks
      on CPU). docs/benchmarks.md, "bfloat16 on CPU".
    On CPU, the products `cpu_matmul_takes` go to the custom call (`cpu_weight_matmul`).
    """
    w = w.astype(x.dtype)
    custom = cpu_weight_matmul(spec, x, w, n_in)
    if custom is not None:
        return custom
    if x.dtype == jnp.float32:
        return jnp.einsum(spec, x, w)
    lead = x.shape[: x.ndim - n_in]
    if math.prod(lead) == 1 and jax.default_backend() in ONE_ROW_PAD_BACKENDS:
        row = x.reshape(1, *x.shape[x.ndim - n_in :])
        two = jnp.concatenate([row, row])  # (a broadcast would be simplified back to one row)
        y = jnp.einsum(spec, two, w, preferred_element_type=jnp.float32)[0]
        return y.astype(x.dtype).reshape(*lead, *y.shape)
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def logits_einsum(spec: str, x: jax.Array, w: jax.Array, softcap: float | None) -> jax.Array:
    """The LM head: float32 logits of weight_einsum(spec, x, w), soft-capped as tanh(y / softcap) * softcap when
    softcap is set. On CPU, heads of more than 4 rows get both from the product's own epilogue: XLA ran the
    widening, the tanh and a copy of (64, 32768) logits as separate passes at ~1 ns per element, ~5.5 ms of a
    ~40 ms batch-64 decode step (docs/benchmarks.md, "Packed products")."""
    fused = cpu_weight_matmul(spec, x, w.astype(x.dtype), 1, logits_softcap=softcap or 0.0)
    if fused is not None:
        return fused
    logits = weight_einsum(spec, x, w).astype(jnp.float32)
    if softcap:
        logits = jnp.tanh(logits / softcap) * softcap
    return logits


class Linear(nnx.Module):
    """y = x @ W with multi-dimensional in/out features, bias-free (Gemma 4 has no biases).

    kernel: in_shape + out_shape, e.g. q_proj (D,) -> (N, H): kernel (D, N, H). The HF weight (out_flat, in_flat)
    maps to it by a transpose and a reshape (checkpoint.py).
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        in_axes: Axes,
        out_axes: Axes,
        *,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape)
        fan_in = math.prod(self.in_shape)
        self.kernel = param(rngs, self.in_shape + self.out_shape, tuple(in_axes) + tuple(out_axes), dtype,
                            scale=fan_in**-0.5)

    def _spec(self) -> str:
        """The einsum of activations (..., *in) with the kernel (*in, *out)."""
        n_in, n_out = len(self.in_shape), len(self.out_shape)
        letters = "abcdefgh"
        ins, outs = letters[:n_in], letters[n_in : n_in + n_out]
        return f"...{ins},{ins}{outs}->...{outs}"

    def __call__(self, x: jax.Array) -> jax.Array:
        return weight_einsum(self._spec(), x, self.kernel[...], len(self.in_shape))

    def gated(self, x: jax.Array, gate: jax.Array, act: str) -> jax.Array | None:
        """act(gate) * self(x) from one product when `gated_weight_einsum` applies, else None."""
        return gated_weight_einsum(self._spec(), x, self.kernel[...], gate, act, len(self.in_shape))


def gated_weight_einsum(spec: str, x: jax.Array, w: jax.Array, gate: jax.Array, act: str,
                        n_in: int = 1) -> jax.Array | None:
    """act(gate) * weight_einsum(spec, x, w) from one CPU custom call, the activation in the product's epilogue
    (a table of its value at every bfloat16, computed by XLA: the same bits as the separate ops), when it applies:
    bfloat16, a GELU-tanh gate, a product of the packed panels (more than 4 rows) and `cpu_weight_matmul`'s
    conditions. Else None.
    XLA ran the bfloat16 GELU as a fusion rounding after every operation, ~1 ns per element: 2.65 ms of a ~30 ms
    batch-64 decode step (docs/benchmarks.md, "The MLP's gate in the up projection's epilogue")."""
    if ACTIVATIONS.get(act) is not gelu_tanh or x.dtype != jnp.bfloat16:
        return None
    return cpu_weight_matmul(spec, x, w.astype(x.dtype), n_in, gate=gate)


# Few-row products of several weights sharing one input (a layer's q/k/v, its MLP's gate and up) go to one CPU
# custom call each (kernels/cpu_matmul/cpu_matmul_fused.cc): one parallel region instead of one per product, so
# fewer barriers per step and both threads busy on the narrow K and V products (docs/benchmarks.md, "Fewer, larger
# calls"). Read at trace time; benchmarks switch it off to time the separate calls.
FUSE_FEW_ROW_PRODUCTS = True


def _fusable_rows(linears: Sequence[Linear], x: jax.Array) -> int | None:
    """The row count when `linears` can share one few-row CPU call on x, else None: all plain Linear of one
    input axis, x float32 or bfloat16 with 1-4 rows, the CPU backend with no multi-device mesh, the kernel built."""
    if not FUSE_FEW_ROW_PRODUCTS or not linears or not _on_one_cpu():
        return None
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        return None
    for linear in linears:
        if type(linear) is not Linear or len(linear.in_shape) != 1 or linear.in_shape[0] != x.shape[-1]:
            return None
    rows = math.prod(x.shape[:-1])
    if not 1 <= rows <= cpu_matmul.MANY_ROWS or not cpu_matmul_takes(x.dtype, rows, x.shape[-1], False):
        return None
    return rows if cpu_matmul.load() is None else None


def _kernel_2d(linear: Linear, dtype) -> jax.Array:
    """A one-input Linear's kernel as (D, prod(out_shape)) in dtype (as `weight_einsum` casts it)."""
    return linear.kernel[...].astype(dtype).reshape(linear.in_shape[0], -1)


def fused_linears(linears: Sequence[Linear], x: jax.Array) -> list[jax.Array] | None:
    """[linear(x) for linear in linears] from one CPU call (the same bits as the separate products) when
    `_fusable_rows` allows it, else None. x: (..., D); each result (..., *out_shape)."""
    rows = _fusable_rows(linears, x)
    if rows is None:
        return None
    flat = x.reshape(rows, x.shape[-1])
    ys = cpu_matmul.cpu_matmul_multi(flat, [_kernel_2d(lin, x.dtype) for lin in linears])
    return [y.reshape(*x.shape[:-1], *lin.out_shape) for lin, y in zip(linears, ys)]


def fused_gate_up(gate_proj: Linear, up_proj: Linear, x: jax.Array, act: str) -> jax.Array | None:
    """act(gate_proj(x)) * up_proj(x) from one CPU call (the same bits as the separate ops) when `_fusable_rows`
    allows it, x is bfloat16 and act is GELU-tanh (the activation is a table of its bfloat16 values); else None.
    In float32 the two products still share one call (`fused_linears`) and XLA applies the activation."""
    if ACTIVATIONS.get(act) is not gelu_tanh or x.dtype != jnp.bfloat16:
        return None
    rows = _fusable_rows((gate_proj, up_proj), x)
    if rows is None or gate_proj.out_shape != up_proj.out_shape:
        return None
    d = x.shape[-1]
    y = cpu_matmul.cpu_matmul_gate_up(x.reshape(rows, d), _kernel_2d(gate_proj, x.dtype), _kernel_2d(up_proj, x.dtype))
    return y.reshape(*x.shape[:-1], *up_proj.out_shape)


class QuantLinear(nnx.Module):
    """A Linear whose weight stays packed (quant.py formats), in the checkpoint's (out, in) layout.

    fmt "nvfp4": w uint8 (*lead, N, K // 2), block_scale float8_e4m3fn (*lead, N, K // 16), row_scale f32 (*lead, N);
    fmt "fp8": w float8_e4m3fn (*lead, N, K), row_scale f32 (*lead, N). N = prod(out_shape), K = prod(in_shape).
    `lead` = (E,) for stacked experts (called through `quant.grouped_matmul`, not `__call__`). The logical axes of
    the flattened N and K are those of the first out / in axis (contiguous blocks of heads stay whole heads).
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], in_axes: Axes, out_axes: Axes, fmt: str,
                 lead: Sequence[int] = (), lead_axes: Axes = ()):
        self.in_shape, self.out_shape, self.fmt = tuple(in_shape), tuple(out_shape), fmt
        n, k = math.prod(self.out_shape), math.prod(self.in_shape)
        axes = tuple(lead_axes) + (out_axes[0], in_axes[0])
        for name, (shape, dtype) in quant.packed_shapes(fmt, tuple(lead), n, k).items():
            setattr(self, name, nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes[: len(shape)]))
        if fmt != quant.NVFP4:
            self.block_scale = None

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_shape)
        lead = x.shape[: x.ndim - n_in]
        flat = x.reshape(-1, math.prod(self.in_shape))
        scale = None if self.block_scale is None else self.block_scale[...]
        y = quant.matmul(self.fmt, flat, self.w[...], scale, self.row_scale[...])
        return y.reshape(*lead, *self.out_shape)


class ClippedLinear(nnx.Module):
    """Linear map whose input and output are clamped to checkpoint-stored bounds when `clipped` (HF
    `Gemma4ClippableLinear`, `use_clipped_linears` in the vision and audio towers); the bounds are scalars that
    start at +-inf, i.e. no clipping, in a randomly initialised model. kernel: in_shape + out_shape (Linear)."""

    def __init__(self, in_shape, out_shape, in_axes, out_axes, *, clipped: bool, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.linear = Linear(in_shape, out_shape, in_axes, out_axes, dtype=dtype, rngs=rngs)
        self.clipped = clipped
        if clipped:
            bound = lambda v: nnx.Param(jnp.full((), v, dtype), logical_axes=())  # noqa: E731
            self.input_min, self.input_max = bound(-math.inf), bound(math.inf)
            self.output_min, self.output_max = bound(-math.inf), bound(math.inf)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.clipped:
            x = jnp.clip(x, self.input_min[...].astype(x.dtype), self.input_max[...].astype(x.dtype))
        y = self.linear(x)
        if self.clipped:
            y = jnp.clip(y, self.output_min[...].astype(y.dtype), self.output_max[...].astype(y.dtype))
        return y


def rms_norm(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
    """Gemma 4 RMSNorm: float32 statistics, multiplied by the weight (not 1 + weight), cast back to x's dtype."""
    x32 = x.astype(jnp.float32)
    # pow(., -0.5) rather than rsqrt, as HF does, so both sides round alike.
    normed = x32 * jnp.power(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps, -0.5)
    if weight is not None:
        normed = normed * weight.astype(jnp.float32)
    return normed.astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, with a learned scale (`with_scale`) or without (v_norm, router norm)."""

    def __init__(self, dim: int, eps: float, *, dtype: jnp.dtype, rngs: nnx.Rngs, with_scale: bool = True,
                 axis_name: str = "norm"):
        self.eps = eps
        self.with_scale = with_scale
        self.weight = param(rngs, (dim,), (axis_name,), dtype, init="ones") if with_scale else None

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...] if self.with_scale else None, self.eps)


class Embed(nnx.Module):
    """Token table (V, D) whose lookups are multiplied by `scale` rounded to the table's dtype (as HF does)."""

    def __init__(self, vocab: int, dim: int, scale: float, *, dtype: jnp.dtype, rngs: nnx.Rngs,
                 axes: Axes = ("vocab", "embed")):
        self.scale = scale
        self.embedding = param(rngs, (vocab, dim), axes, dtype, scale=1.0)

    def __call__(self, ids: jax.Array) -> jax.Array:
        table = self.embedding[...]
        return jnp.take(table, ids, axis=0) * jnp.asarray(self.scale, table.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied LM head: (..., D) -> (..., V)."""
        return weight_einsum("...D,VD->...V", x, self.embedding[...])

    def logits(self, x: jax.Array, softcap: float | None) -> jax.Array:
        """Tied LM head as float32 logits, soft-capped when softcap is set (`logits_einsum`): (..., D) -> (..., V)."""
        return logits_einsum("...D,VD->...V", x, self.embedding[...], softcap)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS = {"gelu_pytorch_tanh": gelu_tanh, "gelu_tanh": gelu_tanh, "gelu": lambda x: jax.nn.gelu(x, False)}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_activation {name!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]
