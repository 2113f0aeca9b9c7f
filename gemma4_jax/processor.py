"""The processor of a Gemma 4 model: a prompt with images, videos and audio clips -> prompt ids and the towers'
inputs, as HF's `Gemma4Processor` lays them out.

`Processor` is the one processor every caller uses: `Model.logits` users (`__call__`, HF's output names) and the
serving layer (serving/mm_inputs.py renders chats, tokenizes a request's prompt and builds the engine's media from
`ProcessedMedia`). It owns
- the image and video processors (processing.py) and the audio feature extractor (audio_processing.py), set from the
  checkpoint's processor config (HF's defaults without one); given the model's config, the patch size and pooling
  are the vision tower's, since the patches must fit the tower;
- the placeholder expansion of a text prompt (`expand_text`, processing.expand_prompt) or of token ids
  (`expand_ids`): the token strings come from the tokenizer, the ids from the model config (or the tokenizer).
Media are decoded and checked against the request's `MediaLimits`; bad media raise MediaError.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gemma4_jax.audio import num_soft_tokens as audio_soft_tokens
from gemma4_jax.audio_processing import AudioFeatureExtractor, load_audio
from gemma4_jax.processing import (
    DEFAULT_TOKENS,
    ImageProcessor,
    MediaError,
    MediaLimits,
    VideoProcessor,
    VisionPatcher,
    expand_prompt,
    mm_token_type_ids,
)

if TYPE_CHECKING:
    from gemma4_jax.config import ModelConfig

MEDIA_KINDS = ("image", "audio", "video")  # the keys of multi_modal_data
# Per kind, the template names of (begin marker, placeholder, end marker).
_MARKERS = {"image": ("boi_token", "image_token", "eoi_token"), "video": ("boi_token", "video_token", "eoi_token"),
            "audio": ("boa_token", "audio_token", "eoa_token")}


@dataclasses.dataclass
class ProcessedMedia:
    """A request's media as the towers' inputs, and the soft tokens each item takes in the prompt.

    inputs: HF's names, only for the kinds given: pixel_values (N, P, 3*p*p) float32 + image_position_ids (N, P, 2)
      int64; pixel_values_videos (F, P, 3*p*p) + video_position_ids (F, P, 2), the frames of all videos on one axis;
      input_features (A, T, n_mels) float32 + input_features_mask (A, T) bool.
    image_tokens: soft tokens per image (N,); videos: per video (soft tokens per frame, frame timestamps in
      seconds); audio_tokens: soft tokens per clip (A,).
    """

    inputs: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    image_tokens: list[int] = dataclasses.field(default_factory=list)
    videos: list[tuple[int, list[float]]] = dataclasses.field(default_factory=list)
    audio_tokens: list[int] = dataclasses.field(default_factory=list)


class Processor:
    """Prompt + media -> the model's inputs.

    tokenizer: anything with `encode(text, add_special_tokens)` and `token_to_id(token)`, and optionally
      `template_tokens` naming the media token strings (serving.tokenizer.Tokenizer); text prompts need one.
    config: the model's ModelConfig. With it the placeholder ids are the config's (a tokenizer that maps a media
      token elsewhere is refused) and media the model has no tower for are refused; without it the ids are the
      tokenizer's.
    """

    def __init__(self, tokenizer: Any = None, image_processor: ImageProcessor | None = None,
                 video_processor: VideoProcessor | None = None, audio_extractor: AudioFeatureExtractor | None = None,
                 config: ModelConfig | None = None):
        self.tokenizer = tokenizer
        self.config = config
        self.image_processor = image_processor or ImageProcessor()
        self.video_processor = video_processor or VideoProcessor()
        self.audio_extractor = audio_extractor or AudioFeatureExtractor()
        named = getattr(tokenizer, "template_tokens", {}) or {}
        self.tokens = {k: named.get(k, v) for k, v in DEFAULT_TOKENS.items()}
        self.ids = self._token_ids()

    @classmethod
    def from_dir(cls, path: str | os.PathLike | None, tokenizer: Any = None,
                 config: ModelConfig | None = None) -> Processor:
        """The processors of a checkpoint dir (processor_config.json or preprocessor_config.json; HF's defaults
        when `path` is None or holds neither). With `config`, patch size and pooling are the vision tower's: the
        processor config only chooses the soft-token budgets, frame sampling and mel settings."""
        if path is None:
            image, video, audio = ImageProcessor(), VideoProcessor(), AudioFeatureExtractor()
        else:
            image, video = ImageProcessor.from_dir(path), VideoProcessor.from_dir(path)
            audio = AudioFeatureExtractor.from_pretrained(path)
        if config is not None and config.vision is not None:
            tower = dict(patch_size=config.vision.patch_size, pooling_kernel_size=config.vision.pooling_kernel_size)
            image.patcher = VisionPatcher(max_soft_tokens=image.patcher.max_soft_tokens, **tower)
            video.patcher = VisionPatcher(max_soft_tokens=video.patcher.max_soft_tokens, **tower)
        return cls(tokenizer, image, video, audio, config)

    def _token_ids(self) -> dict[str, int | None]:
        """The id of each media token by template name (image_token, boi_token, ...)."""
        placeholders = ("image_token", "video_token", "audio_token")
        cfg = self.config
        if cfg is None:
            if self.tokenizer is None:
                raise ValueError("a processor needs the model's config or a tokenizer (for the media token ids)")
            ids = {name: self.tokenizer.token_to_id(token) for name, token in self.tokens.items()}
            for name in placeholders:
                if ids[name] is None:
                    raise ValueError(f"the tokenizer has no {name} {self.tokens[name]!r}")
            return ids
        ids = {"image_token": cfg.image_token_id, "boi_token": cfg.boi_token_id, "eoi_token": cfg.eoi_token_id,
               "video_token": cfg.video_token_id, "audio_token": cfg.audio_token_id,
               "boa_token": cfg.boa_token_id, "eoa_token": cfg.eoa_token_id}
        for name in placeholders:
            found = self.tokenizer.token_to_id(self.tokens[name]) if self.tokenizer is not None else None
            if found is not None and found != ids[name]:
                raise ValueError(f"the tokenizer maps {self.tokens[name]!r} to id {found}, the model config says "
                                 f"{name}_id={ids[name]}")
        return ids

    # ------------------------------------------------------------------------------------------------------------
    # Media

    def media(self, data: Mapping[str, Any] | None, limits: MediaLimits | None = None) -> ProcessedMedia:
        """multi_modal_data (vLLM's form) -> ProcessedMedia. data: {"image": [...], "audio": [...], "video": [...]}
        (a single item is accepted for a list of one). Images: paths, encoded bytes, PIL images or uint8 arrays;
        audio: WAV paths or bytes, float arrays at 16 kHz or (array, rate); video: frames (a list of images or an
        (F, H, W, 3) uint8 array) or {"frames": ..., "fps": ...}. limits: this request's caps (default: the image and
        video processors' own, MediaLimits() for audio)."""
        data = dict(data or {})
        unknown = sorted(set(data) - set(MEDIA_KINDS))
        if unknown:
            raise MediaError(f"multi_modal_data: unknown kind(s) {unknown}; use 'image', 'audio' and 'video'")
        items = {k: _as_list(data.get(k), k) for k in MEDIA_KINDS}
        self._check_towers(bool(items["image"] or items["video"]), bool(items["audio"]))
        media = ProcessedMedia()
        if items["image"]:
            self._add_images(media, items["image"], limits)
        if items["video"]:
            frames, fps = zip(*[_video_item(v) for v in items["video"]], strict=True)
            self._add_videos(media, list(frames), list(fps), limits)
        if items["audio"]:
            self._add_audio(media, items["audio"], limits)
        return media

    def _check_towers(self, vision: bool, audio: bool) -> None:
        if self.config is None:
            return
        if vision and self.config.vision is None:
            raise MediaError("images or video given, but this model has no vision tower")
        if audio and self.config.audio is None:
            raise MediaError("audio given, but this model has no audio tower")

    def _add_images(self, media: ProcessedMedia, images: Any, limits: MediaLimits | None) -> None:
        out = self.image_processor(images, limits)
        media.inputs.update(pixel_values=out["pixel_values"], image_position_ids=out["image_position_ids"])
        media.image_tokens = list(out["num_soft_tokens_per_image"])

    def _add_videos(self, media: ProcessedMedia, videos: Any, fps: Any, limits: MediaLimits | None) -> None:
        out = self.video_processor(videos, fps=fps, limits=limits)
        media.inputs.update(pixel_values_videos=out["pixel_values_videos"],
                            video_position_ids=out["video_position_ids"])
        media.videos = list(zip(out["num_soft_tokens_per_video"], out["timestamps"], strict=True))

    def _add_audio(self, media: ProcessedMedia, clips: list, limits: MediaLimits | None) -> None:
        limits = limits or MediaLimits()
        if len(clips) > limits.max_audios:
            raise MediaError(f"{len(clips)} audio clips, over the limit of {limits.max_audios} per request")
        waveforms = [load_audio(a, limits, what=f"audio {i}") for i, a in enumerate(clips)]
        try:
            features, mask = self.audio_extractor(waveforms)
        except ValueError as e:
            raise MediaError(str(e)) from None
        media.inputs.update(input_features=features, input_features_mask=mask)
        media.audio_tokens = [int(n) for n in audio_soft_tokens(mask)]

    # ------------------------------------------------------------------------------------------------------------
    # Prompts

    def expand_text(self, text: str, media: ProcessedMedia) -> str:
        """A text prompt with one `<|image|>` / `<|video|>` / `<|audio|>` per item -> its placeholders expanded
        (HF's layout, processing.expand_prompt)."""
        return expand_prompt(text, media.image_tokens, media.videos, media.audio_tokens, tokens=self.tokens)

    def expand_ids(self, ids: Sequence[int], media: ProcessedMedia) -> list[int]:
        """Token ids with one placeholder id per image / video / clip -> expanded as `expand_text` would (a video's
        frames get no timestamp text here); a prompt whose placeholders are already expanded is kept as is."""
        ids = [int(t) for t in ids]
        per_kind = {"image": [[n] for n in media.image_tokens], "video": [[n] * len(ts) for n, ts in media.videos],
                    "audio": [[n] for n in media.audio_tokens]}
        expand = {}
        for kind, blocks in per_kind.items():
            token_id = self.ids[_MARKERS[kind][1]]
            found = ids.count(token_id)
            if found == len(blocks):
                expand[token_id] = (kind, iter(blocks))
            elif found != sum(sum(b) for b in blocks):
                raise MediaError(f"the prompt holds {found} {kind} placeholder ids ({token_id}) for {len(blocks)} "
                                 f"{kind} input(s): put one per input, or the expanded count")
        if not expand:
            return ids
        out: list[int] = []
        for t in ids:
            if t not in expand:
                out.append(t)
                continue
            kind, blocks = expand[t]
            begin, token, end = (self._marker_id(name) for name in _MARKERS[kind])
            out += [x for n in next(blocks) for x in (begin, *[token] * n, end)]
        return out

    def _marker_id(self, name: str) -> int:
        token_id = self.ids[name]
        if token_id is None:
            raise ValueError(f"the tokenizer has no {name} {self.tokens[name]!r}")
        return token_id

    def __call__(self, text: str, images: Any = None, videos: Any = None, video_fps: Any = None, audio: Any = None,
                 add_special_tokens: bool = True) -> dict[str, Any]:
        """HF's call: -> {"input_ids": (1, T) int64, "mm_token_type_ids": (1, T), "text": the expanded prompt} plus
        the `ProcessedMedia.inputs` of the kinds given and "num_frames_per_video" with videos: the names
        `Model.logits` takes. Images and videos are checked against their processors' own limits, audio against
        MediaLimits()."""
        if self.tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer")
        self._check_towers(images is not None or videos is not None, audio is not None)
        media = ProcessedMedia()
        if images is not None:
            self._add_images(media, images, None)
        if videos is not None:
            self._add_videos(media, videos, video_fps, None)
        if audio is not None:
            self._add_audio(media, _as_list(audio, "audio"), None)
        expanded = self.expand_text(text, media)
        ids = np.asarray([self.tokenizer.encode(expanded, add_special_tokens=add_special_tokens)], np.int64)
        out: dict[str, Any] = dict(media.inputs)
        if videos is not None:
            out["num_frames_per_video"] = [len(timestamps) for _, timestamps in media.videos]
        out["input_ids"] = ids
        out["mm_token_type_ids"] = mm_token_type_ids(ids, self.ids["image_token"], self.ids["video_token"],
                                                     self.ids["audio_token"])
        out["text"] = expanded
        return out


def _as_list(value: Any, kind: str) -> list:
    if value is None:
        return []
    if isinstance(value, list):
        return value
    if kind == "video" and isinstance(value, (tuple, dict)):
        return [value]
    if kind == "audio" and isinstance(value, tuple) and len(value) == 2 and np.ndim(value[1]) == 0:
        return [value]  # one (samples, rate) pair
    if isinstance(value, tuple):
        return list(value)
    return [value]


def _video_item(video: Any) -> tuple[Any, float | None]:
    """A video: frames (list of images or an (F, H, W, 3) array), or {"frames": ..., "fps": ...}."""
    if isinstance(video, Mapping):
        if "frames" not in video:
            raise MediaError("a video given as a dict needs 'frames' (and optionally 'fps')")
        return video["frames"], video.get("fps")
    return video, None
