"""The routed mixture-of-experts block of Gemma 4 26B-A4B (beside the dense MLP in every layer).

Route (RMSNorm without scale, times `scale` and hidden^-0.5, projection, softmax in float32 over all experts, top-k,
renormalise, times `per_expert_scale`), then dispatch by sorting the (token, choice) pairs by expert and running
two grouped matmuls (`jax.lax.ragged_dot`): every token reaches exactly its top-k experts, none is dropped and no
expert computes tokens it was not chosen for.

Experts come unquantized (`Experts`, bf16/f32 stacks) or packed (`QuantExperts`, NVFP4 or FP8 as in quant.py). Packed
experts run either the XLA path (one layer's weights unpacked inside the jitted step, then `ragged_dot`) or the FP4
Pallas kernel, which reads the packed weights directly (`moe_backend`, chosen once at load time).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gemma4_jax import quant
from gemma4_jax.config import TextConfig
from gemma4_jax.layers import Linear, QuantLinear, RMSNorm, activation, param, rms_norm


class Router(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, e = cfg.hidden_size, cfg.num_experts
        self.eps = cfg.rms_norm_eps
        self.top_k = cfg.top_k_experts
        self.proj = Linear((d,), (e,), ("embed",), ("experts_replicated",), dtype=dtype, rngs=rngs)
        self.scale = param(rngs, (d,), ("norm",), dtype, init="ones")
        self.per_expert_scale = param(rngs, (e,), ("experts_replicated",), dtype, init="ones")

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: (M, D) -> (weights (M, k) float32, expert ids (M, k) int32)."""
        h = rms_norm(x, None, self.eps)
        h = h * self.scale[...].astype(h.dtype) * jnp.asarray(x.shape[-1] ** -0.5, h.dtype)
        # Softmax in float32 over all experts: the top-k weights are renormalised, so their ratios must be exact.
        probs = jax.nn.softmax(self.proj(h).astype(jnp.float32), axis=-1)
        weights, ids = jax.lax.top_k(probs, self.top_k)
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        weights = weights * self.per_expert_scale[...].astype(jnp.float32)[ids]
        return weights, ids.astype(jnp.int32)


def _dispatch(ids: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Sort the (token, choice) pairs by expert. ids: (M, k) ->
    order (M*k,) (sorted position -> flat pair), token_of (M*k,), group_sizes (E,) int32, group_ids (M*k,)."""
    k = ids.shape[1]
    flat_ids = ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)
    group_sizes = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)
    return order, order // k, group_sizes, flat_ids[order]


class Experts(nnx.Module):
    """Stacked expert weights. gate_up: (E, D, 2I) (gate first, up second), down: (E, I, D).

    `backend` ("xla") is set at load time (quant.resolve_moe_backend); unquantized experts have only the XLA path.
    """

    def __init__(self, cfg: TextConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        e, d, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.act = activation(cfg.hidden_activation)
        self.backend = "xla"
        self.gate_up_proj = param(rngs, (e, d, 2 * i), ("experts", "embed", "mlp"), dtype, scale=d**-0.5)
        self.down_proj = param(rngs, (e, i, d), ("experts", "mlp", "embed"), dtype, scale=i**-0.5)

    def __call__(self, x: jax.Array, weights: jax.Array, ids: jax.Array) -> jax.Array:
        """x: (M, D), weights/ids: (M, k) -> (M, D)."""
        order, token_of, group_sizes, _ = _dispatch(ids, self.gate_up_proj.shape[0])
        rows = jnp.take(x, token_of, axis=0)  # (M*k, D), grouped by expert
        gate_up_w, down_w = self.gate_up_proj[...], self.down_proj[...]
        if rows.shape[0] < gate_up_w.shape[0]:  # decode: read only the experts that hold rows (quant.used_experts)
            experts, group_sizes = quant.used_experts(group_sizes, rows.shape[0])
            gate_up_w, down_w = gate_up_w[experts], down_w[experts]
        gate_up = jax.lax.ragged_dot(rows, gate_up_w.astype(x.dtype), group_sizes)
        gate, up = jnp.split(gate_up, 2, axis=-1)
        out = jax.lax.ragged_dot(self.act(gate) * up, down_w.astype(x.dtype), group_sizes)
        out = out * weights.reshape(-1)[order][:, None].astype(out.dtype)
        return jax.ops.segment_sum(out, token_of, num_segments=x.shape[0])


class QuantExperts(nnx.Module):
    """Packed expert weights (quant.py formats) in the checkpoint's (out, in) layout, per expert:
    gate_up: N = 2I (gate rows, then up rows), K = D; down: N = D, K = I. Each a QuantLinear with lead (E,), e.g.
    NVFP4 gate_up.w uint8 (E, 2I, D // 2), gate_up.block_scale e4m3 (E, 2I, D // 16), gate_up.row_scale f32 (E, 2I).
    """

    def __init__(self, cfg: TextConfig, fmt: str, backend: str = "xla"):
        e, d, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.act = activation(cfg.hidden_activation)
        self.fmt = fmt
        self.backend = backend
        self.gate_up = QuantLinear((d,), (2 * i,), ("embed",), ("mlp",), fmt, lead=(e,), lead_axes=("experts",))
        self.down = QuantLinear((i,), (d,), ("mlp",), ("embed",), fmt, lead=(e,), lead_axes=("experts",))

    def _project(self, proj: QuantLinear, rows, group_sizes, group_ids):
        scale = None if proj.block_scale is None else proj.block_scale[...]
        return quant.grouped_matmul(self.fmt, rows, proj.w[...], scale, proj.row_scale[...], group_sizes, group_ids,
                                    self.backend)

    def __call__(self, x: jax.Array, weights: jax.Array, ids: jax.Array) -> jax.Array:
        """x: (M, D), weights/ids: (M, k) -> (M, D)."""
        order, token_of, group_sizes, group_ids = _dispatch(ids, self.gate_up.w.shape[0])
        rows = jnp.take(x, token_of, axis=0)
        gate, up = jnp.split(self._project(self.gate_up, rows, group_sizes, group_ids), 2, axis=-1)
        out = self._project(self.down, self.act(gate) * up, group_sizes, group_ids)
        out = out * weights.reshape(-1)[order][:, None].astype(out.dtype)
        return jax.ops.segment_sum(out, token_of, num_segments=x.shape[0])


class MoEBlock(nnx.Module):
    """Router + experts with their own pre/post norms. Takes the layer's residual stream (as HF does)."""

    def __init__(self, cfg: TextConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.router = Router(cfg, dtype=dtype, rngs=rngs)
        self.experts = Experts(cfg, dtype=dtype, rngs=rngs)
        self.pre_feedforward_layernorm_2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.post_feedforward_layernorm_2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)

    def __call__(self, residual: jax.Array) -> tuple[jax.Array, jax.Array]:
        """residual: (B, T, D) -> (MoE branch output (B, T, D) post-normed, the router's top-k expert ids (B, T, k)
        int32: the "return routed experts" output; XLA drops it when the caller does not use it)."""
        with jax.named_scope("moe"):
            flat = residual.reshape(-1, residual.shape[-1])
            weights, ids = self.router(flat)
            out = self.experts(self.pre_feedforward_layernorm_2(flat), weights, ids)
            return (self.post_feedforward_layernorm_2(out.reshape(residual.shape)),
                    ids.reshape(*residual.shape[:-1], ids.shape[-1]))
