"""Few-row weight products, reference side: what the CPU custom call (cpu_matmul.cc) must equal.

y (M, N) = x (M, K) @ W with W stored (K, N) or, transposed, (N, K); float32 products summed in float32 and the sum
rounded once to x's dtype: the model's `weight_einsum` for bfloat16 (an einsum asked for a float32 result, then
cast), the plain product for float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def matmul_reference(x: jax.Array, w: jax.Array, *, transposed: bool = False, float32_out: bool = False,
                     softcap: float | None = None, gate: jax.Array | None = None) -> jax.Array:
    """x (M, K), w (K, N) or (N, K) when transposed -> (M, N) in x's dtype; float32_out / softcap: that result
    widened to float32, then tanh(y / softcap) * softcap (the model's LM head); gate (M, N): gelu_tanh(gate) * y
    in x's dtype (the model's MLP: act(gate_proj(x)) * up_proj(x))."""
    spec = "mk,nk->mn" if transposed else "mk,kn->mn"
    y = jnp.einsum(spec, x, w, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
    y = y.astype(x.dtype)
    if gate is not None:
        return jax.nn.gelu(gate, approximate=True) * y
    if float32_out or softcap is not None:
        y = y.astype(jnp.float32)
    if softcap is not None:
        y = jnp.tanh(y / softcap) * softcap
    return y


def multi_reference(x: jax.Array, weights) -> list[jax.Array]:
    """What cpu_matmul_multi must equal: [matmul_reference(x, w) for w in weights], each w (K, N_i)."""
    return [matmul_reference(x, w) for w in weights]


def gate_up_reference(x: jax.Array, w_gate: jax.Array, w_up: jax.Array) -> jax.Array:
    """What cpu_matmul_gate_up must equal: gelu_tanh(x @ w_gate) * (x @ w_up), each product rounded to x's dtype
    first (the model's MLP: act(gate_proj(x)) * up_proj(x))."""
    return matmul_reference(x, w_up, gate=matmul_reference(x, w_gate))
