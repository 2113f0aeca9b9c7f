"""The Gemma 4 audio tower (a USM-style conformer) and its embedder into the text model, as HF's Gemma4AudioModel.

Data flow, for log-mel features `input_features` (B, T, F) with a validity mask (B, T):
  subsampling: two Conv2d(3x3, stride 2, pad 1) -> LayerNorm(channels, no bias) -> ReLU blocks over (time, mel),
    each zeroing padded frames first; the mask follows as mask[:, ::2] per block, so T' = ceil(ceil(T/2)/2);
    then (mel', channels) are flattened and projected to the conformer width D.
  conformer layer (x num_hidden_layers):
    feed-forward (half-step: post-norm output times `residual_weight`, plus residual)
    -> chunked local self-attention with relative positions and logit soft-capping (float32 throughout)
    -> light convolution (GLU, causal depthwise conv, norm, activation, projection, residual)
    -> feed-forward (half-step) -> output RMSNorm
  output_proj (with bias) to `output_proj_dims`; the embedder RMS-normalises (no scale) and projects to the text
  hidden size. Padded frames are computed (as HF does) and reported by the returned mask; the merge drops them.

Clipped linears clamp their input and output to bounds stored in the checkpoint (+-inf when unused). The attention
logit cap comes from the config: it is a non-persistent buffer in HF, never in the checkpoint.

Weights keep HF's module names, so the checkpoint key table (`map_key`) is nearly the identity; parameters live
under `PARAM_PREFIX` ("audio") of the multimodal model: `audio.tower.*` (HF `model.audio_tower.*`) and
`audio.embedder.*` (HF `model.embed_audio.*`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma4_jax.layers import ClippedLinear, Linear, param, rms_norm
from gemma4_jax.tower_config import AudioConfig, audio_config_from_dict  # noqa: F401 (re-exported)
from gemma4_jax.vision import MultimodalEmbedder

PARAM_PREFIX = "audio"
_HIGHEST = jax.lax.Precision.HIGHEST


def _activation(name: str):
    return {
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "relu": jax.nn.relu,
    }[name]


# ----------------------------------------------------------------------------------------------------------------
# Building blocks


def _clip_gradient_value(x: jax.Array, limit: float) -> jax.Array:
    """HF's `gradient_clipping` clamp (min'd with the dtype's max so that it never overflows)."""
    limit = min(limit, float(jnp.finfo(x.dtype).max))
    return jnp.clip(x, -limit, limit)


class ConvKernel(nnx.Module):
    """One convolution weight, in a module of its own so that the path matches HF's (`conv.weight`)."""

    def __init__(self, shape: tuple[int, ...], axes, *, dtype, rngs: nnx.Rngs, fan_in: int):
        self.kernel = param(rngs, shape, axes, dtype, scale=fan_in**-0.5)


