"""The Gemma 4 text decoder: embeddings (+ per-layer embeddings), decoder layers, final norm, LM head.

Layer order inside a decoder layer (as HF): input norm -> attention -> post-attention norm -> residual add;
pre-FF norm -> MLP (+ the MoE branch, each with its own post norm) -> post-FF norm -> residual add; then, with PLE,
the per-layer-input gate; finally the whole stream is multiplied by `layer_scalar`.

The forward is written over explicit positions and a pluggable K/V store (`KVStore`): the full-sequence forward
uses the identity store, the serving engine passes its paged/windowed pools. KV-shared layers read the K/V (and
key positions) that their source layer produced in the same forward.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from gemma4_jax.attention import Attention, attention_mask, reference_attention
from gemma4_jax.config import LayerSpec, TextConfig
from gemma4_jax.layers import Embed, Linear, RMSNorm, activation, param
from gemma4_jax.mlp import MLP
from gemma4_jax.moe import MoEBlock


class KVStore(Protocol):
    """Where a layer's new K/V go and what the layer attends over.

    update(layer, k, v, positions) -> (k_all (B, S, K, H), v_all (B, S, K, H), kv_positions (B, S)), where
    kv_positions < 0 marks empty slots. The full-sequence store returns its inputs unchanged.
    """

    def update(self, layer: int, k: jax.Array, v: jax.Array, positions: jax.Array) -> tuple[jax.Array, ...]: ...


class SequenceKV:
    """Identity K/V store: attention over exactly the tokens of this forward."""

    def update(self, layer: int, k: jax.Array, v: jax.Array, positions: jax.Array):
        return k, v, positions


def _select_tokens(index: jax.Array, *arrays):
    """Take token index[b] of every row of each (B, T, ...) array (None passes through) -> (B, 1, ...)."""
    rows = jnp.arange(index.shape[0])
    return tuple(None if a is None else a[rows, index][:, None] for a in arrays)


def _blocks_by_position(blocks: jax.Array, positions: jax.Array):
    """Key block ids of a chunk whose tokens (positions (B, T), -1 padding at the end) have block ids `blocks`
    (B, T): a function kv_positions (B, S) -> (B, S), the block of the chunk token at that position, -1 for keys
    outside the chunk (the cache). Works for any store layout (paged, ring + chunk): only positions are compared."""
    start = positions[:, :1]
    t = positions.shape[1]

    def key_blocks(kv_pos: jax.Array) -> jax.Array:
        index = kv_pos - start
        inside = (kv_pos >= 0) & (start >= 0) & (index >= 0) & (index < t)
        return jnp.where(inside, jnp.take_along_axis(blocks, jnp.clip(index, 0, t - 1), axis=1), -1)

    return key_blocks


def stack_routed(routed: list) -> jax.Array:
    """The ids collected by decode_layers(routed=...): per MoE layer (B, T, k) -> (B, T, L_moe, k) int32."""
    return jnp.stack(routed, axis=2)


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
        shared_kv: dict[int, tuple[jax.Array, jax.Array, jax.Array]],
        vision_blocks: tuple[jax.Array, jax.Array] | None = None,
        routed: list | None = None,
    ) -> jax.Array:
        """x: (B, T, D); positions: (B, T); per_layer_input: (B, T, P) or None. Fills shared_kv[self] when stored.

        vision_blocks: (query (B, T), key (B, S)) vision block ids (-1: text) for bidirectional attention inside an
        image on sliding layers; full-attention layers stay causal (as HF)."""
        spec = self.spec
        residual = x
        h = self.input_layernorm(x)
        with jax.named_scope("attention"):
            q = self.self_attn.query(h, positions)
            if spec.is_kv_shared:
                k_all, v_all, kv_pos = shared_kv[spec.kv_source_layer]
            else:
                k, v = self.self_attn.key_value(h, positions)
                k_all, v_all, kv_pos = kv_store.update(spec.index, k, v, positions)
                if spec.kv_sharing == "store":
                    shared_kv[spec.index] = (k_all, v_all, kv_pos)
            blocks = vision_blocks if spec.is_sliding else None
            if blocks is not None and callable(blocks[1]):  # engine chunk: key blocks found by key position
                blocks = (blocks[0], blocks[1](kv_pos))
            mask = attention_mask(positions, kv_pos, spec.sliding_window, blocks)
            attn = reference_attention(q, k_all, v_all, mask, scale=1.0)
            h = self.self_attn.output(attn)
        x = residual + self.post_attention_layernorm(h)

        residual = x
        h = self.mlp(self.pre_feedforward_layernorm(x))
        if self.moe is not None:
            h = self.post_feedforward_layernorm_1(h) + self.moe(residual, routed)
        x = residual + self.post_feedforward_layernorm(h)

        if per_layer_input is not None:
            residual = x
            g = self.act(self.per_layer_input_gate(x)) * per_layer_input
            x = residual + self.post_per_layer_input_norm(self.per_layer_projection(g))
        return x * self.layer_scalar[...].astype(x.dtype)


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

    def decode_layers(self, x, positions, ple, kv_store=None, layers: range | None = None, shared_kv=None,
                      keep_index: jax.Array | None = None, vision_blocks: jax.Array | None = None,
                      routed: list | None = None):
        """Run decoder layers (all, or a contiguous range: a pipeline stage) over x (B, T, D).

        keep_index: (B,) position in T of the one token per row whose output is wanted (the engine's last token).
        Given, the result is (B, 1, D), and the KV-shared layers (always the last ones: they write no K/V) run on
        that token alone, as HF's generate does; in an E2B-style model they are a third of the prefill compute.
        vision_blocks: (B, T) vision block ids (-1: text) of the tokens in x. With a kv_store (an engine prefill
        chunk) every block must lie inside the chunk: keys are matched to blocks by position, so cached keys from
        earlier chunks are never in a block (the engine schedules each image's run inside one chunk).
        routed: a list to which each MoE layer appends its router's top-k expert ids, (B, T, k) int32, or (B, 1, k)
        with keep_index (the kept token's). `stack_routed` turns it into (B, T, L_moe, k).
        """
        kv_store = SequenceKV() if kv_store is None else kv_store
        shared_kv = {} if shared_kv is None else shared_kv
        blocks = None
        if vision_blocks is not None:
            blocks = (vision_blocks, vision_blocks if kv_store is None else _blocks_by_position(vision_blocks,
                                                                                                 positions))
        sliced = False
        for i in layers if layers is not None else range(len(self.layers)):
            if keep_index is not None and not sliced and self.layers[i].spec.is_kv_shared:
                x, positions, ple = _select_tokens(keep_index, x, positions, ple)
                if vision_blocks is not None:  # the keys stay the whole sequence, the query is one token
                    blocks = (_select_tokens(keep_index, vision_blocks)[0], blocks[1])
                sliced = True
            layer_routed = [] if routed is not None else None
            with jax.named_scope(f"layer_{i}"):
                x = self.layers[i](x, positions, None if ple is None else ple[:, :, i, :], kv_store, shared_kv,
                                   blocks, layer_routed)
            if layer_routed:
                ids = layer_routed[0]
                routed.append(_select_tokens(keep_index, ids)[0] if keep_index is not None and not sliced else ids)
        if keep_index is not None and not sliced:
            x = _select_tokens(keep_index, x)[0]
        return x

    def head(self, x: jax.Array) -> jax.Array:
        """Final norm, LM head and soft-capping. (..., D) -> float32 logits (..., V)."""
        x = self.norm(x)
        logits = self.embed_tokens.attend(x) if self.cfg.tie_word_embeddings else self.lm_head(x)
        logits = logits.astype(jnp.float32)
        cap = self.cfg.final_logit_softcapping
        if cap:
            logits = jnp.tanh(logits / cap) * cap
        return logits

    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None, kv_store=None,
                 routed: list | None = None) -> jax.Array:
        """Full forward. input_ids, positions: (B, T) (positions < 0: padding) -> logits (B, T, V) float32.
        routed: see decode_layers."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
        x, ple = self.embed(input_ids)
        x = self.decode_layers(x, positions, ple, kv_store, routed=routed)
        return self.head(x)
