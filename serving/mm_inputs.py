"""A request's media for the engine: `MediaProcessor` turns a prompt (text, token ids or a chat) with images, video
and audio into prompt ids and a `MediaInputs`, which the engine carries with the request.

Flow of one request:
1. `MediaProcessor.process(prompt, multi_modal_data)` (LLM / server worker thread): the model's `Processor`
   (gemma4_jax/processor.py) decodes the media, checks them against the request's `MediaLimits` and expands the
   prompt's placeholders (HF's layout); this adapter renders a chat (media parts pulled out by
   serving/media_decode.py), tokenizes a text prompt as the serving tokenizer does, and `build_media` turns the
   towers' inputs into a `MediaInputs` (tower inputs, placeholder positions and kinds, vision blocks). A chat
   (`process_chat`) can be checked against the context first: the soft tokens of encoded images are known from
   their headers, so a prompt that cannot fit raises `PromptTooLong` before any image is decoded.
2. The engine (serving/media_chunks.py) checks the request against the media, keeps bidirectional vision blocks
   inside one prefill chunk, and the first time a chunk of the request runs calls `MediaInputs.encode`: the towers
   run once (one image, frame or clip per call, so the few jitted shapes are reused across requests) and the soft
   tokens stay on the host with the request; a preempted request that is recomputed reuses them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from gemma4_jax import audio as audio_lib
from gemma4_jax import multimodal, towers
from gemma4_jax.processing import MediaError, MediaLimits, probe_image
from gemma4_jax.processor import Processor
from gemma4_jax.serving.kv_cache import bucket
from gemma4_jax.serving.media_decode import extract_chat_media

# The server's name for the per-request caps (ServerConfig.media_limits): images, video frames and audio clips.
ServingLimits = MediaLimits


class PromptTooLong(ValueError):
    """A chat's prompt needs at least `num_tokens` tokens (its images counted from their headers), over `limit`."""

    def __init__(self, num_tokens: int, limit: int):
        super().__init__(f"the prompt needs at least {num_tokens} tokens, over the limit of {limit}")
        self.num_tokens = num_tokens
        self.limit = limit


# ----------------------------------------------------------------------------------------------------------------
# A request's media


@dataclasses.dataclass(eq=False)
class MediaInputs:
    """The media of one request, in prompt order. Shapes: M placeholders, L prompt tokens, D text width.

    positions: (M,) prompt positions of the placeholder tokens, ascending.
    kinds: (M,) placeholder kind per position (multimodal.IMAGE_TYPE / VIDEO_TYPE / AUDIO_TYPE).
    frames: per image or video frame, in prompt order of its kind: (pixel_values (1, P, patch_dim), positions
      (1, P, 2), kind); audio: (input_features (A, T, F), input_features_mask (A, T)) or None.
    blocks: (L,) vision block id per prompt position (-1 elsewhere) when the model wants bidirectional attention
      inside images, else None; runs: (R, 2) [start, end) prompt positions of those blocks.
    soft: (M, D) soft tokens aligned with `positions`, filled by `encode` (None before).
    """

    positions: np.ndarray
    kinds: np.ndarray
    frames: list[tuple[np.ndarray, np.ndarray, int]]
    audio: tuple[np.ndarray, np.ndarray] | None
    blocks: np.ndarray | None
    runs: np.ndarray
    soft: np.ndarray | None = None

    @property
    def num_soft_tokens(self) -> int:
        return int(self.positions.size)

    def encode(self, model: Any) -> np.ndarray:
        """Run the towers once (cached): soft tokens (M, D) in prompt order, on the host in the model dtype."""
        if self.soft is not None:
            return self.soft
        d = model.config.text.hidden_size
        soft = np.zeros((self.num_soft_tokens, d), jnp.dtype(model.dtype))
        for kind in (multimodal.IMAGE_TYPE, multimodal.VIDEO_TYPE):
            pieces = [_vision_tokens(model, pv, pos) for pv, pos, k in self.frames if k == kind]
            if pieces:
                soft[self.kinds == kind] = np.concatenate(pieces)
        if self.audio is not None:
            soft[self.kinds == multimodal.AUDIO_TYPE] = np.concatenate(
                [_audio_tokens(model, f[None], m[None]) for f, m in zip(*self.audio, strict=True)])
        self.soft = soft
        self.frames, self.audio = [], None  # the tower inputs are no longer needed
        return soft


