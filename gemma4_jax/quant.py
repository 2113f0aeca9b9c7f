"""Quantized weights: NVFP4 and FP8 formats, packed matmuls, the quantization plan and the MoE backend choice.

Formats (weights stay packed in device memory; activations are never quantized: weight-only everywhere):
- "nvfp4": w uint8 (..., N, K // 2), two E2M1 values per byte, element 2j in the low nibble; block_scale
  float8_e4m3fn (..., N, K // 16), one per block of 16 along the input; row_scale float32 (..., N). ModelOpt's
  per-tensor `weight_scale_2` (and compressed-tensors' `1 / weight_global_scale`) becomes a per-row scale, so the
  gate and up halves of one fused expert projection keep their own scales. About 0.56 byte per weight.
- "fp8": w float8_e4m3fn (..., N, K), row_scale float32 (..., N) (per-channel, or a per-tensor scale broadcast).

Dequantized weight = values(w) * block_scale * row_scale. The product of an E2M1 value and an E4M3 scale has at
most 3 significant bits (and an E4M3 value alone 4), so `weight_values` is exact in bfloat16 as well as float32;
the row scale is applied to the matmul output in float32. Rounding the fully scaled weight to bfloat16 would not
be exact, which is why the two steps stay apart.

This file is model math (the formats, packed matmuls, the plan of which modules are packed and the MoE backend
choice); reading checkpoints' quantization configs is the loading layer's quant_formats.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from gemma4_jax.kernels.fp4_grouped_matmul import NVFP4_BLOCK, dequantize_nvfp4, fp4_grouped_matmul

NVFP4 = "nvfp4"
FP8 = "fp8"
FORMATS = (NVFP4, FP8)

MOE_BACKENDS = ("auto", "xla", "fp4_pallas")


class QuantizationError(ValueError):
    """A quantization config or request (e.g. a MoE backend) that cannot work with this checkpoint."""


# ----------------------------------------------------------------------------------------------------------------
# Storage


def packed_shapes(fmt: str, lead: tuple[int, ...], n: int, k: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Arrays of one packed (N, K) weight (with leading dims, e.g. (E,)): name -> (shape, dtype)."""
    if fmt == NVFP4:
        if k % NVFP4_BLOCK:
            raise QuantizationError(f"NVFP4 needs in-features divisible by {NVFP4_BLOCK}, got {k}")
        return {
            "w": (lead + (n, k // 2), jnp.uint8),
            "block_scale": (lead + (n, k // NVFP4_BLOCK), jnp.float8_e4m3fn),
            "row_scale": (lead + (n,), jnp.float32),
        }
    if fmt == FP8:
        return {"w": (lead + (n, k), jnp.float8_e4m3fn), "row_scale": (lead + (n,), jnp.float32)}
    raise QuantizationError(f"unknown quantized format {fmt!r}; expected one of {FORMATS}")


PACKED_PARAMS = ("w", "block_scale", "row_scale")  # a packed weight's arrays (packed_shapes)


def random_packed(name: str, shape: tuple[int, ...], dtype, key: jax.Array) -> jax.Array:
    """Random values of one packed array (`name` in PACKED_PARAMS) the size a real checkpoint's weights have:
    NVFP4 codes uniform over all 16 (|value| ~2.2 on average) with block scales ~K^-0.5 / 2.2 and row scales 1;
    FP8 values ~N(0, K^-1) with row scales 1. For benchmarks and tests without a download."""
    if name == "w" and dtype == jnp.uint8:
        return jax.random.bits(key, shape, jnp.uint8)
    if name == "w":  # fp8 values, (..., N, K)
        return (jax.random.normal(key, shape, jnp.float32) * shape[-1] ** -0.5).astype(dtype)
    if name == "block_scale":  # (..., N, K // 16)
        k = shape[-1] * NVFP4_BLOCK
        return (jax.random.uniform(key, shape, jnp.float32, 0.75, 1.25) * k**-0.5 / 2.2).astype(dtype)
    if name == "row_scale":
        return jnp.ones(shape, dtype)
    raise ValueError(f"{name!r} is not a packed weight's array; expected one of {PACKED_PARAMS}")


def weight_values(fmt: str, w: jax.Array, block_scale: jax.Array | None, dtype) -> jax.Array:
    """The weight without its row scale, (..., N, K) in `dtype` (exact in bfloat16, see module docstring)."""
    if fmt == FP8:
        return w.astype(dtype)
    return dequantize_nvfp4(w, block_scale, jnp.float32(1.0)).astype(dtype)


def matmul(fmt: str, x: jax.Array, w: jax.Array, block_scale: jax.Array | None, row_scale: jax.Array) -> jax.Array:
    """x (M, K) @ packed weight (N, K)^T -> (M, N) in x.dtype; float32 accumulation, row scale applied in float32."""
    values = weight_values(fmt, w, block_scale, x.dtype)
    y = jnp.einsum("MK,NK->MN", x, values, preferred_element_type=jnp.float32)
    return (y * row_scale).astype(x.dtype)


def used_experts(group_sizes: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
    """For M = num_rows rows sorted by expert, fewer than the E experts: the experts that hold rows, in expert
    order, padded to M slots -> (expert ids (M,), their group sizes (M,), 0 on padding slots). A grouped matmul over
    the weights gathered at those ids and these sizes equals the one over all E experts (the rows keep their order)
    and reads M experts' weights instead of E: XLA's ragged_dot reads every group's weights, rows or not."""
    used = group_sizes > 0
    (experts,) = jnp.nonzero(used, size=num_rows, fill_value=0)
    return experts, jnp.where(jnp.arange(num_rows) < jnp.sum(used), group_sizes[experts], 0)


def grouped_matmul(fmt: str, rows: jax.Array, w: jax.Array, block_scale: jax.Array | None, row_scale: jax.Array,
                   group_sizes: jax.Array, group_ids: jax.Array, backend: str = "xla") -> jax.Array:
    """Per-expert matmul of rows sorted by expert. rows (M, K); w (E, N, K // 2 or K); group_sizes (E,) int32;
    group_ids (M,) the expert of each row (sorted) -> (M, N) in rows.dtype.

    backend "xla": `jax.lax.ragged_dot` over one layer's weights unpacked inside the jitted step (the block-scaled
    values, exact in the activation dtype), the row scale applied per row in float32 afterwards. "fp4_pallas": the
    Pallas kernel, which reads the packed weights and dequantizes inside (interpret mode off GPU).
    """
    if backend == "fp4_pallas":
        interpret = jax.default_backend() != "gpu"
        mesh = jax.sharding.get_abstract_mesh()
        tp = 1 if mesh.empty or "tp" not in mesh.axis_names else mesh.shape["tp"]
        if tp > 1 and w.shape[0] % tp == 0:
            return _fp4_expert_parallel(rows, w, block_scale, row_scale, group_sizes, mesh, interpret)
        return fp4_grouped_matmul(rows, w, block_scale, row_scale, group_sizes, out_dtype=rows.dtype,
                                  backend="pallas", interpret=interpret)
    if rows.shape[0] < w.shape[0]:
        # Fewer rows than experts (decode): only the experts that hold rows are unpacked. Unpacking all E every
        # step was ~80 ms of 26B-A4B's 100 ms NVFP4 decode step on an H200 (docs/benchmarks.md, "On one H200").
        experts, group_sizes = used_experts(group_sizes, rows.shape[0])
        w = w[experts]
        block_scale = None if block_scale is None else block_scale[experts]
    values = jnp.swapaxes(weight_values(fmt, w, block_scale, rows.dtype), 1, 2)  # (E or M, K, N)
    y = jax.lax.ragged_dot(rows, values, group_sizes, preferred_element_type=jnp.float32)
    return (y * row_scale[group_ids]).astype(rows.dtype)


def _fp4_expert_parallel(rows, w, block_scale, row_scale, group_sizes, mesh, interpret: bool) -> jax.Array:
    """The FP4 kernel with the experts split over the tensor axis (sharding: "experts" -> tp), each device on its
    own experts only. XLA does not partition a custom call (it would gather every device's experts onto each), so
    this runs under shard_map: device d holds experts [d * E/tp, (d + 1) * E/tp), whose rows are one contiguous
    stretch of the expert-sorted rows starting at `offset`. It rolls that stretch to the front, runs the kernel
    with its local group sizes (rows past their sum come out zero), rolls the result back, and the psum over tp
    adds the devices' disjoint stretches (one non-zero term per row: exact)."""
    from jax.sharding import PartitionSpec as P

    def local(rows, w, block_scale, row_scale, group_sizes):
        e_local = w.shape[0]
        first = jax.lax.axis_index("tp") * e_local
        sizes = jax.lax.dynamic_slice(group_sizes, (first,), (e_local,))
        offset = jnp.sum(jnp.where(jnp.arange(group_sizes.shape[0]) < first, group_sizes, 0))
        out = fp4_grouped_matmul(jnp.roll(rows, -offset, axis=0), w, block_scale, row_scale, sizes,
                                 out_dtype=rows.dtype, backend="pallas", interpret=interpret)
        return jax.lax.psum(jnp.roll(out, offset, axis=0), "tp")

    experts = P("tp")
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), experts, experts, experts, P()), out_specs=P(),
                         check_vma=False)(rows, w, block_scale, row_scale, group_sizes)


# ----------------------------------------------------------------------------------------------------------------
# What a checkpoint quantizes, and the MoE backend


@dataclasses.dataclass(frozen=True)
class QuantPlan:
    """Per module: which linears (parameter paths of Linear modules) and which layers' experts are packed."""

    linears: tuple[tuple[str, str], ...] = ()  # (module path, format)
    experts: tuple[tuple[int, str], ...] = ()  # (layer index, format)
    config: Any = None  # the checkpoint's quant_formats.QuantConfig (checked against its tensors), or None

    def linear_format(self, path: str) -> str | None:
        return dict(self.linears).get(path)

    def expert_format(self, layer: int) -> str | None:
        return dict(self.experts).get(layer)

    def expert_formats(self, num_layers: int) -> set[str | None]:
        """The formats of a model's experts ({None}: unquantized), as resolve_moe_backend takes them."""
        return {self.expert_format(i) for i in range(num_layers)} if self.experts else {None}

    @property
    def is_quantized(self) -> bool:
        return bool(self.linears or self.experts)

    @classmethod
    def experts_only(cls, num_layers: int, fmt: str = NVFP4) -> QuantPlan:
        """Every layer's experts packed, nothing else (the layout of an experts-only NVFP4 checkpoint)."""
        return cls(experts=tuple((i, fmt) for i in range(num_layers)))


def resolve_moe_backend(requested: str, has_moe: bool, expert_formats: set[str | None],
                        platform: str | None = None) -> str:
    """The MoE backend to run: "xla" (grouped XLA matmul) or "fp4_pallas" (the FP4 Pallas kernel).

    expert_formats: the formats of the model's experts (None = unquantized). "auto" picks the kernel on GPU for
    NVFP4 experts and the XLA path otherwise; an explicit choice the model cannot use raises QuantizationError.
    """
    if requested not in MOE_BACKENDS:
        raise QuantizationError(f"moe_backend {requested!r} is unknown; valid: {list(MOE_BACKENDS)}")
    nvfp4 = has_moe and expert_formats == {NVFP4}
    if requested == "fp4_pallas":
        if not has_moe:
            raise QuantizationError("moe_backend 'fp4_pallas' needs a model with MoE experts; this model has none. "
                                    "Valid for it: ['auto', 'xla']")
        if not nvfp4:
            kinds = sorted("bf16/float (unquantized)" if f is None else f for f in expert_formats)
            raise QuantizationError(f"moe_backend 'fp4_pallas' needs NVFP4 experts; this checkpoint's experts are "
                                    f"{', '.join(kinds)}. Valid for it: ['auto', 'xla']")
        return "fp4_pallas"
    if requested == "auto" and nvfp4 and (platform or jax.default_backend()) == "gpu":
        return "fp4_pallas"
    return "xla"