def _layer_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """nn.LayerNorm(bias=False) over the last axis, statistics in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps) * weight.astype(jnp.float32)).astype(x.dtype)


class Norm(nnx.Module):
    """A weight-only norm module (RMSNorm or bias-free LayerNorm), named `weight` like HF's."""

    def __init__(self, dim: int, eps: float, kind: str = "rms", *, dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.kind = kind
        self.weight = param(rngs, (dim,), ("norm",), dtype, init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind == "layer":
            return _layer_norm(x, self.weight[...], self.eps)
        return rms_norm(x, self.weight[...], self.eps)


class SubsampleConvLayer(nnx.Module):
    """Conv2d(3x3, stride 2, pad 1, no bias) over (time, mel) -> LayerNorm(channels) -> ReLU. Layout NHWC, kernel
    (3, 3, C_in, C_out)."""

    def __init__(self, in_channels: int, out_channels: int, eps: float, *, dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.conv = ConvKernel((3, 3, in_channels, out_channels), (None, None, None, None), dtype=dtype, rngs=rngs,
                               fan_in=9 * in_channels)
        self.norm = Norm(out_channels, eps, "layer", dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: (B, T, F, C_in), mask: (B, T) bool -> (B, ceil(T/2), ceil(F/2), C_out), mask (B, ceil(T/2))."""
        x = x * mask[:, :, None, None].astype(x.dtype)  # padded frames must not leak into valid outputs
        kernel = self.conv.kernel[...].astype(x.dtype)
        x = jax.lax.conv_general_dilated(x, kernel, window_strides=(2, 2), padding=((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_HIGHEST)
        x = jax.nn.relu(self.norm(x))
        return x, mask[:, ::2]


class SubsampleConvProjection(nnx.Module):
    def __init__(self, cfg: AudioConfig, *, dtype, rngs: nnx.Rngs):
        c0, c1 = cfg.subsampling_conv_channels
        self.layer0 = SubsampleConvLayer(1, c0, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.layer1 = SubsampleConvLayer(c0, c1, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.input_proj_linear = Linear(((c0 // 4) * c1,), (cfg.hidden_size,), (None,), ("embed",), dtype=dtype,
                                        rngs=rngs)

    def __call__(self, features: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """features (B, T, F), mask (B, T) -> hidden (B, T', D), mask (B, T') with T' = ceil(ceil(T/2)/2)."""
        x, mask = self.layer0(features[..., None], mask)
        x, mask = self.layer1(x, mask)
        b, t, f, c = x.shape
        # (mel', channels) flattened mel-major, as HF's permute(0, 2, 3, 1).reshape does.
        return self.input_proj_linear(x.reshape(b, t, f * c)), mask


class FeedForward(nnx.Module):
    """Conformer half-step feed-forward: residual + residual_weight * post_norm(W2 act(W1 pre_norm(x)))."""

    def __init__(self, cfg: AudioConfig, *, dtype, rngs: nnx.Rngs):
        d, clip = cfg.hidden_size, cfg.use_clipped_linears
        self.gradient_clipping = cfg.gradient_clipping
        self.residual_weight = cfg.residual_weight
        self.act = _activation(cfg.hidden_act)
        self.ffw_layer_1 = ClippedLinear((d,), (4 * d,), ("embed",), ("mlp",), clipped=clip, dtype=dtype, rngs=rngs)
        self.ffw_layer_2 = ClippedLinear((4 * d,), (d,), ("mlp",), ("embed",), clipped=clip, dtype=dtype, rngs=rngs)
        # HF builds these two norms with the default eps (1e-6), not config.rms_norm_eps.
        self.pre_layer_norm = Norm(d, 1e-6, dtype=dtype, rngs=rngs)
        self.post_layer_norm = Norm(d, 1e-6, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        residual = x
        h = self.pre_layer_norm(_clip_gradient_value(x, self.gradient_clipping))
        h = self.ffw_layer_2(self.act(self.ffw_layer_1(h)))
        h = self.post_layer_norm(_clip_gradient_value(h, self.gradient_clipping))
        return h * self.residual_weight + residual


def _relative_position_table(cfg: AudioConfig) -> np.ndarray:
    """Sinusoidal embeddings of the relative distances context_size//2 .. 0: (P, D), [sin | cos] halves, float32."""
    n = cfg.hidden_size // 2
    increment = math.log(10_000.0) / max(n - 1, 1)
    inv_timescales = np.exp(np.arange(n, dtype=np.float32) * np.float32(-increment)).astype(np.float32)
    distances = np.arange(cfg.context_size // 2, -1, -1, dtype=np.float32)[:, None]
    scaled = distances * inv_timescales[None]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=-1).astype(np.float32)


def _blocked_mask(valid: jax.Array, cfg: AudioConfig) -> jax.Array:
    """Which keys each query may see, in the chunked layout: (B, U, C, W) bool, U = ceil(T/C) chunks of C queries,
    W = context_size keys starting max_past_horizon before the chunk. A key is visible when it is a real frame and
    lies at most attention_context_left - 2 steps back or less than attention_context_right steps ahead (HF's
    sliding_window_mask_function((context_left - 1, context_right)))."""
    b, t = valid.shape
    chunk, width = cfg.attention_chunk_size, cfg.context_size
    blocks = -(-t // chunk)
    query = (np.arange(blocks)[:, None] * chunk + np.arange(chunk)[None])[:, :, None]  # (U, C, 1)
    key = (np.arange(blocks)[:, None] * chunk + np.arange(width)[None] - cfg.max_past_horizon)[:, None, :]  # (U,1,W)
    dist = query - key
    back = (dist >= 0) & (dist < cfg.attention_context_left - 1)
    ahead = (dist < 0) & (-dist < cfg.attention_context_right)
    window = back | ahead
    in_range = (query < t) & (key >= 0) & (key < t) & window  # (U, C, W), static
    key_valid = jnp.take(valid, jnp.asarray(np.clip(key[:, 0, :], 0, t - 1)), axis=1)  # (B, U, W)
    return jnp.asarray(in_range)[None] & key_valid[:, :, None, :]


class ChunkedAttention(nnx.Module):
    """Chunked local self-attention with Transformer-XL relative positions and tanh logit soft-capping.

    Queries are split into chunks of C; each chunk attends to W = C + (context_left - 1) + context_right keys.
    Everything after the q/k/v projections runs in float32, as HF does (the reference casts there).
    Weights: q/k/v_proj and relative_k_proj (D, N, H), post (N, H, D), per_dim_scale (H,).
    """

    def __init__(self, cfg: AudioConfig, *, dtype, rngs: nnx.Rngs):
        d, n, h, clip = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.use_clipped_linears
        self.cfg = cfg
        proj = lambda: ClippedLinear((d,), (n, h), ("embed",), ("heads", "head_dim"), clipped=clip,  # noqa: E731
                                       dtype=dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj = proj(), proj(), proj()
        self.post = ClippedLinear((n, h), (d,), ("heads", "head_dim"), ("embed",), clipped=clip, dtype=dtype, rngs=rngs)
        self.relative_k_proj = Linear((d,), (n, h), ("embed",), ("heads", "head_dim"), dtype=dtype, rngs=rngs)
        self.per_dim_scale = param(rngs, (h,), ("head_dim",), dtype, init="zeros")
        # log2-based scaling of the reference implementation (softplus(0) * q_scale = 1/sqrt(H) at init).
        self.q_scale = (h**-0.5) / math.log(2)
        self.k_scale = math.log(1 + math.e) / math.log(2)

    def _rel_shift(self, x: jax.Array) -> jax.Array:
        """(B, N, U, C, P) scores per relative distance -> (B, N, U, C, W) scores per key (appendix B of
        Transformer-XL: pad, flatten, drop the tail, fold back)."""
        b, n, u, c, p = x.shape
        w = self.cfg.context_size
        x = jnp.pad(x, ((0, 0),) * 4 + ((0, w + 1 - p),))
        x = x.reshape(b, n, u, c * (w + 1))[..., : c * w]
        return x.reshape(b, n, u, c, w)

    def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array) -> jax.Array:
        """x: (B, T, D); mask: (B, U, C, W) bool from _blocked_mask; positions: (P, D) relative table."""
        cfg = self.cfg
        b, t, _ = x.shape
        chunk, width, past = cfg.attention_chunk_size, cfg.context_size, cfg.max_past_horizon
        blocks = -(-t // chunk)
        q = self.q_proj(x).astype(jnp.float32)  # (B, T, N, H)
        k = self.k_proj(x).astype(jnp.float32)
        v = self.v_proj(x).astype(jnp.float32)
        q = q * self.q_scale * jax.nn.softplus(self.per_dim_scale[...].astype(jnp.float32))
        k = k * self.k_scale

        q = jnp.pad(q, ((0, 0), (0, blocks * chunk - t), (0, 0), (0, 0)))
        q = q.reshape(b, blocks, chunk, *q.shape[2:])  # (B, U, C, N, H)
        # Overlapping key/value windows: chunk u sees padded positions [u*C, u*C + W).
        pad = ((0, 0), (past, cfg.attention_context_right + chunk - 1), (0, 0), (0, 0))
        idx = jnp.asarray(np.arange(blocks)[:, None] * chunk + np.arange(width)[None])  # (U, W)
        k = jnp.take(jnp.pad(k, pad), idx, axis=1)  # (B, U, W, N, H)
        v = jnp.take(jnp.pad(v, pad), idx, axis=1)

        rel = self.relative_k_proj(positions.astype(x.dtype)).astype(jnp.float32)  # (P, N, H)
        content = jnp.einsum("BUCNH,BUWNH->BNUCW", q, k, precision=_HIGHEST)
        position = self._rel_shift(jnp.einsum("BUCNH,PNH->BNUCP", q, rel, precision=_HIGHEST))
        logits = content + position
        cap = cfg.attention_logit_cap
        logits = jnp.tanh(logits / cap) * cap
        logits = jnp.where(mask[:, None], logits, cfg.attention_invalid_logits_value)
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("BNUCW,BUWNH->BUCNH", probs, v, precision=_HIGHEST)
        out = out.reshape(b, blocks * chunk, *out.shape[3:])[:, :t]
        return self.post(out.astype(x.dtype))


class LightConv1d(nnx.Module):
    """GLU -> causal depthwise Conv1d (kernel K, left padding K-1) -> clamp -> RMSNorm -> act -> linear, + residual.
    depthwise_conv1d.kernel: (K, D)."""

    def __init__(self, cfg: AudioConfig, *, dtype, rngs: nnx.Rngs):
        d, clip = cfg.hidden_size, cfg.use_clipped_linears
        self.gradient_clipping = cfg.gradient_clipping
        self.act = _activation(cfg.hidden_act)
        self.linear_start = ClippedLinear((d,), (2 * d,), ("embed",), ("mlp",), clipped=clip, dtype=dtype, rngs=rngs)
        self.linear_end = ClippedLinear((d,), (d,), ("embed",), ("embed",), clipped=clip, dtype=dtype, rngs=rngs)
        self.depthwise_conv1d = ConvKernel((cfg.conv_kernel_size, d), (None, "embed"), dtype=dtype, rngs=rngs,
                                           fan_in=cfg.conv_kernel_size)
        self.pre_layer_norm = Norm(d, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.conv_norm = Norm(d, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        residual = x
        h = self.linear_start(self.pre_layer_norm(x))
        a, gate = jnp.split(h, 2, axis=-1)
        h = a * jax.nn.sigmoid(gate)
        kernel = self.depthwise_conv1d.kernel[...].astype(h.dtype)  # (K, D)
        size = kernel.shape[0]
        h = jax.lax.conv_general_dilated(h, kernel[:, None, :], window_strides=(1,), padding=((size - 1, 0),),
                                         dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=h.shape[-1],
                                         precision=_HIGHEST)
        h = self.conv_norm(_clip_gradient_value(h, self.gradient_clipping))
        return self.linear_end(self.act(h)) + residual


class ConformerLayer(nnx.Module):
    def __init__(self, cfg: AudioConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.gradient_clipping = cfg.gradient_clipping
        self.feed_forward1 = FeedForward(cfg, dtype=dtype, rngs=rngs)
        self.feed_forward2 = FeedForward(cfg, dtype=dtype, rngs=rngs)
        self.self_attn = ChunkedAttention(cfg, dtype=dtype, rngs=rngs)
        self.lconv1d = LightConv1d(cfg, dtype=dtype, rngs=rngs)
        # Default eps (1e-6) in HF, whatever config.rms_norm_eps says.
        self.norm_pre_attn = Norm(d, 1e-6, dtype=dtype, rngs=rngs)
        self.norm_post_attn = Norm(d, 1e-6, dtype=dtype, rngs=rngs)
        self.norm_out = Norm(d, 1e-6, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array) -> jax.Array:
        x = self.feed_forward1(x)
        residual = x
        h = self.norm_pre_attn(_clip_gradient_value(x, self.gradient_clipping))
        h = self.self_attn(h, mask, positions)
        x = self.norm_post_attn(_clip_gradient_value(h, self.gradient_clipping)) + residual
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(_clip_gradient_value(x, self.gradient_clipping))


class AudioTower(nnx.Module):
    """HF Gemma4AudioModel: features (B, T, F) -> (B, T', output_proj_dims) and the subsampled mask."""

    def __init__(self, cfg: AudioConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.subsample_conv_projection = SubsampleConvProjection(cfg, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([ConformerLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.output_proj = Linear((cfg.hidden_size,), (cfg.output_proj_dims,), ("embed",), (None,), dtype=dtype,
                                  rngs=rngs)
        self.output_proj.bias = param(rngs, (cfg.output_proj_dims,), (None,), dtype, init="zeros")

    def __call__(self, features: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        x, mask = self.subsample_conv_projection(features, mask)
        positions = jnp.asarray(_relative_position_table(self.cfg))
        blocked = _blocked_mask(mask, self.cfg)
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"audio_layer_{i}"):
                x = layer(x, blocked, positions)
        return self.output_proj(x) + self.output_proj.bias[...].astype(x.dtype), mask


class Gemma4Audio(nnx.Module):
    """Audio tower + embedder: log-mel features to soft tokens in the text model's embedding space."""

    def __init__(self, cfg: AudioConfig, text_hidden_size: int, *, dtype=jnp.bfloat16, rngs: nnx.Rngs):
        self.cfg = cfg
        self.tower = AudioTower(cfg, dtype=dtype, rngs=rngs)
        # HF's Gemma4MultimodalEmbedder, shared with the vision tower: scale-free RMSNorm with the audio eps.
        self.embedder = MultimodalEmbedder(cfg.output_proj_dims, text_hidden_size, cfg.rms_norm_eps, dtype=dtype,
                                           rngs=rngs)

    def embed(self, input_features: jax.Array, input_features_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """input_features (B, T, F) float, input_features_mask (B, T) bool (True = real frame) ->
        soft_tokens (B, T', D_text), valid (B, T') bool with T' = len(mask[::2][::2]). Only valid soft tokens
        replace audio placeholders; their count per clip is valid.sum(-1)."""
        halved_twice = (input_features.shape[-1] + 3) // 4  # mel bins after two stride-2 convs: ceil(F / 4)
        if input_features.ndim != 3 or halved_twice != self.cfg.subsampling_conv_channels[0] // 4:
            raise ValueError(
                f"input_features must be (batch, frames, mel bins) with {self.cfg.num_mel_bins} mel bins for this "
                f"audio tower; got shape {tuple(input_features.shape)}"
            )
        if input_features_mask.shape != input_features.shape[:2]:
            raise ValueError(f"input_features_mask shape {tuple(input_features_mask.shape)} does not match "
                             f"input_features {tuple(input_features.shape[:2])}")
        dtype = self.tower.output_proj.kernel[...].dtype
        with jax.named_scope("audio_tower"):
            hidden, valid = self.tower(input_features.astype(dtype), input_features_mask.astype(bool))
        with jax.named_scope("embed_audio"):
            return self.embedder(hidden), valid

    __call__ = embed


def num_soft_tokens(input_features_mask: Any) -> np.ndarray:
    """Soft tokens per clip, (B,) ints: the valid entries of mask[:, ::2][:, ::2] (HF's replace_audio_token)."""
    mask = np.asarray(input_features_mask, bool)
    if mask.ndim == 1:
        mask = mask[None]
    return mask[:, ::2][:, ::2].sum(axis=-1)