def _vision_tokens(model, pixel_values: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """One image / frame -> its valid soft tokens (n, D). Shapes are fixed by the processor's patch budget."""
    return towers.valid_soft_tokens(model, "vision", pixel_values, positions)


def _audio_tokens(model, features: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """One clip (1, T, F) -> its valid soft tokens. T is padded to a power of two (masked frames do not change the
    valid tokens), so clips of similar length share a compiled tower."""
    t = bucket(features.shape[1], 64)
    f = np.zeros((1, t, features.shape[2]), np.float32)
    m = np.zeros((1, t), bool)
    f[:, : features.shape[1]] = features
    m[:, : mask.shape[1]] = mask
    return towers.valid_soft_tokens(model, "audio", f, m)


def _patches(cfg, name: str, pixel_values: Any, position_ids: Any, pos_name: str):
    try:
        return towers.check_patches(name, pixel_values, position_ids, cfg.vision, pos_name)
    except ValueError as e:
        raise MediaError(str(e)) from None


def build_media(cfg, prompt_ids: Sequence[int], *, pixel_values: Any = None, image_position_ids: Any = None,
                pixel_values_videos: Any = None, video_position_ids: Any = None, input_features: Any = None,
                input_features_mask: Any = None) -> MediaInputs:
    """Processor outputs (the HF names, as `Model.logits` takes them) + the expanded prompt -> MediaInputs.
    Checks that each kind's soft-token count equals its placeholders in the prompt."""
    ids = np.asarray(prompt_ids)
    frames: list[tuple[np.ndarray, np.ndarray, int]] = []
    if (pixel_values is not None or pixel_values_videos is not None) and cfg.vision is None:
        raise MediaError("images or video given, but this model has no vision tower")
    if input_features is not None and getattr(cfg, "audio", None) is None:
        raise MediaError("audio given, but this model has no audio tower")
    counts = {}
    for kind, pv, pos, names in ((multimodal.IMAGE_TYPE, pixel_values, image_position_ids,
                                  ("pixel_values", "image_position_ids")),
                                 (multimodal.VIDEO_TYPE, pixel_values_videos, video_position_ids,
                                  ("pixel_values_videos", "video_position_ids"))):
        if pv is None:
            continue
        pv, pos = _patches(cfg, names[0], pv, pos, names[1])
        frames += [(pv[i: i + 1], pos[i: i + 1], kind) for i in range(pv.shape[0])]
        counts[kind] = towers.vision_token_count(pos, cfg.vision)
    audio = None
    if input_features is not None:
        try:
            feats, mask = towers.audio_inputs(input_features, input_features_mask)
        except ValueError as e:
            raise MediaError(str(e)) from None
        audio = (feats, mask)
        counts[multimodal.AUDIO_TYPE] = int(audio_lib.num_soft_tokens(mask).sum())
    token_ids = {multimodal.IMAGE_TYPE: cfg.image_token_id, multimodal.VIDEO_TYPE: cfg.video_token_id,
                 multimodal.AUDIO_TYPE: cfg.audio_token_id}
    names = {multimodal.IMAGE_TYPE: "image", multimodal.VIDEO_TYPE: "video", multimodal.AUDIO_TYPE: "audio"}
    kinds = np.zeros(ids.shape, np.int32)
    for kind, token_id in token_ids.items():
        found = int(np.count_nonzero(ids == token_id))
        if found != counts.get(kind, 0):
            raise MediaError(f"{names[kind]}: the media give {counts.get(kind, 0)} soft tokens but the prompt holds "
                             f"{found} placeholder tokens (id {token_id}); expand the prompt with the processor")
        kinds[ids == token_id] = kind
    positions = np.flatnonzero(kinds).astype(np.int32)
    blocks, runs = None, np.zeros((0, 2), np.int32)
    if cfg.vision_bidirectional:
        blocks = multimodal.vision_block_ids(kinds[None])[0]
        if positions.size:
            starts = np.flatnonzero((blocks >= 0) & (np.diff(blocks, prepend=-1) != 0))
            ends = np.flatnonzero((blocks >= 0) & (np.diff(blocks, append=-1) != 0)) + 1
            runs = np.stack([starts, ends], axis=1).astype(np.int32)
    return MediaInputs(positions, kinds[positions], frames, audio, blocks, runs)


# ----------------------------------------------------------------------------------------------------------------
# Prompt + raw media -> ids + MediaInputs


class MediaProcessor:
    """The request side of a multimodal model: images, videos and audio clips + a prompt (text, token ids or a chat)
    -> prompt ids and `MediaInputs`. The model's `Processor` (patch size and pooling from the tower, soft-token
    budgets, frame sampling and mel settings from the checkpoint's processor config) does the media and the
    placeholder expansion; this adapter renders chats and tokenizes text with the serving tokenizer."""

    def __init__(self, model: Any, tokenizer: Any, path: str | os.PathLike | None = None):
        cfg = model.config
        if not multimodal.has_towers(cfg):
            raise ValueError("this model has no vision or audio tower: media inputs need a "
                             "Gemma4ForConditionalGeneration checkpoint")
        self.config = cfg
        self.tokenizer = tokenizer
        self.processor = Processor.from_dir(path, tokenizer, cfg)

    def process_chat(self, messages: Sequence[Mapping[str, Any]], limits: MediaLimits | None = None,
                     allow_local: bool = True, *, split_special_tokens: bool = False,
                     max_prompt_tokens: int | None = None, **template_kwargs: Any
                     ) -> tuple[list[int], MediaInputs | None]:
        """A chat with media parts (see `media_decode.extract_chat_media`) -> prompt ids and MediaInputs. The chat
        template renders each media part as its placeholder token; the placeholders are then expanded as in
        `process`.

        split_special_tokens: special-token strings in the messages are plain text (`Tokenizer.encode_chat`), so a
          typed `<|image|>` is text, not a placeholder. max_prompt_tokens: raise `PromptTooLong` when the prompt
          cannot fit, judged before any image is decoded (text tokens + each image's soft tokens from its header).
        """
        if self.tokenizer is None or not self.tokenizer.has_chat_template:
            raise ValueError("chat needs a tokenizer with a chat template")
        template_messages, data = extract_chat_media(messages, allow_local=allow_local)
        if split_special_tokens:
            template_messages, template_kwargs = self.tokenizer.hide_special_text((template_messages, template_kwargs))
        text = self.tokenizer.apply_chat_template(template_messages, **template_kwargs)
        if max_prompt_tokens is not None:
            self._check_length(text, data, limits or MediaLimits(), max_prompt_tokens)
        return self.process(text, data, limits, chat=True)

    def _check_length(self, text: str, data: Mapping[str, Any], limits: MediaLimits, limit: int) -> None:
        """Raise PromptTooLong when the rendered chat `text` (one placeholder per item) needs more than `limit`
        tokens once its encoded images are expanded; sizes come from the image headers (a lower bound for the
        other media, which are not counted)."""
        num_tokens = len(self.tokenizer.encode_chat_text(text))
        images = data.get("image", [])
        if not isinstance(images, list) or len(images) > limits.max_images:
            return  # the processor names the problem
        patcher = self.processor.image_processor.patcher
        for i, image in enumerate(images):
            if isinstance(image, bytes | bytearray | memoryview):
                height, width = probe_image(image, limits, what=f"image {i}")
                # the placeholder becomes <boi> + soft tokens + <eoi>
                num_tokens += patcher.num_soft_tokens(height, width) + 1
        if num_tokens > limit:
            raise PromptTooLong(num_tokens, limit)

    def process(self, prompt: str | Sequence[int], data: Mapping[str, Any] | None,
                limits: MediaLimits | None = None, add_special_tokens: bool = True, chat: bool = False
                ) -> tuple[list[int], MediaInputs | None]:
        """prompt: text with one `<|image|>` / `<|audio|>` / `<|video|>` per item, or token ids with one placeholder
        id per item (or already expanded). data: {"image": [...], "audio": [...], "video": [...]} (a single item
        is accepted for a list of one). limits: the request's caps (default MediaLimits()). Returns (prompt ids,
        MediaInputs or None when there are no media)."""
        media = self.processor.media(data, limits)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids")
            text = self.processor.expand_text(prompt, media)
            if chat:  # a rendered chat writes its own BOS: encode as Tokenizer.encode_chat does
                ids = list(self.tokenizer.encode_chat_text(text))
            else:
                ids = list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        else:
            ids = self.processor.expand_ids(prompt, media)
        if not media.inputs:
            return ids, None
        return ids, build_media(self.config, ids, **media.inputs)
