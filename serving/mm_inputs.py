"""Media in the serving engine: requests with images, video and audio, from raw media to spliced soft tokens.

Flow of one request:
1. `MediaProcessor.process(prompt, multi_modal_data)` (LLM / server thread): media are decoded and checked against
   `ServingLimits`, the prompt's placeholders are expanded (processing.expand_prompt, HF's layout) and tokenized;
   the result is the prompt ids and a `MediaInputs` (tower inputs, placeholder positions).
2. `check_request` (Engine.add_request): placeholder counts against the media, and what the engine can serve.
3. The first time a prefill chunk of the request runs, `MediaInputs.encode` runs the towers once (one image, frame
   or clip per call, so the few jitted shapes are reused across requests) and keeps the soft tokens on the host
   with the request; a preempted request that is recomputed reuses them.
4. Every prefill chunk that holds placeholders runs `media_step` instead of the text step: the same step with the
   chunk's slice of soft tokens spliced into the embeddings (`Gemma4Multimodal.embed_multimodal`: placeholder ids
   become pad for the token and PLE lookups, as HF) and, when the config asks for it, bidirectional attention inside
   each image. Decode steps and chunks without placeholders never see media: the text path is unchanged.

Bidirectional vision attention (text_config.use_bidirectional_attention == "vision") needs each image's (or video
frame's) run of soft tokens inside one prefill chunk, since its first token attends to its last: the scheduler
ends a chunk before a run that does not fit (`clamp_chunk`), and a run longer than `max_num_batched_tokens` is
refused at admission.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import os
import wave
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from gemma4_jax import audio as audio_lib
from gemma4_jax import multimodal, processing, towers
from gemma4_jax.audio_processing import SAMPLING_RATE, AudioFeatureExtractor
from gemma4_jax.processing import MediaError, MediaLimits
from gemma4_jax.serving.kv_cache import bucket


@dataclasses.dataclass(frozen=True)
class ServingLimits(MediaLimits):
    """Per-request caps: the image/video ones of `MediaLimits` plus audio clips, their encoded size and length."""

    max_audios: int = 8
    max_audio_bytes: int = 16 * 1024 * 1024
    max_audio_seconds: float = 30.0


# ----------------------------------------------------------------------------------------------------------------
# Decoding media


def decode_data_url(url: str, what: str) -> bytes:
    """`data:[<mime>][;base64],<payload>` -> bytes. Other URLs (http, https, file) are refused: the server does not
    fetch remote or local media on a client's behalf."""
    if not isinstance(url, str):
        raise MediaError(f"{what}: the url must be a string")
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if ":" in url else "a plain path"
        raise MediaError(f"{what}: only data: URLs are accepted (got {scheme!r}); remote and file URLs are not "
                         "fetched. Send the bytes inline as data:<mime>;base64,<payload>")
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise MediaError(f"{what}: malformed data URL (no ',' after the header)")
    if header.endswith(";base64"):
        return decode_base64(payload, what)
    from urllib.parse import unquote_to_bytes

    return unquote_to_bytes(payload)


