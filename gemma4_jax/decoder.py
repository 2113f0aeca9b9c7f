"""The Gemma 4 text decoder: embeddings (+ per-layer embeddings), decoder layers, final norm, LM head.

Layer order inside a decoder layer (as HF): input norm -> attention -> post-attention norm -> residual add;
pre-FF norm -> MLP (+ the MoE branch, each with its own post norm) -> post-FF norm -> residual add; then, with PLE,
the per-layer-input gate; finally the whole stream is multiplied by `layer_scalar`.

This file declares the modules and the math of one layer. The loop over layers (embedding, a range of layers
against a K/V store with an attention backend, the head) is forward.py, the one forward every caller runs. The
K/V store is pluggable (`KVStore`): the full-sequence forward uses the identity store, the serving engine its
paged/windowed pools; either returns a K/V view (kv_view.py) that the attention backend reads. KV-shared layers read
the view that their source layer's store returned in the same forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from gemma4_jax.attention import Attention
from gemma4_jax.config import LayerSpec, TextConfig
from gemma4_jax.kv_view import DenseKV, KVView
from gemma4_jax.layers import Embed, Linear, RMSNorm, activation, logits_einsum, param
from gemma4_jax.mlp import MLP
from gemma4_jax.moe import MoEBlock


class KVStore(Protocol):
    """Where a layer's new K/V go and what the layer attends over.

    update(layer, k (B, T, K, H), v, positions (B, T)) -> a KVView of every key the layer attends over (this
    step's included; key positions < 0 mark empty slots). The full-sequence store returns its inputs as a DenseKV.
    """

    def update(self, layer: int, k: jax.Array, v: jax.Array, positions: jax.Array) -> KVView: ...


class SequenceKV:
    """Identity K/V store: attention over exactly the tokens of this forward."""

    def update(self, layer: int, k: jax.Array, v: jax.Array, positions: jax.Array) -> DenseKV:
        return DenseKV(k, v, positions)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, spec: LayerSpec, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.spec = spec
        self.self_attn = Attention(cfg, spec, dtype=dtype, rngs=rngs)
        self.mlp = MLP(d, spec.intermediate_size, cfg.hidden_activation, dtype=dtype, rngs=rngs)
        norm = lambda: RMSNorm(d, eps, dtype=dtype, rngs=rngs)  # noqa: E731
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.post_feedforward_layernorm = norm()
        self.moe = MoEBlock(cfg, dtype=dtype, rngs=rngs) if cfg.enable_moe_block else None
        self.post_feedforward_layernorm_1 = norm() if cfg.enable_moe_block else None
        if cfg.has_ple:
            p = cfg.hidden_size_per_layer_input
            self.act = activation(cfg.hidden_activation)
            self.per_layer_input_gate = Linear((d,), (p,), ("embed",), ("ple",), dtype=dtype, rngs=rngs)
            self.per_layer_projection = Linear((p,), (d,), ("ple",), ("embed",), dtype=dtype, rngs=rngs)
            self.post_per_layer_input_norm = norm()
        self.layer_scalar = param(rngs, (1,), (None,), dtype, init="ones")

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        per_layer_input: jax.Array | None,
        kv_store: Any,
        shared_kv: dict[int, KVView],
        attend: Any,
        vision_blocks: tuple[jax.Array, Callable[[jax.Array], jax.Array]] | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """x: (B, T, D); positions: (B, T); per_layer_input: (B, T, P) or None. Fills shared_kv[self] when stored.

        attend: the attention backend for this layer's kind and the step's phase (attention_backends.py).
        vision_blocks: (query block ids (B, T), a function kv_positions (B, S) -> key block ids (B, S)), -1 for
        text, for bidirectional attention inside an image on sliding layers; full-attention layers stay causal (as
        HF). Returns (x (B, T, D), the router's top-k expert ids (B, T, k) int32 on MoE layers else None)."""
        spec = self.spec
        residual = x
        h = self.input_layernorm(x)
        with jax.named_scope("attention"):
            q, new_kv = self.self_attn.project(h, positions)
            if new_kv is None:
                kv = shared_kv[spec.kv_source_layer]
            else:
                kv = kv_store.update(spec.index, *new_kv, positions)
                if spec.kv_sharing == "store":
                    shared_kv[spec.index] = kv
            blocks = None
            if vision_blocks is not None and spec.is_sliding:  # key blocks are found by key position
                blocks = (vision_blocks[0], vision_blocks[1](kv.key_positions()))
            attn = attend(q, kv, positions, sliding_window=spec.sliding_window, blocks=blocks)
            h = self.self_attn.output(attn)
        x = residual + self.post_attention_layernorm(h)

        residual = x
        h = self.mlp(self.pre_feedforward_layernorm(x))
        routed = None
        if self.moe is not None:
            moe_out, routed = self.moe(residual)
            h = self.post_feedforward_layernorm_1(h) + moe_out
        x = residual + self.post_feedforward_layernorm(h)

        if per_layer_input is not None:
            residual = x
            g = self.act(self.per_layer_input_gate(x)) * per_layer_input
            x = residual + self.post_per_layer_input_norm(self.per_layer_projection(g))
        return x * self.layer_scalar[...].astype(x.dtype), routed


class Gemma4Text(nnx.Module):
    """Gemma 4 causal LM (text). Parameter paths mirror HF names where it helps the checkpoint table."""

    def __init__(self, cfg: TextConfig, *, dtype: jnp.dtype = jnp.bfloat16, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.hidden_size
        self.embed_tokens = Embed(cfg.vocab_size, d, d**0.5, dtype=dtype, rngs=rngs)
        if cfg.has_ple:
            n, p = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
            self.embed_tokens_per_layer = Embed(cfg.vocab_size_per_layer_input, n * p, p**0.5, dtype=dtype,
                                                rngs=rngs, axes=("vocab", "ple_layers"))
            self.per_layer_model_projection = Linear((d,), (n, p), ("embed",), ("layers", "ple"), dtype=dtype,
                                                     rngs=rngs)
            self.per_layer_projection_norm = RMSNorm(p, cfg.rms_norm_eps, dtype=dtype, rngs=rngs, axis_name="ple")
        self.layers = nnx.List([DecoderLayer(cfg, spec, dtype=dtype, rngs=rngs) for spec in cfg.layers])
        self.norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear((d,), (cfg.vocab_size,), ("embed",), ("vocab",), dtype=dtype, rngs=rngs)

    def per_layer_inputs(self, ple_ids: jax.Array, embeds: jax.Array) -> jax.Array:
        """PLE: (token table lookup + normed projection of the embeddings) / sqrt(2). -> (B, T, L, P)."""
        cfg = self.cfg
        n, p = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
        token_part = self.embed_tokens_per_layer(ple_ids).reshape(*ple_ids.shape, n, p)
        proj = self.per_layer_model_projection(embeds) * jnp.asarray(cfg.hidden_size**-0.5, embeds.dtype)
        proj = self.per_layer_projection_norm(proj)
        return (proj + token_part) * jnp.asarray(2.0**-0.5, embeds.dtype)

    def embed(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """(B, T) ids -> embeddings (B, T, D) and per-layer inputs (B, T, L, P) or None."""
        x = self.embed_tokens(input_ids)
        ple = self.per_layer_inputs(input_ids, x) if self.cfg.has_ple else None
        return x, ple

    def head(self, x: jax.Array) -> jax.Array:
        """Final norm, LM head and soft-capping. (..., D) -> float32 logits (..., V)."""
        x = self.norm(x)
        cap = self.cfg.final_logit_softcapping
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens.logits(x, cap)
        return logits_einsum("...a,ab->...b", x, self.lm_head.kernel[...], cap)
