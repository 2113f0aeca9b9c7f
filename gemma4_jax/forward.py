"""The forward, written once: embed (text, plus media soft tokens), run a range of layers against a K/V store with
an attention plan, optionally apply the head.

Every caller runs this function and nothing else re-implements it:
- `Model.logits` (text and multimodal): all layers, the identity store, phase "prefill", head on every token;
- the engine step (serving/runner.py): all layers, the paged store, phase "prefill" or "decode", `keep_index`
  (each row's last token), head on that token, sampling after;
- a prefill chunk with media: the same, with `MediaTokens` spliced into the embeddings and vision blocks;
- each pipeline stage (pipeline.py): a range of layers; stage 0 starts from tokens, later stages from the
  `Activations` the previous stage returned; the last stage applies the head.

`keep_index`: the rows' kept token. The KV-shared layers (always the last ones: they write no K/V) run on that token
alone, as HF's generate does; in an E2B-style model they are a third of the prefill compute. So x narrows to
(B, 1, D) at the first KV-shared layer, or at the end of the last layer's range when there is none.

Routed-expert ids come back as an explicit output behind the static flag `return_routed`: (B, T, L_r, k) int32
for the MoE layers of the range (T = 1 with keep_index: the kept token's), never through a side channel.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from gemma4_jax.attention_backends import AttentionPlan
from gemma4_jax.decoder import SequenceKV

PHASES = ("prefill", "decode")


@struct.dataclass
class MediaTokens:
    """Soft tokens to splice into the embeddings: slots (M,) int32 flat indices into the (B * T) tokens of the
    placeholders, soft (M, D) their soft tokens in the same order (multimodal.py)."""

    slots: jax.Array
    soft: jax.Array


@struct.dataclass
class TokenInputs:
    """Where a forward starts from tokens. tokens, positions: (B, T) int32 (positions < 0: padding).
    media: soft tokens for placeholders, or None. vision_blocks: (B, T) int32 vision block ids (-1: not in an
    image) for bidirectional attention inside images on sliding layers, or None."""

    tokens: jax.Array
    positions: jax.Array
    media: MediaTokens | None = None
    vision_blocks: jax.Array | None = None


@struct.dataclass
class Activations:
    """The residual stream and what travels with it between layer ranges (pipeline stage boundaries).

    x: (B, T, D); positions: (B, T); ple: (B, T, L', P) per-layer inputs of layers ple_offset.. (None without PLE);
    shared: {source layer: its K/V view (kv_view.py)} of KV-sharing sources whose readers are still to come (a
    DenseKV once it leaves the forward that made it: see `forward`); vision_blocks: (B, T) or None; narrowed: rows
    already cut to their kept token (static).
    """

    x: jax.Array
    positions: jax.Array
    ple: jax.Array | None
    shared: dict
    vision_blocks: jax.Array | None = None
    ple_offset: int = struct.field(pytree_node=False, default=0)
    narrowed: bool = struct.field(pytree_node=False, default=False)


@struct.dataclass
class ForwardOutput:
    """logits: float32 (B, T, V) when the head ran, else None (then `activations` holds the stream);
    routed: int32 (B, T, L_r, k) router ids of the range's MoE layers when asked for, else None;
    hidden: (B, T, D) the final-normed stream (the LM head's input) when asked for with the head, else None."""

    logits: jax.Array | None
    activations: Activations | None
    routed: jax.Array | None
    hidden: jax.Array | None = None


def take_tokens(index: jax.Array, a: jax.Array | None) -> jax.Array | None:
    """a: (B, T, ...) -> (B, 1, ...), token index[b] of row b (None passes through)."""
    if a is None:
        return None
    return a[jnp.arange(a.shape[0]), index][:, None]


def key_blocks_by_position(blocks: jax.Array, positions: jax.Array):
    """Key block ids for a chunk whose tokens (positions (B, T), -1 padding at the end) have block ids `blocks`
    (B, T): a function kv_positions (B, S) -> (B, S), the block of the chunk token at that position, -1 for keys
    outside the chunk (cached keys are never in a block: the engine keeps each image inside one chunk). Only
    positions are compared, so it works for any store layout."""
    start = positions[:, :1]
    t = positions.shape[1]

    def key_blocks(kv_pos: jax.Array) -> jax.Array:
        index = kv_pos - start
        inside = (kv_pos >= 0) & (start >= 0) & (index >= 0) & (index < t)
        return jnp.where(inside, jnp.take_along_axis(blocks, jnp.clip(index, 0, t - 1), axis=1), -1)

    return key_blocks


def embed(model: Any, inputs: TokenInputs) -> Activations:
    """Token (and soft-token) embeddings and per-layer inputs -> the stream before layer 0."""
    if inputs.media is not None:
        x, ple = model.embed_multimodal(inputs.tokens, inputs.media.slots, inputs.media.soft)
    else:
        x, ple = model.embed(inputs.tokens)
    return Activations(x=x, positions=inputs.positions, ple=ple, shared={}, vision_blocks=inputs.vision_blocks)


def _narrow(act: Activations, keep_index: jax.Array) -> Activations:
    return act.replace(x=take_tokens(keep_index, act.x), positions=take_tokens(keep_index, act.positions),
                       ple=take_tokens(keep_index, act.ple), vision_blocks=take_tokens(keep_index, act.vision_blocks),
                       narrowed=True)


def forward(model: Any, inputs: TokenInputs | Activations, *, attention: AttentionPlan, phase: str = "prefill",
            kv_store: Any = None, layers: range | None = None, keep_index: jax.Array | None = None,
            head: bool = True, return_routed: bool = False, return_hidden: bool = False) -> ForwardOutput:
    """Run `model` (a merged Gemma4Text / Gemma4Multimodal) from tokens or from a previous range's activations.

    attention, phase: the plan and the phase whose backends the layers call (per layer kind).
    kv_store: the K/V store (decoder.KVStore); None = the identity store (a full-sequence forward).
    layers: a contiguous range of layer indices (a pipeline stage); None = all.
    keep_index: (B,) index in T of each row's kept token (see the module docstring), or None.
    head: apply the final norm, LM head and soft-capping -> logits; False -> the activations for the next range.
    return_hidden: with the head, also return the final-normed stream (B, T, D) (T = 1 with keep_index): the MTP
    assistant drafter's recurrent input (assistant.py). Static; off, the program is unchanged.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    kv_store = SequenceKV() if kv_store is None else kv_store
    act = embed(model, inputs) if isinstance(inputs, TokenInputs) else inputs
    layers = range(len(model.layers)) if layers is None else layers
    last_range = layers.stop == len(model.layers)
    shared = dict(act.shared)
    # Key blocks are matched by position against the tokens of this forward (before any narrowing).
    blocks = None
    if act.vision_blocks is not None:
        blocks = (act.vision_blocks, key_blocks_by_position(act.vision_blocks, act.positions))
    routed = []
    for i in layers:
        layer = model.layers[i]
        if keep_index is not None and not act.narrowed and layer.spec.is_kv_shared:
            act = _narrow(act, keep_index)
            if blocks is not None:  # the keys stay the whole sequence, the query is one token
                blocks = (act.vision_blocks, blocks[1])
        ple = None if act.ple is None else act.ple[:, :, i - act.ple_offset, :]
        attend = attention.backend(phase, layer.spec.is_sliding)
        with jax.named_scope(f"layer_{i}"):
            x, ids = layer(act.x, act.positions, ple, kv_store, shared, attend, blocks)
        act = act.replace(x=x)
        if return_routed and ids is not None:
            routed.append(take_tokens(keep_index, ids) if keep_index is not None and not act.narrowed else ids)
    if keep_index is not None and not act.narrowed and last_range:
        act = _narrow(act, keep_index)
    routed_ids = jnp.stack(routed, axis=2) if return_routed and routed else None
    if return_routed and not routed:  # a range without MoE layers: (B, T, 0, k)
        k = model.cfg.top_k_experts or 0
        b, t = act.x.shape[:2]
        routed_ids = jnp.zeros((b, t, 0, k), jnp.int32)
    if head:
        # model.head norms again; XLA's common-subexpression pass computes the norm once.
        hidden = model.norm(act.x) if return_hidden else None
        return ForwardOutput(logits=model.head(act.x), activations=None, routed=routed_ids, hidden=hidden)
    # Views that leave this forward (to a later pipeline stage, on other devices) travel gathered: a paged or ring
    # view holds the whole pool, which must not be copied across stages (views that do not cross are dropped by
    # the caller inside the same jitted program, so their gathers cost nothing).
    shared = {src: view.dense() for src, view in shared.items()}
    return ForwardOutput(logits=None, activations=act.replace(shared=shared), routed=routed_ids)
