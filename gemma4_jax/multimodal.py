"""Gemma4ForConditionalGeneration: the text decoder plus its towers, and the merge of soft tokens into the prompt.

`Gemma4Multimodal` is a `Gemma4Text` (same parameter paths for the text part, so the text checkpoint table, the
sharding rules and the serving engine see no difference) with extra subtrees:
  vision_tower + embed_vision (vision.py)          when config.json has a `vision_config`
  audio (audio.py `Gemma4Audio`: tower + embedder)  when it has an `audio_config`
Each modality reduces to the same shape: soft tokens (N, L, D) in the text embedding space plus a validity mask
(N, L). The valid ones, in row-major order, replace the placeholder tokens of that modality (image / video / audio
token ids) in prompt order, which is HF's `masked_scatter`.

Facts of the reference this follows:
- placeholder ids are replaced by the pad id before the token embedding and the per-layer (PLE) token lookup;
  the PLE projection part then sees the merged embeddings (soft tokens included);
- with `mm_token_type_ids` (1 image, 2 video) and text_config.use_bidirectional_attention == "vision", the soft
  tokens of one contiguous run (one image, one video frame) attend to each other in both directions on sliding
  layers, still bounded by the window towards the past; full-attention layers stay causal;
- the towers run once per request: `encode_*` return the soft tokens in placeholder order, `embed_multimodal`
  splices them into any token embeddings, so the serving engine can keep them for a request's prefill chunks.

`logits(...)` is the host-side entry behind `Model.logits(input_ids, pixel_values=..., ...)`: it checks the
inputs against the prompt, runs each tower once (jitted), then the decoder with the merged embeddings.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma4_jax import audio as audio_lib
from gemma4_jax import vision as vision_lib
from gemma4_jax.config import ModelConfig
from gemma4_jax.decoder import Gemma4Text, stack_routed

IMAGE_TYPE, VIDEO_TYPE, AUDIO_TYPE = 1, 2, 3  # values of HF's mm_token_type_ids (0 = text)


def has_towers(cfg: ModelConfig) -> bool:
    return cfg.vision is not None or getattr(cfg, "audio", None) is not None


class Gemma4Multimodal(Gemma4Text):
    """The text decoder with a vision tower (and an audio tower when the config has one)."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype = jnp.bfloat16, rngs: nnx.Rngs):
        super().__init__(config.text, dtype=dtype, rngs=rngs)
        self.model_config = config
        d = config.text.hidden_size
        v = config.vision
        self.vision_tower = vision_lib.VisionTower(v, dtype=dtype, rngs=rngs) if v is not None else None
        self.embed_vision = (vision_lib.MultimodalEmbedder(v.hidden_size, d, v.rms_norm_eps, dtype=dtype, rngs=rngs)
                             if v is not None else None)
        audio_cfg = getattr(config, "audio", None)
        if audio_cfg is not None:
            from gemma4_jax import checkpoint

            checkpoint.register_tower_mapper(audio_lib.map_key)
        self.audio = audio_lib.Gemma4Audio(audio_cfg, d, dtype=dtype, rngs=rngs) if audio_cfg is not None else None

    def vision_soft_tokens(self, pixel_values: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """pixel_values (N, P, patch_dim), positions (N, P, 2) -> soft tokens (N, L, D), valid (N, L)."""
        with jax.named_scope("vision_tower"):
            features, valid = self.vision_tower(pixel_values, positions)
        with jax.named_scope("embed_vision"):
            return self.embed_vision(features), valid

    def audio_soft_tokens(self, features: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """input_features (N, T, F), input_features_mask (N, T) -> soft tokens (N, T', D), valid (N, T')."""
        return self.audio.embed(features, mask)

    def embed_multimodal(self, input_ids: jax.Array, slots: jax.Array, soft_tokens: jax.Array
                         ) -> tuple[jax.Array, jax.Array | None]:
        """Token embeddings with soft tokens spliced in.

        input_ids (B, T); slots (M,) flat indices into B*T of the placeholders; soft_tokens (M, D) in that order.
        Returns embeddings (B, T, D) and per-layer inputs (B, T, L, P) or None.
        """
        cfg = self.model_config
        placeholder = ((input_ids == cfg.image_token_id) | (input_ids == cfg.video_token_id)
                       | (input_ids == cfg.audio_token_id))
        ids = jnp.where(placeholder, cfg.text.pad_token_id, input_ids)
        x = self.embed_tokens(ids)
        b, t, d = x.shape
        x = x.reshape(b * t, d).at[slots].set(soft_tokens.astype(x.dtype)).reshape(b, t, d)
        ple = self.per_layer_inputs(ids, x) if self.cfg.has_ple else None
        return x, ple


def build_module(cfg: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs) -> Gemma4Text:
    """The model module a config describes: `Gemma4Multimodal` when it has a tower, else `Gemma4Text`."""
    if has_towers(cfg):
        return Gemma4Multimodal(cfg, dtype=dtype, rngs=rngs)
    return Gemma4Text(cfg.text, dtype=dtype, rngs=rngs)


def vision_block_ids(mm_token_type_ids: np.ndarray) -> np.ndarray:
    """(B, T) modality types -> (B, T) int32 block ids: each contiguous run of image/video tokens is one block
    (numbered from 0 per row), text and audio are -1 (HF `get_block_sequence_ids_for_mask`)."""
    types = np.asarray(mm_token_type_ids)
    is_vision = (types == IMAGE_TYPE) | (types == VIDEO_TYPE)
    starts = is_vision & ~np.pad(is_vision, ((0, 0), (1, 0)))[:, :-1]
    return np.where(is_vision, np.cumsum(starts, axis=1) - 1, -1).astype(np.int32)


# ----------------------------------------------------------------------------------------------------------------
# Jitted pieces: each tower once, then the decoder.


TOWERS = {"vision": "vision_soft_tokens", "audio": "audio_soft_tokens"}


@functools.partial(jax.jit, static_argnames=("graphdef", "kind"))
def _tower(graphdef: nnx.GraphDef, state: nnx.State, a: jax.Array, b: jax.Array, kind: str):
    return getattr(nnx.merge(graphdef, state), TOWERS[kind])(a, b)


def soft_tokens(model: Any, kind: str, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run a tower of a loaded Model once -> host (soft tokens (N, L, D), valid (N, L)).

    kind "vision": a = pixel values (N, P, patch_dim), b = positions (N, P, 2); "audio": a = features (N, T, F),
    b = mask (N, T). A pipelined model runs it on its first stage, which owns the towers."""
    if model.pipeline is not None:
        return model.pipeline.soft_tokens(kind, a, b)
    with jax.set_mesh(model.mesh):
        return jax.device_get(_tower(model.graphdef, model.state, jnp.asarray(a), jnp.asarray(b), kind=kind))


def valid_soft_tokens(model: Any, kind: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The valid soft tokens (n, D) of a tower's inputs, row-major (placeholder order)."""
    tokens, valid = soft_tokens(model, kind, a, b)
    return tokens[valid]


def vision_token_count(positions: np.ndarray, vcfg: Any) -> int:
    """Soft tokens of images / frames with patch positions (N, P, 2) (-1: padding): real patches / k^2."""
    return int(((positions != -1).all(-1).sum(-1) // vcfg.pooling_kernel_size**2).sum())


def audio_inputs(input_features: Any, input_features_mask: Any) -> tuple[np.ndarray, np.ndarray]:
    """Check and convert the feature extractor's outputs -> (features (A, T, F) float32, mask (A, T) bool)."""
    if input_features_mask is None:
        raise ValueError("input_features needs input_features_mask (the feature extractor's frame mask)")
    feats = np.asarray(input_features, np.float32)
    mask = np.asarray(input_features_mask).astype(bool)
    if feats.ndim != 3 or mask.shape != feats.shape[:2]:
        raise ValueError(f"input_features must be (clips, frames, mel bins) with input_features_mask (clips, "
                         f"frames); got {feats.shape} and {mask.shape}")
    return feats, mask


@functools.partial(jax.jit, static_argnames=("graphdef", "return_routed_experts"))
def _forward(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array, positions: jax.Array,
             slots: jax.Array, soft_tokens: jax.Array, vision_blocks: jax.Array | None,
             return_routed_experts: bool = False):
    model = nnx.merge(graphdef, state)
    x, ple = model.embed_multimodal(input_ids, slots, soft_tokens)
    routed = [] if return_routed_experts else None
    x = model.decode_layers(x, positions, ple, vision_blocks=vision_blocks, routed=routed)
    logits = model.head(x)
    return (logits, stack_routed(routed)) if return_routed_experts else logits


# ----------------------------------------------------------------------------------------------------------------
# Host side: check the inputs against the prompt, run the towers, run the decoder.


def _patches(name: str, pixel_values: Any, position_ids: Any, vcfg: Any, pos_name: str) -> tuple[np.ndarray, ...]:
    if position_ids is None:
        raise ValueError(f"{name} needs {pos_name} (the processor's (x, y) patch positions)")
    pv = np.asarray(pixel_values)
    pos = np.asarray(position_ids)
    if pv.ndim != 3 or pv.shape[-1] != vcfg.patch_dim or not np.issubdtype(pv.dtype, np.floating):
        raise ValueError(f"{name} must be a float array (images, patches, {vcfg.patch_dim}) = 3 x patch_size**2 "
                         f"values per patch; got {pv.dtype} {pv.shape}")
    if pos.shape != (*pv.shape[:2], 2) or not np.issubdtype(pos.dtype, np.integer):
        raise ValueError(f"{pos_name} must be an integer array of shape {(*pv.shape[:2], 2)}; got {pos.dtype} "
                         f"{pos.shape}")
    k2 = vcfg.pooling_kernel_size**2
    if pv.shape[1] % k2:
        raise ValueError(f"{name}: {pv.shape[1]} patches per image is not a multiple of pooling_kernel_size**2={k2}")
    if pos.size and pos.max() >= vcfg.position_embedding_size:
        raise ValueError(f"{pos_name}: patch position {int(pos.max())} is beyond the vision tower's position table "
                         f"({vcfg.position_embedding_size} rows)")
    if pos.size and pos.min() < -1:
        raise ValueError(f"{pos_name}: positions must be >= 0, or -1 for padding patches")
    return pv.astype(np.float32), pos.astype(np.int32)


def _count(ids: np.ndarray, token_id: int) -> int:
    return int(np.count_nonzero(ids == token_id))


def logits(model: Any, ids: np.ndarray, positions: np.ndarray, *, pixel_values: Any = None,
           image_position_ids: Any = None, pixel_values_videos: Any = None, video_position_ids: Any = None,
           num_frames_per_video: Any = None, input_features: Any = None, input_features_mask: Any = None,
           mm_token_type_ids: Any = None, return_routed_experts: bool = False) -> jax.Array:
    """Full-sequence forward of a multimodal model (see `Model.logits`). ids, positions: (B, T) numpy."""
    cfg: ModelConfig = model.config
    vcfg = cfg.vision
    blocks = None
    if mm_token_type_ids is not None:
        types = np.asarray(mm_token_type_ids)
        if types.ndim == 1:
            types = types[None]
        if types.shape != ids.shape:
            raise ValueError(f"mm_token_type_ids shape {types.shape} does not match input_ids {ids.shape}")
        if cfg.vision_bidirectional:  # otherwise HF keeps every layer causal
            blocks = jnp.asarray(vision_block_ids(types))

    # Every check first (cheap), then the towers.
    pending: list[tuple[np.ndarray, Any, int]] = []  # (slots, encoder, soft-token count) per modality
    flat_ids = ids.reshape(-1)

    def add(token_id: int, what: str, count: int, encode) -> None:
        slots = np.flatnonzero(flat_ids == token_id).astype(np.int32)
        if count != len(slots):
            raise ValueError(f"{what}: the inputs give {count} soft tokens but input_ids hold {len(slots)} "
                             f"placeholder tokens (id {token_id}); expand the prompt with the processor")
        if count:
            pending.append((slots, encode, count))

    media = {"pixel_values": pixel_values, "pixel_values_videos": pixel_values_videos}
    for name, value in media.items():
        if value is not None and vcfg is None:
            raise ValueError(f"{name} given, but this checkpoint has no vision tower (no vision_config)")
    if pixel_values is not None:
        pv, pos = _patches("pixel_values", pixel_values, image_position_ids, vcfg, "image_position_ids")
        add(cfg.image_token_id, "images", vision_token_count(pos, vcfg),
            functools.partial(valid_soft_tokens, model, "vision", pv, pos))
    elif _count(ids, cfg.image_token_id):
        raise ValueError(f"input_ids hold {_count(ids, cfg.image_token_id)} image placeholder tokens but no "
                         "pixel_values were given")
    if pixel_values_videos is not None:
        pv, pos = _patches("pixel_values_videos", pixel_values_videos, video_position_ids, vcfg,
                           "video_position_ids")
        if num_frames_per_video is not None and int(np.sum(num_frames_per_video)) != pv.shape[0]:
            raise ValueError(f"num_frames_per_video sums to {int(np.sum(num_frames_per_video))} but "
                             f"pixel_values_videos holds {pv.shape[0]} frames")
        add(cfg.video_token_id, "videos", vision_token_count(pos, vcfg),
            functools.partial(valid_soft_tokens, model, "vision", pv, pos))
    elif _count(ids, cfg.video_token_id):
        raise ValueError(f"input_ids hold {_count(ids, cfg.video_token_id)} video placeholder tokens but no "
                         "pixel_values_videos were given")
    if input_features is not None:
        if getattr(cfg, "audio", None) is None:
            raise ValueError("input_features given, but this checkpoint has no audio tower (no audio_config)")
        feats, mask = audio_inputs(input_features, input_features_mask)
        count = int(audio_lib.num_soft_tokens(mask).sum())  # two stride-2 subsampling convolutions
        add(cfg.audio_token_id, "audio", count, functools.partial(valid_soft_tokens, model, "audio", feats, mask))
    elif _count(ids, cfg.audio_token_id):
        raise ValueError(f"input_ids hold {_count(ids, cfg.audio_token_id)} audio placeholder tokens but no "
                         "input_features were given")

    pieces = [(slots, encode()) for slots, encode, _ in pending]  # each tower once
    d = cfg.text.hidden_size
    if pieces:
        slots = np.concatenate([s for s, _ in pieces])
        soft = jnp.asarray(np.concatenate([t for _, t in pieces], axis=0))
    else:
        slots, soft = np.zeros((0,), np.int32), jnp.zeros((0, d), model.dtype)
    if model.pipeline is not None:
        media = {"slots": slots.astype(np.int32), "soft_tokens": soft, "vision_blocks": blocks}
        return model.pipeline.forward(ids.astype(np.int32), positions.astype(np.int32), return_routed_experts,
                                      media)
    return _forward(model.graphdef, model.state, jnp.asarray(ids, jnp.int32), jnp.asarray(positions, jnp.int32),
                    jnp.asarray(slots), soft, blocks, return_routed_experts)
