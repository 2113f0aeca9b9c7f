"""The routed mixture-of-experts block of Gemma 4 26B-A4B (beside the dense MLP in every layer).

Route (RMSNorm without scale, times `scale` and hidden^-0.5, projection, softmax in float32 over all experts, top-k,
renormalise, times `per_expert_scale`), then dispatch by sorting the (token, choice) pairs by expert and running
two grouped matmuls (`jax.lax.ragged_dot`): every token reaches exactly its top-k experts, none is dropped and no
expert computes tokens it was not chosen for.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gemma4_jax.config import TextConfig
from gemma4_jax.layers import Linear, RMSNorm, activation, param, rms_norm


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


class Experts(nnx.Module):
    """Stacked expert weights. gate_up: (E, D, 2I) (gate first, up second), down: (E, I, D)."""

    def __init__(self, cfg: TextConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        e, d, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.act = activation(cfg.hidden_activation)
        self.gate_up_proj = param(rngs, (e, d, 2 * i), ("experts", "embed", "mlp"), dtype, scale=d**-0.5)
        self.down_proj = param(rngs, (e, i, d), ("experts", "mlp", "embed"), dtype, scale=i**-0.5)

    def __call__(self, x: jax.Array, weights: jax.Array, ids: jax.Array) -> jax.Array:
        """x: (M, D), weights/ids: (M, k) -> (M, D)."""
        m, k = ids.shape
        num_experts = self.gate_up_proj.shape[0]
        flat_ids = ids.reshape(-1)  # (M*k,)
        order = jnp.argsort(flat_ids, stable=True)
        token_of = order // k  # which token each sorted row came from
        rows = jnp.take(x, token_of, axis=0)  # (M*k, D), grouped by expert
        group_sizes = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)
        gate_up = jax.lax.ragged_dot(rows, self.gate_up_proj[...].astype(x.dtype), group_sizes)
        gate, up = jnp.split(gate_up, 2, axis=-1)
        out = jax.lax.ragged_dot(self.act(gate) * up, self.down_proj[...].astype(x.dtype), group_sizes)
        out = out * weights.reshape(-1)[order][:, None].astype(out.dtype)
        return jax.ops.segment_sum(out, token_of, num_segments=m)


class MoEBlock(nnx.Module):
    """Router + experts with their own pre/post norms. Takes the layer's residual stream (as HF does)."""

    def __init__(self, cfg: TextConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.router = Router(cfg, dtype=dtype, rngs=rngs)
        self.experts = Experts(cfg, dtype=dtype, rngs=rngs)
        self.pre_feedforward_layernorm_2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.post_feedforward_layernorm_2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)

    def __call__(self, residual: jax.Array) -> jax.Array:
        """residual: (B, T, D) -> MoE branch output (B, T, D), post-normed."""
        with jax.named_scope("moe"):
            flat = residual.reshape(-1, residual.shape[-1])
            weights, ids = self.router(flat)
            out = self.experts(self.pre_feedforward_layernorm_2(flat), weights, ids)
            return self.post_feedforward_layernorm_2(out.reshape(residual.shape))
