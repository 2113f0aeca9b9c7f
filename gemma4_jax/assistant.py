"""The MTP assistant (drafter) model: HF `Gemma4AssistantForCausalLM`, as a module and one pure draft step.

A draft step (`assistant_step`) for each row b of a batch, with p = position[b] (the position of `token[b]`, the
last token of the sequence so far, whose K/V the target has not written yet):

    e      = target_embed(token)                          (B, D_t)  the target's scaled token embedding
    x      = pre_projection(concat[e, hidden])            (B, D)    hidden: the recurrent state (B, D_t)
    x      = decoder layers(x) at position p              every layer KV-shared: it attends to the target's K/V
    h      = norm(x)
    hidden = post_projection(h)                           (B, D_t)  the next recurrent state
    logits = lm_head(h) | centroid-masked head(h)         (B, V)    float32, never soft-capped

Recurrent state (HF `SinglePositionMultiTokenCandidateGenerator`): the first draft of a round starts from the
target's final-normed hidden state (the input of its LM head) at the token before `token`, i.e. the state whose
logits produced `token`; every later draft of the round starts from the previous draft step's `hidden` and the
token it drafted. All drafts of a round use the same position p (= current length - 1) and the same target K/V.

Attention (`AssistantAttend`): layer kind k reads the K/V of the target's last layer of kind k that owns its K/V
(assistant_config.target_kv_layers), given as arrays with their key positions (`TargetKV`). There is no causal mask
over them, only validity: a query at p sees the keys at positions 0..p-1 (keys at >= p, e.g. rejected drafts still
in a pool, are ignored; negative positions are empty slots). Sliding layers see the last W + 1 of them,
positions p-1-W .. p-1, W = the assistant's sliding_window: HF builds the assistant's window as a bidirectional
window (|q - kv| <= W, so W + 1 keys) and flips it to look back from the current position.

Centroid-masked head (`use_ordered_embeddings`): centroid logits (B, C) pick the top-k clusters; `token_ordering`
viewed as (C, V / C) lists each cluster's tokens; only those k * V / C tokens are scored against the LM head, every
other token gets (the row's lowest selected logit - 1). HF takes that minimum over the whole batch; here it is per
row, so rows never influence each other (the same at batch 1, the only batch HF's assisted generation runs).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from gemma4_jax.assistant_config import AssistantConfig
from gemma4_jax.attention_backends import AttentionBackend, AttentionPlan, XlaAttention
from gemma4_jax.config import SLIDING
from gemma4_jax.decoder import DecoderLayer
from gemma4_jax.kv_view import DenseKV, KVView
from gemma4_jax.layers import Embed, Linear, RMSNorm


@struct.dataclass
class TargetKV:
    """The target's stored K/V that the assistant reads: one K/V view (kv_view.py) per layer kind.

    sliding: the view of the target's last sliding layer that owns K/V (keys (B, S_s, K_s, H_s)); full: that of its
    last full-attention layer (B, S_f, K_f, H_f). Keys rotated and k-normed, values v-normed, exactly as the target's
    attention reads them; key positions from the view (negative: empty slot). A `DenseKV(k, v, positions)` for
    arrays, or the engine's `PagedKV` over its pools as they stand (read in place by a kernel backend).
    """

    sliding: KVView
    full: KVView

    @staticmethod
    def dense(sliding: tuple[jax.Array, jax.Array, jax.Array],
              full: tuple[jax.Array, jax.Array, jax.Array]) -> TargetKV:
        """From (k (B, S, K, H), v (B, S, K, H), key positions (B, S) int32) per kind."""
        return TargetKV(sliding=DenseKV(*sliding), full=DenseKV(*full))

    def of(self, attention_type: str) -> KVView:
        return self.sliding if attention_type == SLIDING else self.full


@struct.dataclass
class DraftOutput:
    """One draft step: logits float32 (B, V) of the next token; hidden (B, D_t), the next recurrent state."""

    logits: jax.Array
    hidden: jax.Array


@struct.dataclass
class Drafts:
    """A round of drafts: tokens int32 (B, k), logits float32 (B, k, V), hidden (B, D_t) after the last step."""

    tokens: jax.Array
    logits: jax.Array
    hidden: jax.Array


class AssistantAttend:
    """An attention backend as an assistant layer uses it (see the module docstring for the mask).

    The forward's backends are causal by position with a window `kv > q - W`; called with query position p - 1
    and window W + 1 they give exactly the assistant's mask (keys at p-1-W .. p-1), so every backend, kernels
    included, serves the assistant too. Rotary embeddings were applied at p before this point."""

    def __init__(self, backend: AttentionBackend):
        self.backend = backend

    def __call__(self, q: jax.Array, kv: KVView, q_positions: jax.Array, *, sliding_window: int | None,
                 blocks=None) -> jax.Array:
        window = None if sliding_window is None else sliding_window + 1
        # A padding row (position < 0) stays negative, i.e. sees nothing (uniform softmax, no NaN). The output
        # keeps the assistant's dtype whatever the target's K/V dtype (the reference returns the values' dtype).
        out = self.backend(q, kv, q_positions - 1, sliding_window=window, blocks=None)
        return out.astype(q.dtype)


class MaskedEmbedder(nnx.Module):
    """The centroid-masked LM head (HF `Gemma4AssistantMaskedEmbedder`).

    centroids: (D,) -> (C,); token_ordering: int32 (V,), a permutation of the vocabulary, cluster c's tokens are
    token_ordering[c * V/C : (c + 1) * V/C]."""

    def __init__(self, cfg: AssistantConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, v = cfg.text.hidden_size, cfg.text.vocab_size
        self.num_centroids = cfg.num_centroids
        self.top_k = cfg.centroid_intermediate_top_k
        self.centroids = Linear((d,), (cfg.num_centroids,), ("embed",), ("centroids",), dtype=dtype, rngs=rngs)
        # Not a weight but a checkpoint buffer; the identity until loaded. Replicated (1 MiB at V = 262144).
        self.token_ordering = nnx.Param(jnp.arange(v, dtype=jnp.int32), logical_axes=(None,))

    def __call__(self, h: jax.Array, lm_head: jax.Array) -> jax.Array:
        """h: (B, D); lm_head: (V, D) -> float32 logits (B, V)."""
        b, v = h.shape[0], lm_head.shape[0]
        _, top = jax.lax.top_k(self.centroids(h), self.top_k)  # (B, k)
        clusters = self.token_ordering[...].reshape(self.num_centroids, -1)  # (C, V/C)
        selected = clusters[top].reshape(b, -1)  # (B, k * V/C) token ids
        rows = jnp.take(lm_head, selected, axis=0).astype(h.dtype)  # (B, k * V/C, D)
        scores = jnp.einsum("BD,BSD->BS", h, rows).astype(jnp.float32)
        floor = jnp.min(scores, axis=-1, keepdims=True) - 1.0  # (B, 1)
        out = jnp.broadcast_to(floor, (b, v))
        return out.at[jnp.arange(b)[:, None], selected].set(scores)


class Gemma4Assistant(nnx.Module):
    """The assistant's weights. Paths mirror HF's (less the `model.` prefix): embed_tokens (the tied LM head; the
    assistant never embeds tokens itself), layers, norm, lm_head (untied only), pre_projection, post_projection,
    masked_embedding (ordered embeddings only)."""

    def __init__(self, cfg: AssistantConfig, *, dtype: jnp.dtype = jnp.bfloat16, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)  # of the activations (pre_projection may be a packed QuantLinear)
        text = cfg.text
        d, backbone = text.hidden_size, cfg.backbone_hidden_size
        self.embed_tokens = Embed(text.vocab_size, d, 1.0, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(text, spec, dtype=dtype, rngs=rngs) for spec in text.layers])
        self.norm = RMSNorm(d, text.rms_norm_eps, dtype=dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear((d,), (text.vocab_size,), ("embed",), ("vocab",), dtype=dtype, rngs=rngs)
        # The concatenated [embedding, hidden] input is one axis of 2 * D_t (HF's Linear(2 * backbone, hidden)).
        self.pre_projection = Linear((2 * backbone,), (d,), ("embed",), ("embed",), dtype=dtype, rngs=rngs)
        self.post_projection = Linear((d,), (backbone,), ("embed",), ("embed",), dtype=dtype, rngs=rngs)
        self.masked_embedding = MaskedEmbedder(cfg, dtype=dtype, rngs=rngs) if cfg.use_ordered_embeddings else None

    def lm_head_weight(self) -> jax.Array:
        """(V, D): the tied embedding table or the untied head's kernel transposed."""
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens.embedding[...]
        return self.lm_head.kernel[...].T

    def logits(self, h: jax.Array) -> jax.Array:
        """Final-normed h (B, D) -> float32 logits (B, V)."""
        if self.masked_embedding is not None:
            return self.masked_embedding(h, self.lm_head_weight())
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens.attend(h).astype(jnp.float32)
        return self.lm_head(h).astype(jnp.float32)

    def __call__(self, token_embedding: jax.Array, hidden: jax.Array, target_kv: TargetKV, position: jax.Array,
                 attention: AttentionPlan | None = None) -> DraftOutput:
        """One draft step from the target's embedding of the token, see `assistant_step`.

        token_embedding: (B, D_t) the target's scaled embedding of `token`; hidden: (B, D_t); position: (B,) int32.
        attention: the plan whose "decode" backends the layers call, per kind (default: the XLA reference)."""
        plan = attention or AttentionPlan.uniform(XlaAttention())
        x = jnp.concatenate([token_embedding.astype(self.dtype), hidden.astype(self.dtype)], axis=-1)
        x = self.pre_projection(x)[:, None, :]  # (B, 1, D)
        positions = position.astype(jnp.int32)[:, None]  # (B, 1)
        for i, layer in enumerate(self.layers):
            spec = layer.spec
            # DecoderLayer reads a KV-shared layer's K/V as shared_kv[kv_source_layer]: here the target's.
            shared = {spec.kv_source_layer: target_kv.of(spec.attention_type)}
            attend = AssistantAttend(plan.backend("decode", spec.is_sliding))
            with jax.named_scope(f"assistant_layer_{i}"):
                x, _ = layer(x, positions, None, None, shared, attend)
        h = self.norm(x[:, 0])
        return DraftOutput(logits=self.logits(h), hidden=self.post_projection(h))


