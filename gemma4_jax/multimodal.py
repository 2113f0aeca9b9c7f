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

Running the towers of a loaded model and checking a forward's media inputs against the prompt is towers.py (the
model facade); the decoder with the merged embeddings is the one forward (forward.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma4_jax import audio as audio_lib
from gemma4_jax import vision as vision_lib
from gemma4_jax.config import ModelConfig
from gemma4_jax.decoder import Gemma4Text

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

        input_ids (B, T); slots (M,) flat indices into B*T of the placeholders (>= B*T: ignored); soft_tokens (M, D)
        in that order.
        Returns embeddings (B, T, D) and per-layer inputs (B, T, L, P) or None.
        """
        cfg = self.model_config
        placeholder = ((input_ids == cfg.image_token_id) | (input_ids == cfg.video_token_id)
                       | (input_ids == cfg.audio_token_id))
        ids = jnp.where(placeholder, cfg.text.pad_token_id, input_ids)
        x = self.embed_tokens(ids)
        b, t, d = x.shape
        # Slots past B * T are padding (serving's prefill steps carry one slot per token): dropped.
        x = x.reshape(b * t, d).at[slots].set(soft_tokens.astype(x.dtype), mode="drop").reshape(b, t, d)
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


# Names of the tower entry points on the module, by modality (towers.py and the pipeline's stage 0 call them).
TOWERS = {"vision": "vision_soft_tokens", "audio": "audio_soft_tokens"}
