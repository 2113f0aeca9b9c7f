"""Self-attention of the Gemma 4 decoder: projections, q/k/v norms, rotary embeddings and the reference attention.

Layer kinds (config.LayerSpec): sliding (window, head_dim 256, default RoPE) and full (head_dim 512,
"proportional" partial RoPE, optionally keys-as-values with fewer KV heads). KV-shared layers own only q_proj and
o_proj: they attend over the K/V that their source layer computed.

The attention op itself (`reference_attention`) is written over explicit query and key positions, so the same
function serves a full-sequence forward, prefill against a cache and decode; the engine's paged pools and the
Pallas kernels plug in behind it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gemma4_jax.config import LayerSpec, RopeSpec, TextConfig
from gemma4_jax.layers import Linear, RMSNorm, fused_linears, rms_norm

# Large finite negative: a fully masked row (a padding query) gives a uniform softmax instead of NaNs.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def rope_inv_freq(rope: RopeSpec, head_dim: int) -> jax.Array:
    """Inverse frequencies (head_dim // 2,) as HF computes them.

    "proportional": only the first `partial_rotary_factor * head_dim / 2` pairs rotate, with exponents over the whole
    head_dim; the rest get frequency 0 (cos 1, sin 0), i.e. pass through unrotated.
    """
    half = head_dim // 2
    if rope.rope_type == "proportional":
        rotated = int(rope.partial_rotary_factor * head_dim // 2)
        exps = jnp.arange(0, 2 * rotated, 2, dtype=jnp.float32) / head_dim
        inv = 1.0 / (rope.theta**exps)
        inv = jnp.concatenate([inv, jnp.zeros((half - rotated,), jnp.float32)])
    else:
        inv = 1.0 / (rope.theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    return inv / rope.factor


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE. x: (B, T, N, H); positions: (B, T) int; inv_freq: (H // 2,)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, H/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    # HF rounds cos/sin to the activation dtype before applying them.
    cos = jnp.cos(emb).astype(x.dtype)[:, :, None, :]
    sin = jnp.sin(emb).astype(x.dtype)[:, :, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


def attention_mask(q_pos: jax.Array, kv_pos: jax.Array, sliding_window: int | None,
                   blocks: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Causal (+ window) mask (B, T, S) from positions. Keys with a negative position are padding / empty slots.

    blocks: optional (query blocks (B, T), key blocks (B, S)) ids, -1 = none: a query also sees the later keys of
    its own block (bidirectional vision soft tokens); the window still bounds how far back it sees.
    """
    q = q_pos[:, :, None]
    k = kv_pos[:, None, :]
    mask = k <= q
    if blocks is not None:
        q_block, kv_block = blocks[0][:, :, None], blocks[1][:, None, :]
        mask |= (q_block == kv_block) & (q_block >= 0)
    mask &= k >= 0
    if sliding_window is not None:
        mask &= k > q - sliding_window
    return mask


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    scale: float = 1.0,
) -> jax.Array:
    """Plain XLA attention with grouped KV heads.

    q: (B, T, N, H); k, v: (B, S, K, H); mask: (B, T, S) bool -> (B, T, N, H).
    Logits and softmax in float32; probabilities are cast to v's dtype before the value product (as HF eager).
    """
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    # Both products as batched (B, K) matrix products with the operands laid out the way a GEMM takes them:
    # queries (B, K, G*T, H) (the G heads sharing a KV head and the T tokens are one M axis), keys (B, K, H, S),
    # values (B, K, S, H). The same sums as einsum("BTKGH,BSKH->BKGTS"), but XLA:CPU no longer runs them as
    # small per-(T, G) products over strided operands (a 4 x 128-token prefill's attention: ~2-4x less time).
    qg = q.reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, h)
    batch = ((0, 1), (0, 1))
    logits = jax.lax.dot_general(qg, k.transpose(0, 2, 3, 1), (((3,), (2,)), batch),
                                 preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, None, None, :, :], logits.reshape(b, kv_heads, g, t, s), _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, kv_heads, g * t, s)
    out = jax.lax.dot_general(probs, v.transpose(0, 2, 1, 3), (((3,), (2,)), batch))  # (B, K, G*T, H)
    return out.reshape(b, kv_heads, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


class Attention(nnx.Module):
    """One layer's attention weights and the per-token math around the attention op."""

    def __init__(self, cfg: TextConfig, spec: LayerSpec, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.spec = spec
        d, n, h, kv = cfg.hidden_size, cfg.num_attention_heads, spec.head_dim, spec.num_kv_heads
        self.q_proj = Linear((d,), (n, h), ("embed",), ("heads", "head_dim"), dtype=dtype, rngs=rngs)
        self.q_norm = RMSNorm(h, cfg.rms_norm_eps, dtype=dtype, rngs=rngs, axis_name="head_dim")
        if not spec.is_kv_shared:
            self.k_proj = Linear((d,), (kv, h), ("embed",), ("kv_heads", "head_dim"), dtype=dtype, rngs=rngs)
            self.k_norm = RMSNorm(h, cfg.rms_norm_eps, dtype=dtype, rngs=rngs, axis_name="head_dim")
            if not spec.k_eq_v:
                self.v_proj = Linear((d,), (kv, h), ("embed",), ("kv_heads", "head_dim"), dtype=dtype, rngs=rngs)
        self.o_proj = Linear((n, h), (d,), ("heads", "head_dim"), ("embed",), dtype=dtype, rngs=rngs)
        self.eps = cfg.rms_norm_eps

    def inv_freq(self) -> jax.Array:
        return rope_inv_freq(self.spec.rope, self.spec.head_dim)

    def project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x: (B, T, D) -> (rotated, normed queries (B, T, N, H), (keys (rotated), values), each (B, T, K, H)), the
        keys and values None on KV-shared layers. On CPU a few-row step's projections are one call
        (layers.fused_linears)."""
        linears = [self.q_proj]
        if not self.spec.is_kv_shared:
            linears += [self.k_proj] if self.spec.k_eq_v else [self.k_proj, self.v_proj]
        raw = fused_linears(linears, x) or [linear(x) for linear in linears]
        inv_freq = self.inv_freq()
        q = apply_rope(self.q_norm(raw[0]), positions, inv_freq)
        if self.spec.is_kv_shared:
            return q, None
        k_raw = raw[1]
        # Keys as values: the value is the *raw* key projection, v-normed (unscaled RMSNorm), never rotated.
        v_raw = k_raw if self.spec.k_eq_v else raw[2]
        k = apply_rope(self.k_norm(k_raw), positions, inv_freq)
        v = rms_norm(v_raw, None, self.eps)
        return q, (k, v)

    def output(self, attn: jax.Array) -> jax.Array:
        """(B, T, N, H) -> (B, T, D)."""
        return self.o_proj(attn)