def assistant_step(assistant: Gemma4Assistant, target_embed: Callable[[jax.Array], jax.Array], token: jax.Array,
                   hidden: jax.Array, target_kv: TargetKV, position: jax.Array,
                   attention: AttentionPlan | None = None) -> DraftOutput:
    """One draft step (pure; jit it with the assistant split, or call it inside a jitted step).

    assistant: a (merged) Gemma4Assistant. target_embed: ids (B,) -> the target's scaled embeddings (B, D_t), e.g.
    the target module's `embed_tokens`. token: (B,) int32, the last token (sampled by the target or drafted by the
    previous step). hidden: (B, D_t), the recurrent state (module docstring). target_kv: the target's K/V.
    position: (B,) int32, the position of the round's first token (the same for every step of a round).
    attention: the attention plan (its "decode" backends; default XLA).
    Returns DraftOutput(logits (B, V) float32, hidden (B, D_t)).
    """
    return assistant(target_embed(token), hidden, target_kv, position, attention)


def draft(assistant: Gemma4Assistant, target_embed: Callable[[jax.Array], jax.Array], token: jax.Array,
          hidden: jax.Array, target_kv: TargetKV, position: jax.Array, num_tokens: int,
          choose: Callable[[jax.Array, int], jax.Array] | None = None,
          attention: AttentionPlan | None = None) -> Drafts:
    """A round of `num_tokens` (static) recurrent draft steps from one position, as HF's candidate generator.

    choose(logits (B, V) float32, step) -> tokens (B,): how each draft is picked (default argmax, greedy drafting;
    a sampler for rejection sampling). Arguments as `assistant_step`. Returns Drafts (tokens (B, k), logits
    (B, k, V), hidden (B, D_t))."""
    pick = choose or (lambda logits, step: jnp.argmax(logits, axis=-1).astype(jnp.int32))
    tokens, logits = [], []
    for step in range(num_tokens):
        out = assistant_step(assistant, target_embed, token, hidden, target_kv, position, attention)
        token, hidden = pick(out.logits, step).astype(jnp.int32), out.hidden
        tokens.append(token)
        logits.append(out.logits)
    return Drafts(tokens=jnp.stack(tokens, axis=1), logits=jnp.stack(logits, axis=1), hidden=hidden)