def decode_base64(data: str, what: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise MediaError(f"{what}: the data is not valid base64") from None


def decode_wav(data: bytes, what: str) -> tuple[np.ndarray, int]:
    """WAV bytes (PCM, 8/16/24/32-bit) -> (mono float32 samples in [-1, 1], sample rate). Channels are averaged."""
    try:
        with wave.open(io.BytesIO(data)) as w:
            channels, width, rate, frames = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            raw = w.readframes(frames)
    except (wave.Error, EOFError, ValueError) as e:
        raise MediaError(f"{what}: cannot decode the audio as WAV ({e}); send 16 kHz PCM WAV") from None
    if width == 1:  # unsigned 8-bit
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        samples = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        value = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        samples = (np.where(value >= 1 << 23, value - (1 << 24), value) / float(1 << 23)).astype(np.float32)
    elif width == 4:
        samples = (np.frombuffer(raw, "<i4").astype(np.float64) / 2.0**31).astype(np.float32)
    else:
        raise MediaError(f"{what}: {8 * width}-bit WAV samples are not supported")
    usable = samples.size - samples.size % channels
    return samples[:usable].reshape(-1, channels).mean(axis=1), rate


def load_audio(audio: Any, limits: ServingLimits = ServingLimits(), what: str = "audio") -> np.ndarray:
    """A WAV path or bytes, a 1-D float array at 16 kHz, or (array, sample_rate) -> mono float32 at 16 kHz.

    Another sample rate raises MediaError (resampling is the caller's choice, not ours)."""
    rate = SAMPLING_RATE
    if isinstance(audio, (str, os.PathLike)):
        audio = processing.read_media_file(audio, limits.max_audio_bytes, what, "audio")
    if isinstance(audio, (bytes, bytearray, memoryview)):
        if len(audio) > limits.max_audio_bytes:
            raise MediaError(f"{what}: {len(audio)} bytes, over the limit of {limits.max_audio_bytes}")
        samples, rate = decode_wav(bytes(audio), what)
    elif isinstance(audio, tuple) and len(audio) == 2:
        samples, rate = np.asarray(audio[0]), int(audio[1])
    elif isinstance(audio, np.ndarray) or isinstance(audio, list):
        samples = np.asarray(audio)
    else:
        raise MediaError(f"{what}: unsupported type {type(audio).__name__} (a WAV path or bytes, a float array at "
                         f"{SAMPLING_RATE} Hz, or (array, sample_rate))")
    if rate != SAMPLING_RATE:
        raise MediaError(f"{what}: sample rate {rate} Hz; the audio tower needs {SAMPLING_RATE} Hz, resample first")
    if samples.ndim != 1 or not (np.issubdtype(samples.dtype, np.floating) or np.issubdtype(samples.dtype, np.integer)):
        raise MediaError(f"{what}: expected mono samples (a 1-D real array), got {samples.dtype} {samples.shape}")
    if samples.size == 0:
        raise MediaError(f"{what}: the clip is empty")
    seconds = samples.size / SAMPLING_RATE
    if seconds > limits.max_audio_seconds:
        raise MediaError(f"{what}: {seconds:.1f} s of audio, over the limit of {limits.max_audio_seconds:g} s")
    samples = samples.astype(np.float32)
    if not np.isfinite(samples).all():
        raise MediaError(f"{what}: the clip contains NaN or infinite samples")
    return samples


# ----------------------------------------------------------------------------------------------------------------
# Chat messages: OpenAI / HF content parts -> template parts + media


MEDIA_PART_TYPES = frozenset({"image", "image_url", "input_image", "audio", "input_audio", "video"})


def has_media_parts(messages: Any) -> bool:
    """Whether any message has an image / audio / video content part (see `extract_chat_media`)."""
    return isinstance(messages, list) and any(
        isinstance(m, Mapping) and isinstance(m.get("content"), list)
        and any(isinstance(p, Mapping) and p.get("type") in MEDIA_PART_TYPES for p in m["content"])
        for m in messages)


def extract_chat_media(messages: Sequence[Mapping[str, Any]], allow_local: bool = True
                       ) -> tuple[list[dict], dict[str, list]]:
    """Pull the media out of chat messages, in order, leaving `{"type": "image"|"audio"|"video"}` parts for the
    chat template (which renders them as the placeholder tokens the processor expands).

    Parts: {"type": "image", "image": path|bytes|PIL|uint8 array}, {"type": "image_url", "image_url": {"url":
    "data:..."}} (or the url as a string), {"type": "audio", "audio": path|bytes|array|(array, rate)},
    {"type": "input_audio", "input_audio": {"data": base64, "format": "wav"}}, {"type": "video", "video": frames}.
    allow_local=False (the server) accepts only inline data: paths would read the server's files.
    Returns (messages for the template, {"image": [...], "audio": [...], "video": [...]} without empty kinds).
    """
    media: dict[str, list] = {"image": [], "audio": [], "video": []}
    out = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            what = f"message {i} content part {j}"
            if kind in ("image", "image_url", "input_image"):
                media["image"].append(_image_part(part, kind, what, allow_local))
                parts.append({"type": "image"})
            elif kind in ("audio", "input_audio"):
                media["audio"].append(_audio_part(part, kind, what, allow_local))
                parts.append({"type": "audio"})
            elif kind == "video":
                if not allow_local:
                    raise MediaError(f"{what}: video parts are not accepted by the server; send frames as images")
                media["video"].append(part.get("video"))
                parts.append({"type": "video"})
            else:
                parts.append(part)
        out.append({**message, "content": parts})
    return out, {k: v for k, v in media.items() if v}


def _image_part(part: Mapping, kind: str, what: str, allow_local: bool) -> Any:
    if kind == "image":
        value = part.get("image", part.get("url", part.get("path")))
        if value is None:
            raise MediaError(f"{what}: an image part needs an 'image' (path, bytes, PIL image or array)")
    else:
        value = part.get(kind)
        if isinstance(value, Mapping):
            value = value.get("url")
        if not isinstance(value, str):
            raise MediaError(f"{what}: an {kind} part needs {{'url': 'data:...'}}")
    if isinstance(value, str) and (value.startswith("data:") or not allow_local or kind != "image"):
        return decode_data_url(value, what)
    return value


def _audio_part(part: Mapping, kind: str, what: str, allow_local: bool) -> Any:
    if kind == "input_audio":
        spec = part.get("input_audio")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("data"), str):
            raise MediaError(f"{what}: an input_audio part needs {{'data': base64, 'format': 'wav'}}")
        fmt = str(spec.get("format", "wav")).lower()
        if fmt != "wav":
            raise MediaError(f"{what}: audio format {fmt!r} is not supported; send 16 kHz PCM WAV")
        return decode_base64(spec["data"], what)
    value = part.get("audio", part.get("url", part.get("path")))
    if value is None:
        raise MediaError(f"{what}: an audio part needs an 'audio' (WAV path or bytes, or 16 kHz samples)")
    if isinstance(value, str) and (value.startswith("data:") or not allow_local):
        return decode_data_url(value, what)
    return value


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
# Raw media + prompt -> ids + MediaInputs


