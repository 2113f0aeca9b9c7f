"""The Gemma 4 vision tower: patches in, soft tokens in the text model's embedding space out.

Pipeline (as HF `Gemma4VisionModel` + `Gemma4MultimodalEmbedder`):
  pixels (N, P, 3 * patch**2) in [0, 1]  --2(x - 0.5), input_proj, + learned x/y position rows-->  (N, P, Dv)
  -> encoder layers: bidirectional attention over the real patches (padding keys masked), q/k RMSNorm, 2-D axial
     RoPE (first half of each head rotated by x, second half by y), v RMSNorm without scale, attention scale 1,
     sandwich norms, gated-GELU MLP; every projection optionally "clipped" (input and output clamped to bounds
     stored in the checkpoint)
  -> pooler: padding zeroed, patches averaged over k x k cells of the patch grid (k = pooling_kernel_size) into
     L = P / k**2 slots, times sqrt(Dv) in float32; a slot no patch falls into is invalid
  -> optional standardisation (h - std_bias) * std_scale in float32
  -> embedder: RMSNorm without scale, linear Dv -> D (text hidden size).
The output keeps the padded layout: (N, L, D) soft tokens plus an (N, L) validity mask; multimodal.py takes the
valid ones in row-major order, which is HF's `hidden_states[pooler_mask]`.

Also here: `VisionConfig` (parsed from config.json's `vision_config`), the checkpoint key table of the tower and
its embedder (`map_key`, registered with checkpoint.py on import), and `MultimodalEmbedder`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from gemma4_jax.attention import reference_attention
from gemma4_jax.layers import ClippedLinear, Linear, RMSNorm, activation, param, rms_norm
from gemma4_jax.tower_config import VisionConfig, vision_config_from_dict  # noqa: F401 (re-exported)

# ----------------------------------------------------------------------------------------------------------------
# Modules


def axial_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """2-D axial RoPE. x: (N, P, heads, H); positions: (N, P, 2) patch (x, y) -> same shape as x.

    The first H/2 channels rotate (rotate-half style) with the x coordinate, the last H/2 with y; each half uses
    the H/4 frequencies theta^(-2i / (H/2)).
    """
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, 2, dtype=jnp.float32) / half))  # (H/4,)
    parts = []
    for axis in range(2):
        freqs = positions[..., axis].astype(jnp.float32)[..., None] * inv_freq  # (N, P, H/4)
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        # HF rounds cos/sin to the activation dtype before applying them.
        cos = jnp.cos(emb).astype(x.dtype)[:, :, None, :]
        sin = jnp.sin(emb).astype(x.dtype)[:, :, None, :]
        xa = x[..., axis * half : (axis + 1) * half]
        x1, x2 = jnp.split(xa, 2, axis=-1)
        parts.append(xa * cos + jnp.concatenate([-x2, x1], axis=-1) * sin)
    return jnp.concatenate(parts, axis=-1)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        clip = cfg.use_clipped_linears
        self.theta = cfg.rope_theta
        self.eps = cfg.rms_norm_eps
        self.q_proj = ClippedLinear((d,), (n, h), ("embed",), ("heads", "head_dim"), clipped=clip, dtype=dtype,
                                    rngs=rngs)
        self.k_proj = ClippedLinear((d,), (k, h), ("embed",), ("kv_heads", "head_dim"), clipped=clip, dtype=dtype,
                                    rngs=rngs)
        self.v_proj = ClippedLinear((d,), (k, h), ("embed",), ("kv_heads", "head_dim"), clipped=clip, dtype=dtype,
                                    rngs=rngs)
        self.o_proj = ClippedLinear((n, h), (d,), ("heads", "head_dim"), ("embed",), clipped=clip, dtype=dtype,
                                    rngs=rngs)
        self.q_norm = RMSNorm(h, cfg.rms_norm_eps, dtype=dtype, rngs=rngs, axis_name="head_dim")
        self.k_norm = RMSNorm(h, cfg.rms_norm_eps, dtype=dtype, rngs=rngs, axis_name="head_dim")

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        """x: (N, P, Dv); positions: (N, P, 2); mask: (N, P, P) bool -> (N, P, Dv)."""
        q = axial_rope(self.q_norm(self.q_proj(x)), positions, self.theta)
        k = axial_rope(self.k_norm(self.k_proj(x)), positions, self.theta)
        v = rms_norm(self.v_proj(x), None, self.eps)
        # q/k are RMS-normed, so the logits need no 1/sqrt(H) scale (as the text model).
        return self.o_proj(reference_attention(q, k, v, mask, scale=1.0))


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, f, clip = cfg.hidden_size, cfg.intermediate_size, cfg.use_clipped_linears
        self.gate_proj = ClippedLinear((d,), (f,), ("embed",), ("mlp",), clipped=clip, dtype=dtype, rngs=rngs)
        self.up_proj = ClippedLinear((d,), (f,), ("embed",), ("mlp",), clipped=clip, dtype=dtype, rngs=rngs)
        self.down_proj = ClippedLinear((f,), (d,), ("mlp",), ("embed",), clipped=clip, dtype=dtype, rngs=rngs)
        self.act = activation(cfg.hidden_activation)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionEncoderLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = VisionAttention(cfg, dtype=dtype, rngs=rngs)
        self.mlp = VisionMLP(cfg, dtype=dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(d, eps, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(d, eps, dtype=dtype, rngs=rngs)
        self.pre_feedforward_layernorm = RMSNorm(d, eps, dtype=dtype, rngs=rngs)
        self.post_feedforward_layernorm = RMSNorm(d, eps, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions, mask))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class VisionEncoder(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([VisionEncoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x: jax.Array, positions: jax.Array, padding: jax.Array) -> jax.Array:
        """x: (N, P, Dv); positions: (N, P, 2); padding: (N, P) bool. Every patch attends to every real patch."""
        mask = jnp.broadcast_to(~padding[:, None, :], (x.shape[0], x.shape[1], x.shape[1]))
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"vision_layer_{i}"):
                x = layer(x, positions, mask)
        return x


class PatchEmbedder(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.input_proj = Linear((cfg.patch_dim,), (cfg.hidden_size,), ("patch",), ("embed",), dtype=dtype,
                                 rngs=rngs)
        # Row table 0 is indexed by the patch's x, table 1 by its y; their rows are summed.
        self.position_embedding_table = param(rngs, (2, cfg.position_embedding_size, cfg.hidden_size),
                                              (None, "vision_positions", "embed"), dtype, scale=1.0)

    def __call__(self, pixel_values: jax.Array, positions: jax.Array, padding: jax.Array) -> jax.Array:
        """pixel_values: (N, P, patch_dim) in [0, 1]; positions: (N, P, 2) (x, y), -1 = padding -> (N, P, Dv)."""
        dtype = self.input_proj.kernel.dtype
        # The processor only divides by 255; the model maps [0, 1] to [-1, 1] itself.
        h = self.input_proj((2.0 * (pixel_values.astype(jnp.float32) - 0.5)).astype(dtype))
        table = self.position_embedding_table[...]
        clamped = jnp.maximum(positions, 0)
        pos = jnp.take(table[0], clamped[..., 0], axis=0) + jnp.take(table[1], clamped[..., 1], axis=0)
        return h + jnp.where(padding[..., None], jnp.zeros((), pos.dtype), pos)


def pool_by_position(hidden: jax.Array, positions: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
    """Average k x k cells of the patch grid (HF `_avg_pool_by_positions`).

    hidden: (N, P, Dv) with padding rows already zero; positions: (N, P, 2). k = sqrt(P / length).
    Returns (pooled (N, length, Dv) float32, valid (N, length) bool: some patch falls into the slot).
    Slot of a patch: x // k + (grid width // k) * (y // k), grid width = max x + 1 of the image.
    """
    n, p, _ = hidden.shape
    k = int(math.isqrt(p // length))
    if k * k * length != p:
        raise ValueError(f"cannot pool {p} patches into {length} soft tokens: {p} / {length} is not a square")
    clamped = jnp.maximum(positions, 0)  # padding patches land in slot 0 with a zero hidden state, as in HF
    width = clamped[..., 0].max(axis=-1, keepdims=True) + 1
    cell = clamped // k
    slot = cell[..., 0] + (width // k) * cell[..., 1]  # (N, P)
    # A segment sum instead of HF's (P, L) one-hot matmul: same sums, O(P) memory.
    summed = jax.vmap(lambda h, s: jax.ops.segment_sum(h, s, num_segments=length))(hidden.astype(jnp.float32), slot)
    counts = jax.vmap(lambda s: jax.ops.segment_sum(jnp.ones_like(s), s, num_segments=length))(slot)
    return summed / (k * k), counts > 0


class VisionTower(nnx.Module):
    """HF `Gemma4VisionModel`: patches -> pooled, scaled (and optionally standardised) vision features."""

    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.patch_embedder = PatchEmbedder(cfg, dtype=dtype, rngs=rngs)
        self.encoder = VisionEncoder(cfg, dtype=dtype, rngs=rngs)
        if cfg.standardize:
            self.std_bias = param(rngs, (cfg.hidden_size,), ("embed",), dtype, init="zeros")
            self.std_scale = param(rngs, (cfg.hidden_size,), ("embed",), dtype, init="ones")

    def __call__(self, pixel_values: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """pixel_values: (N, P, patch_dim); positions: (N, P, 2) int, (-1, -1) = padding patch.

        Returns (features (N, L, Dv) in the model dtype, valid (N, L) bool), L = P / pooling_kernel_size**2.
        """
        cfg = self.cfg
        n, p, _ = pixel_values.shape
        length = p // cfg.pooling_kernel_size**2
        padding = jnp.all(positions == -1, axis=-1)
        x = self.patch_embedder(pixel_values, positions, padding)
        dtype = x.dtype
        x = self.encoder(x, positions, padding)
        x = jnp.where(padding[..., None], jnp.zeros((), dtype), x)
        if length != p:
            pooled, valid = pool_by_position(x, positions, length)
            pooled = pooled.astype(dtype)  # HF rounds the pooled average to the working dtype
        else:
            pooled, valid = x, ~padding
        # sqrt(Dv) scaling and standardisation in float32: the scaled values can leave the float16 range.
        h = pooled.astype(jnp.float32) * jnp.float32(cfg.hidden_size**0.5)
        if cfg.standardize:
            h = (h - self.std_bias[...].astype(jnp.float32)) * self.std_scale[...].astype(jnp.float32)
        return h.astype(dtype), valid


class MultimodalEmbedder(nnx.Module):
    """Soft tokens of a tower -> text embedding space: RMSNorm without scale, then a linear map (HF
    `Gemma4MultimodalEmbedder`)."""

    def __init__(self, in_dim: int, text_dim: int, eps: float, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.embedding_projection = Linear((in_dim,), (text_dim,), ("mm_embed",), ("embed",), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., in_dim) -> (..., text_dim)."""
        return self.embedding_projection(rms_norm(x, None, self.eps))
