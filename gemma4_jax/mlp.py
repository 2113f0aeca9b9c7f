"""Feed-forward blocks: the gated GELU-tanh MLP of every layer (double-wide on KV-shared layers when configured)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gemma4_jax.layers import Linear, activation


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
            gate = self.gate_proj(x)
            # On CPU the activation can ride in the up projection's epilogue (layers.gated_weight_einsum).
            hidden = self.up_proj.gated(x, gate, self.act_name) if isinstance(self.up_proj, Linear) else None
            if hidden is None:
                hidden = self.act(gate) * self.up_proj(x)
            return self.down_proj(hidden)
