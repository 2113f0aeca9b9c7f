"""Media for a loaded Model (the facade layer): run the vision / audio towers once, and turn the HF processor's
outputs into the forward's media inputs after checking them against the prompt.

Used by `Model.logits(input_ids, pixel_values=..., ...)` (`media_inputs`) and by the serving engine, which runs a
request's towers once at its first prefill chunk (`valid_soft_tokens`). A pipelined model runs its towers on its
first stage, which owns them (pipeline.Pipeline.soft_tokens).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma4_jax import audio as audio_lib
from gemma4_jax.config import ModelConfig
from gemma4_jax.forward import MediaTokens
from gemma4_jax.layers import model_jit
from gemma4_jax.multimodal import TOWERS, vision_block_ids


@functools.partial(model_jit, static_argnames=("graphdef", "kind"))
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


def compile_tower(model: Any, kind: str, a: np.ndarray, b: np.ndarray) -> None:
    """Compile, without running, the program `soft_tokens` runs for inputs shaped as a and b (a single-program
    model): its later calls with such inputs find it in JAX's in-memory cache (serving's warm-up)."""
    with jax.set_mesh(model.mesh):
        _tower.lower(model.graphdef, model.state, jnp.asarray(a), jnp.asarray(b), kind=kind).compile()


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


def check_patches(name: str, pixel_values: Any, position_ids: Any, vcfg: Any, pos_name: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Check an image / video processor output against the vision config -> (float32 (N, P, patch_dim), int32
    positions (N, P, 2))."""
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


def media_inputs(model: Any, ids: np.ndarray, *, pixel_values: Any = None, image_position_ids: Any = None,
                 pixel_values_videos: Any = None, video_position_ids: Any = None, num_frames_per_video: Any = None,
                 input_features: Any = None, input_features_mask: Any = None, mm_token_type_ids: Any = None
                 ) -> tuple[MediaTokens, np.ndarray | None]:
    """A multimodal model's full-sequence inputs (see `Model.logits`): checks every input against the prompt ids
    (B, T) first (cheap), then runs each tower once. Returns (MediaTokens: placeholder slots (M,) and soft tokens
    (M, D), possibly M = 0; vision block ids (B, T) or None when attention stays causal)."""
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
            blocks = vision_block_ids(types)

    pending: list[tuple[np.ndarray, Any, int]] = []  # (slots, encoder, soft-token count) per modality
    flat_ids = ids.reshape(-1)

    def add(token_id: int, what: str, count: int, encode) -> None:
        slots = np.flatnonzero(flat_ids == token_id).astype(np.int32)
        if count != len(slots):
            raise ValueError(f"{what}: the inputs give {count} soft tokens but input_ids hold {len(slots)} "
                             f"placeholder tokens (id {token_id}); expand the prompt with the processor")
        if count:
            pending.append((slots, encode, count))

    for name, value in {"pixel_values": pixel_values, "pixel_values_videos": pixel_values_videos}.items():
        if value is not None and vcfg is None:
            raise ValueError(f"{name} given, but this checkpoint has no vision tower (no vision_config)")
    if pixel_values is not None:
        pv, pos = check_patches("pixel_values", pixel_values, image_position_ids, vcfg, "image_position_ids")
        add(cfg.image_token_id, "images", vision_token_count(pos, vcfg),
            functools.partial(valid_soft_tokens, model, "vision", pv, pos))
    elif _count(ids, cfg.image_token_id):
        raise ValueError(f"input_ids hold {_count(ids, cfg.image_token_id)} image placeholder tokens but no "
                         "pixel_values were given")
    if pixel_values_videos is not None:
        pv, pos = check_patches("pixel_values_videos", pixel_values_videos, video_position_ids, vcfg,
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
    if pieces:
        slots = np.concatenate([s for s, _ in pieces]).astype(np.int32)
        soft = np.concatenate([t for _, t in pieces], axis=0)
    else:
        slots, soft = np.zeros((0,), np.int32), np.zeros((0, cfg.text.hidden_size), jnp.dtype(model.dtype))
    return MediaTokens(slots=slots, soft=soft), blocks