class MediaProcessor:
    """The request-side processor of a multimodal model: images, videos and audio clips + a prompt -> prompt ids and
    `MediaInputs`. Patch size and pooling come from the model (they must match the tower); the soft-token budgets,
    frame sampling and mel settings from the checkpoint's processor config (HF's defaults without one)."""

    def __init__(self, model: Any, tokenizer: Any, path: str | os.PathLike | None = None):
        cfg = model.config
        if not multimodal.has_towers(cfg):
            raise ValueError("this model has no vision or audio tower: media inputs need a "
                             "Gemma4ForConditionalGeneration checkpoint")
        self.config = cfg
        self.tokenizer = tokenizer
        image, video, audio = processing.ImageProcessor(), processing.VideoProcessor(), AudioFeatureExtractor()
        if path is not None:
            image = processing.ImageProcessor.from_dir(path)
            video = processing.VideoProcessor.from_dir(path)
            audio = AudioFeatureExtractor.from_pretrained(path)
        self.audio = audio
        if cfg.vision is not None:
            tower = dict(patch_size=cfg.vision.patch_size, pooling_kernel_size=cfg.vision.pooling_kernel_size)
            image.patcher = processing.VisionPatcher(max_soft_tokens=image.patcher.max_soft_tokens, **tower)
            video.patcher = processing.VisionPatcher(max_soft_tokens=video.patcher.max_soft_tokens, **tower)
        self.image, self.video = image, video
        named = getattr(tokenizer, "template_tokens", {}) or {}
        self.tokens = {k: named.get(k, v) for k, v in processing._DEFAULT_TOKENS.items()}
        for name, token_id in (("image_token", cfg.image_token_id), ("video_token", cfg.video_token_id),
                               ("audio_token", cfg.audio_token_id)):
            found = tokenizer.token_to_id(self.tokens[name]) if tokenizer is not None else None
            if found is not None and found != token_id:
                raise ValueError(f"the tokenizer maps {self.tokens[name]!r} to id {found}, the model config says "
                                 f"{name}_id={token_id}")
        self.markers = {"image": (cfg.boi_token_id, cfg.image_token_id, cfg.eoi_token_id),
                        "video": (cfg.boi_token_id, cfg.video_token_id, cfg.eoi_token_id),
                        "audio": (cfg.boa_token_id, cfg.audio_token_id, cfg.eoa_token_id)}

    def process_chat(self, messages: Sequence[Mapping[str, Any]], limits: ServingLimits = ServingLimits(),
                     allow_local: bool = True, **template_kwargs: Any) -> tuple[list[int], MediaInputs | None]:
        """A chat with media parts (see `extract_chat_media`) -> prompt ids and MediaInputs. The chat template
        renders each media part as its placeholder token; the placeholders are then expanded as in `process`."""
        if self.tokenizer is None or not self.tokenizer.has_chat_template:
            raise ValueError("chat needs a tokenizer with a chat template")
        template_messages, data = extract_chat_media(messages, allow_local=allow_local)
        text = self.tokenizer.apply_chat_template(template_messages, **template_kwargs)
        return self.process(text, data, limits, chat=True)

    def process(self, prompt: str | Sequence[int], data: Mapping[str, Any] | None,
                limits: ServingLimits = ServingLimits(), add_special_tokens: bool = True, chat: bool = False
                ) -> tuple[list[int], MediaInputs | None]:
        """prompt: text with one `<|image|>` / `<|audio|>` / `<|video|>` per item, or token ids with one placeholder
        id per item (or already expanded). data: {"image": [...], "audio": [...], "video": [...]} (a single item
        is accepted for a list of one). Returns (prompt ids, MediaInputs or None when there are no media)."""
        data = dict(data or {})
        unknown = sorted(set(data) - {"image", "audio", "video"})
        if unknown:
            raise MediaError(f"multi_modal_data: unknown kind(s) {unknown}; use 'image', 'audio' and 'video'")
        items = {k: _as_list(data.get(k), k) for k in ("image", "audio", "video")}
        cfg = self.config
        if (items["image"] or items["video"]) and cfg.vision is None:
            raise MediaError("images or video given, but this model has no vision tower")
        if items["audio"] and cfg.audio is None:
            raise MediaError("audio given, but this model has no audio tower")
        inputs: dict[str, Any] = {}
        image_tokens: list[int] = []
        videos: list[tuple[int, list[float]]] = []
        audio_tokens: list[int] = []
        if items["image"]:
            if len(items["image"]) > limits.max_images:
                raise MediaError(f"{len(items['image'])} images, over the limit of {limits.max_images} per request")
            out = [self.image.patcher(processing.load_image(im, limits, what=f"image {i}"))
                   for i, im in enumerate(items["image"])]
            inputs["pixel_values"] = np.stack([o[0] for o in out])
            inputs["image_position_ids"] = np.stack([o[1] for o in out])
            image_tokens = [o[2] for o in out]
        if items["video"]:
            proc = processing.VideoProcessor(num_frames=self.video.num_frames,
                                             do_sample_frames=self.video.do_sample_frames, limits=limits)
            proc.patcher = self.video.patcher
            frames, fps = zip(*[_video_item(v) for v in items["video"]], strict=True)
            vid = proc(list(frames), fps=list(fps))
            inputs["pixel_values_videos"] = vid["pixel_values_videos"]
            inputs["video_position_ids"] = vid["video_position_ids"]
            videos = list(zip(vid["num_soft_tokens_per_video"], vid["timestamps"], strict=True))
        if items["audio"]:
            if len(items["audio"]) > limits.max_audios:
                raise MediaError(f"{len(items['audio'])} audio clips, over the limit of {limits.max_audios} per "
                                 "request")
            clips = [load_audio(a, limits, what=f"audio {i}") for i, a in enumerate(items["audio"])]
            try:
                feats, mask = self.audio(clips)
            except ValueError as e:
                raise MediaError(str(e)) from None
            inputs["input_features"], inputs["input_features_mask"] = feats, mask
            audio_tokens = [int(n) for n in mask[:, ::2][:, ::2].sum(-1)]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids")
            text = processing.expand_prompt(prompt, image_tokens, videos, audio_tokens, tokens=self.tokens)
            if chat:  # a rendered chat writes its own BOS: encode as Tokenizer.encode_chat does
                ids = list(self.tokenizer.encode(text, add_special_tokens=False))
                if self.tokenizer.add_bos_token:
                    ids = self.tokenizer._fix_bos(ids)
            else:
                ids = list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        else:
            ids = self._expand_ids([int(t) for t in prompt], image_tokens, videos, audio_tokens)
        if not inputs:
            return ids, None
        return ids, build_media(cfg, ids, **inputs)

    def _expand_ids(self, ids: list[int], image_tokens: list[int], videos: list, audio_tokens: list[int]) -> list[int]:
        """Token-id prompts: one placeholder id per image / clip / video is expanded (HF's layout; a video's frames
        get no timestamp text here), a prompt whose placeholders are already expanded is kept as is."""
        per_kind = {"image": [[n] for n in image_tokens], "video": [[n] * len(ts) for n, ts in videos],
                    "audio": [[n] for n in audio_tokens]}
        expand = {}
        for kind, blocks in per_kind.items():
            token_id = self.markers[kind][1]
            found = ids.count(token_id)
            if found == len(blocks):
                expand[token_id] = iter(blocks)
            elif found != sum(sum(b) for b in blocks):
                raise MediaError(f"the prompt holds {found} {kind} placeholder ids ({token_id}) for {len(blocks)} "
                                 f"{kind} input(s): put one per input, or the expanded count")
        if not expand:
            return ids
        out: list[int] = []
        for t in ids:
            if t in expand:
                kind = next(k for k in self.markers if self.markers[k][1] == t)
                begin, token, end = self.markers[kind]
                out += [x for n in next(expand[t]) for x in (begin, *[token] * n, end)]
            else:
                out.append(t)
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
