"""Feed-forward blocks: the gated GELU-tanh MLP of every layer (double-wide on KV-shared layers when configured)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gemma4_jax.layers import Linear, activation, fused_gate_up, fused_linears


class MLP(nnx.Module):
    """down(act(gate(x)) * up(x)). x: (..., D) -> (..., D); F = the layer's intermediate size."""

    def __init__(self, hidden: int, intermediate: int, act: str, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.act_name = act
        self.act = activation(act)
        self.gate_proj = Linear((hidden,), (intermediate,), ("embed",), ("mlp",), dtype=dtype, rngs=rngs)
        self.up_proj = Linear((hidden,), (intermediate,), ("embed",), ("mlp",), dtype=dtype, rngs=rngs)
        self.down_proj = Linear((intermediate,), (hidden,), ("mlp",), ("embed",), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        with jax.named_scope("mlp"):
            return self.down_proj(self._hidden(x))

    def _hidden(self, x: jax.Array) -> jax.Array:
        """act(gate_proj(x)) * up_proj(x), (..., F). On CPU, few rows: both products and the bfloat16 activation in
        one call (layers.fused_gate_up), else both products in one call; more rows: the activation in the up
        projection's epilogue (layers.gated_weight_einsum)."""
        hidden = fused_gate_up(self.gate_proj, self.up_proj, x, self.act_name)
        if hidden is not None:
            return hidden
        pair = fused_linears((self.gate_proj, self.up_proj), x)
        if pair is not None:
            return self.act(pair[0]) * pair[1]
        gate = self.gate_proj(x)
        hidden = self.up_proj.gated(x, gate, self.act_name) if isinstance(self.up_proj, Linear) else None
        return hidden if hidden is not None else self.act(gate) * self.up_proj(x)
