"""Images and videos -> the vision tower's inputs, and prompts -> token ids with the right placeholders.

No torch: Pillow decodes and resizes, numpy does the rest. Outputs equal HF's `Gemma4ImageProcessorPil` (and the
prompt expansion of `Gemma4Processor`):
- an image is converted to RGB (transparency composited onto white), resized with bicubic filtering to the largest
  size that keeps its aspect ratio, fits `max_soft_tokens * pooling_kernel_size**2` patches and has sides that are
  multiples of `pooling_kernel_size * patch_size`; pixels are only divided by 255 (the model maps them to [-1, 1]);
- patches are laid out (row in patch, column in patch, channel), rows of the patch grid first; positions are
  (x, y) = (column, row); every image is padded to the full patch budget with zero patches at position (-1, -1);
- soft tokens per image = real patches / pooling_kernel_size**2;
- the prompt's image token becomes  <boi> + image_token * soft tokens + <eoi>; a video token becomes, per sampled
  frame, "mm:ss <boi> + video_token * soft tokens + <eoi>", joined by spaces (timestamps = frame index / fps);
- mm_token_type_ids: 1 on image placeholders, 2 on video placeholders, 3 on audio placeholders, else 0.
Videos are given as decoded frames (an (F, H, W, 3) uint8 array or a list of images) plus optional fps; frames are
sampled uniformly (`num_frames`, HF's default indices). HF resizes video frames with torchvision, we with Pillow:
the two bicubic filters can differ by one grey level on a few pixels.

Bad media raise `MediaError` (a ValueError) naming the problem: undecodable bytes, a format outside the allow-list
(`MediaLimits.image_formats`: PNG, JPEG, WebP, GIF, BMP; never PostScript, which Pillow hands to Ghostscript), a
zero-sized image, too many images or frames, too many pixels or bytes. Encoded images are checked from their header
(`probe_image`: format, size, pixels) before any pixel is decoded. `MediaLimits` holds every per-request cap, the
audio ones included (audio_processing.load_audio checks those). The one processor of a model, which owns these
processors and the prompt expansion below, is `processor.Processor`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN = "<|image|>", "<|image>", "<image|>"
VIDEO_TOKEN = "<|video|>"
AUDIO_TOKEN, BOA_TOKEN, EOA_TOKEN = "<|audio|>", "<|audio>", "<audio|>"
# The media token strings by their chat-template names (a tokenizer's `template_tokens` may rename them).
DEFAULT_TOKENS = {"image_token": IMAGE_TOKEN, "boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN,
                  "video_token": VIDEO_TOKEN, "audio_token": AUDIO_TOKEN, "boa_token": BOA_TOKEN,
                  "eoa_token": EOA_TOKEN}


class MediaError(ValueError):
    """An image, video or audio clip that cannot be used (corrupt, empty, too large, too many)."""


# Formats Pillow may open from encoded bytes or files. Common, well-fuzzed decoders only: no EPS / PS (Ghostscript
# runs on the data where it is installed), no TIFF, PSD, ICNS and the long tail of rarely used plugins.
SAFE_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


@dataclasses.dataclass(frozen=True)
class MediaLimits:
    """Caps per request. Pixels are counted before resizing, from the image header (nothing is decoded past
    max_image_pixels); image_formats are the Pillow format names accepted for encoded images."""

    max_images: int = 16
    max_image_pixels: int = 50_000_000
    max_image_bytes: int = 32 * 1024 * 1024
    image_formats: tuple[str, ...] = SAFE_IMAGE_FORMATS
    max_videos: int = 2
    max_frames: int = 64
    max_audios: int = 8
    max_audio_bytes: int = 16 * 1024 * 1024
    max_audio_seconds: float = 30.0


# ----------------------------------------------------------------------------------------------------------------
# Decoding


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - Pillow is a dependency of the multimodal path
        raise ImportError("image input needs Pillow: pip install pillow") from e
    return Image


def _rgb_from_pil(img: Any) -> np.ndarray:
    """PIL image -> (H, W, 3) uint8, transparency composited onto white (HF `convert_to_rgb`)."""
    image_mod = _pil()
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = image_mod.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = image_mod.alpha_composite(background, rgba)
    return np.array(img.convert("RGB"))


def _rgb_from_array(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise MediaError(f"{what}: arrays must be uint8 (H, W, C) with values 0..255, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise MediaError(f"{what}: expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array, got {arr.shape}")
    if arr.shape[-1] == 1:
        return np.repeat(arr, 3, axis=-1)
    if arr.shape[-1] == 4:
        alpha = arr[..., 3:4] / 255
        return np.round(alpha * arr[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return arr


def read_media_file(path: Any, max_bytes: int, what: str, kind: str) -> bytes:
    """The bytes of a local media file, refusing a missing file or one over `max_bytes` (checked before reading)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MediaError(f"{what}: no {kind} file at {path!r}")
    size = os.path.getsize(path)
    if size > max_bytes:
        raise MediaError(f"{what}: {path!r} is {size} bytes, over the limit of {max_bytes}")
    with open(path, "rb") as f:
        return f.read()


def _pil_reason(e: Exception) -> str:
    # Pillow's text may name the BytesIO object with its heap address ("cannot identify image file <_io.BytesIO
    # object at 0x7f...>"): then only the exception type is passed on.
    text = str(e)
    return type(e).__name__ if not text or " at 0x" in text else f"{type(e).__name__}: {text}"


def _open_image(data: bytes, limits: MediaLimits, what: str) -> Any:
    """Encoded bytes -> a PIL image whose header is read and checked (bytes, format, pixels); nothing decoded yet."""
    if len(data) > limits.max_image_bytes:
        raise MediaError(f"{what}: {len(data)} bytes, over the limit of {limits.max_image_bytes}")
    image_mod = _pil()
    try:
        # formats=: Pillow tries only these decoders, so nothing else ever parses client bytes.
        img = image_mod.open(io.BytesIO(data), formats=list(limits.image_formats))
    except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError...
        raise MediaError(f"{what}: cannot decode the image data ({_pil_reason(e)}); accepted formats: "
                         f"{', '.join(limits.image_formats)}") from None
    if img.width * img.height > limits.max_image_pixels:
        raise MediaError(f"{what}: {img.width}x{img.height} pixels, over the limit of {limits.max_image_pixels}")
    return img


def probe_image(data: bytes, limits: MediaLimits = MediaLimits(), what: str = "image") -> tuple[int, int]:
    """Encoded image bytes -> (height, width) from the header alone, after the checks `load_image` makes before
    decoding (bytes, format allow-list, pixels). Cheap: no pixel is decoded."""
    img = _open_image(bytes(data), limits, what)
    return img.height, img.width


def load_image(image: Any, limits: MediaLimits = MediaLimits(), what: str = "image") -> np.ndarray:
    """A file path, encoded bytes, a PIL image or a uint8 array -> (H, W, 3) uint8 RGB."""
    if isinstance(image, (str, os.PathLike)):
        image = read_media_file(image, limits.max_image_bytes, what, "image")
    if isinstance(image, (bytes, bytearray, memoryview)):
        img = _open_image(bytes(image), limits, what)
        try:
            img.load()
        except Exception as e:  # a truncated or corrupt body, a decompression bomb...
            raise MediaError(f"{what}: cannot decode the image data ({_pil_reason(e)})") from None
        arr = _rgb_from_pil(img)
    elif hasattr(image, "getbands") and hasattr(image, "convert"):
        arr = _rgb_from_pil(image)
    elif isinstance(image, np.ndarray):
        arr = _rgb_from_array(image, what)
    else:
        raise MediaError(f"{what}: unsupported type {type(image).__name__} (a path, bytes, PIL image or uint8 array)")
    h, w = arr.shape[:2]
    if h == 0 or w == 0:
        raise MediaError(f"{what}: the image is empty ({h}x{w} pixels)")
    if h * w > limits.max_image_pixels:
        raise MediaError(f"{what}: {w}x{h} pixels, over the limit of {limits.max_image_pixels}")
    return arr


# ----------------------------------------------------------------------------------------------------------------
# Resizing and patches


def aspect_ratio_preserving_size(height: int, width: int, patch_size: int, max_patches: int,
                                 pooling_kernel_size: int) -> tuple[int, int]:
    """Largest (height, width) with the image's aspect ratio, at most max_patches patches, and sides that are
    multiples of pooling_kernel_size * patch_size (HF `get_aspect_ratio_preserving_size`)."""
    factor = math.sqrt(max_patches * patch_size**2 / (height * width))
    side = pooling_kernel_size * patch_size
    target_h = int(math.floor(factor * height / side)) * side
    target_w = int(math.floor(factor * width / side)) * side
    if target_h == 0 and target_w == 0:
        raise MediaError(f"an image of {height}x{width} pixels cannot be resized to a non-empty multiple of {side}")
    max_side = (max_patches // pooling_kernel_size**2) * side
    # A very thin image: one cell high (or wide), as long as the budget allows.
    if target_h == 0:
        target_h, target_w = side, min(int(math.floor(width / height)) * side, max_side)
    elif target_w == 0:
        target_h, target_w = min(int(math.floor(height / width)) * side, max_side), side
    if target_h * target_w > max_patches * patch_size**2:
        raise MediaError(f"an image of {height}x{width} pixels would need {target_h}x{target_w}, over the budget of "
                         f"{max_patches} patches")
    return target_h, target_w


def patchify(image: np.ndarray, patch_size: int) -> np.ndarray:
    """(H, W, 3) -> (H/p * W/p, p * p * 3): rows of patches first; inside a patch (row, column, channel)."""
    h, w, c = image.shape
    grid = image.reshape(h // patch_size, patch_size, w // patch_size, patch_size, c)
    return grid.transpose(0, 2, 1, 3, 4).reshape((h // patch_size) * (w // patch_size), -1)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    image_mod = _pil()
    return np.array(image_mod.fromarray(image).resize((width, height), resample=image_mod.Resampling.BICUBIC))


@dataclasses.dataclass(frozen=True)
class VisionPatcher:
    """Shared by the image and video processors: one RGB frame -> padded patches, positions, soft tokens."""

    patch_size: int = 16
    max_soft_tokens: int = 280
    pooling_kernel_size: int = 3

    def __post_init__(self):
        if self.max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
            raise ValueError(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, got {self.max_soft_tokens}")
        if self.patch_size <= 0 or self.pooling_kernel_size <= 0:
            raise ValueError(f"patch_size and pooling_kernel_size must be positive, got {self.patch_size}, "
                             f"{self.pooling_kernel_size}")

    @property
    def max_patches(self) -> int:
        return self.max_soft_tokens * self.pooling_kernel_size**2

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return aspect_ratio_preserving_size(height, width, self.patch_size, self.max_patches,
                                            self.pooling_kernel_size)

    def num_soft_tokens(self, height: int, width: int) -> int:
        """Soft tokens of an image of this size (known from its header, before decoding)."""
        th, tw = self.target_size(height, width)
        return (th // self.patch_size) * (tw // self.patch_size) // self.pooling_kernel_size**2

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """(H, W, 3) uint8 -> patches (max_patches, p*p*3) float32, positions (max_patches, 2) int64, soft tokens."""
        p = self.patch_size
        th, tw = self.target_size(*image.shape[:2])
        resized = _resize(image, th, tw)
        # As HF: the division in float64, the result in float32.
        scaled = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
        patches = patchify(scaled, p)
        grid_x, grid_y = np.meshgrid(np.arange(tw // p), np.arange(th // p), indexing="xy")
        positions = np.stack([grid_x, grid_y], axis=-1).reshape(-1, 2)
        n = patches.shape[0]
        out = np.zeros((self.max_patches, patches.shape[1]), np.float32)
        out[:n] = patches
        pos = np.full((self.max_patches, 2), -1, np.int64)
        pos[:n] = positions
        return out, pos, self.num_soft_tokens(*image.shape[:2])


def _read_processor_config(path: str) -> dict[str, Any]:
    """The image/video processor settings of a checkpoint dir (processor_config.json or preprocessor_config.json)."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            try:
                with open(file) as f:
                    return json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}: not valid JSON ({e})") from None
    return {}


def _section(config: dict[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key)
    return value if isinstance(value, dict) else config


class ImageProcessor:
    """Images -> {pixel_values (N, max_patches, 3*p*p) float32, image_position_ids (N, max_patches, 2) int64,
    num_soft_tokens_per_image [N]} (HF `Gemma4ImageProcessorPil`)."""

    def __init__(self, patch_size: int = 16, max_soft_tokens: int = 280, pooling_kernel_size: int = 3,
                 limits: MediaLimits = MediaLimits()):
        self.patcher = VisionPatcher(patch_size, max_soft_tokens, pooling_kernel_size)
        self.limits = limits

    @classmethod
    def from_dir(cls, path: str | os.PathLike, **overrides: Any) -> ImageProcessor:
        c = _section(_read_processor_config(os.fspath(path)), "image_processor")
        kw = {k: c[k] for k in ("patch_size", "max_soft_tokens", "pooling_kernel_size") if k in c}
        return cls(**{**kw, **overrides})

    def __call__(self, images: Any, limits: MediaLimits | None = None) -> dict[str, Any]:
        """limits: this request's caps (default: the processor's own)."""
        limits = limits or self.limits
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise MediaError("no images given")
        if len(images) > limits.max_images:
            raise MediaError(f"{len(images)} images, over the limit of {limits.max_images} per request")
        out = [self.patcher(load_image(im, limits, what=f"image {i}")) for i, im in enumerate(images)]
        return {
            "pixel_values": np.stack([o[0] for o in out]),
            "image_position_ids": np.stack([o[1] for o in out]),
            "num_soft_tokens_per_image": [o[2] for o in out],
        }


def sample_frame_indices(total_frames: int, num_frames: int | None, fps: float | None = None,
                         video_fps: float | None = None) -> np.ndarray:
    """Uniform frame indices (HF `default_sample_indices_fn`): i * total // num_frames, or `fps` frames per
    second of a video recorded at `video_fps`."""
    if num_frames is None and fps is not None:
        if video_fps is None:
            raise MediaError(f"sampling {fps} frames per second needs the video's own fps")
        num_frames = max(1, int(total_frames / video_fps * fps))
    if num_frames is None:
        return np.arange(total_frames)
    if num_frames > total_frames:
        raise MediaError(f"cannot sample {num_frames} frames from a video of {total_frames} frames; lower "
                         "num_frames")
    return np.arange(num_frames) * total_frames // num_frames


class VideoProcessor:
    """Videos (decoded frames) -> {pixel_values_videos (sum F, max_patches, 3*p*p), video_position_ids
    (sum F, max_patches, 2), num_frames_per_video, num_soft_tokens_per_video (per frame), timestamps (seconds of
    each sampled frame)}; frames of all videos stacked on one axis, as HF `Gemma4VideoProcessor`."""

    def __init__(self, patch_size: int = 16, max_soft_tokens: int = 70, pooling_kernel_size: int = 3,
                 num_frames: int | None = 32, do_sample_frames: bool = True, limits: MediaLimits = MediaLimits()):
        self.patcher = VisionPatcher(patch_size, max_soft_tokens, pooling_kernel_size)
        self.num_frames = num_frames
        self.do_sample_frames = do_sample_frames
        self.limits = limits

    @classmethod
    def from_dir(cls, path: str | os.PathLike, **overrides: Any) -> VideoProcessor:
        c = _section(_read_processor_config(os.fspath(path)), "video_processor")
        keys = ("patch_size", "max_soft_tokens", "pooling_kernel_size", "num_frames", "do_sample_frames")
        kw = {k: c[k] for k in keys if k in c}
        return cls(**{**kw, **overrides})

    def _frames(self, video: Any, what: str, limits: MediaLimits) -> np.ndarray:
        if isinstance(video, np.ndarray):
            if video.ndim != 4:
                raise MediaError(f"{what}: a video array must be (frames, H, W, C) uint8, got shape {video.shape}")
            frames = [_rgb_from_array(f, what) for f in video]
        elif isinstance(video, (list, tuple)):
            frames = [load_image(f, limits, what=f"{what} frame {i}") for i, f in enumerate(video)]
        else:
            raise MediaError(f"{what}: a video is an (F, H, W, 3) uint8 array or a list of frames, got "
                             f"{type(video).__name__}")
        if not frames:
            raise MediaError(f"{what}: the video has no frames")
        if len({f.shape for f in frames}) != 1:
            raise MediaError(f"{what}: frames differ in size")
        return np.stack(frames)

    def __call__(self, videos: Any, fps: float | Sequence[float | None] | None = None,
                 limits: MediaLimits | None = None) -> dict[str, Any]:
        """videos: one (F, H, W, 3) uint8 array or a list of videos; fps: per video (None: 24); limits: this
        request's caps (default: the processor's own)."""
        limits = limits or self.limits
        if isinstance(videos, np.ndarray) and videos.ndim == 4:
            videos = [videos]
        videos = list(videos)
        if not videos:
            raise MediaError("no videos given")
        if len(videos) > limits.max_videos:
            raise MediaError(f"{len(videos)} videos, over the limit of {limits.max_videos} per request")
        fps_list = list(fps) if isinstance(fps, (list, tuple)) else [fps] * len(videos)
        if len(fps_list) != len(videos):
            raise MediaError(f"{len(fps_list)} fps values for {len(videos)} videos")
        pixel_values, positions, frames_per_video, tokens, timestamps = [], [], [], [], []
        for v, (video, video_fps) in enumerate(zip(videos, fps_list, strict=True)):
            frames = self._frames(video, f"video {v}", limits)
            indices = (sample_frame_indices(len(frames), self.num_frames) if self.do_sample_frames
                       else np.arange(len(frames)))
            if len(indices) > limits.max_frames:
                raise MediaError(f"video {v}: {len(indices)} frames, over the limit of {limits.max_frames}")
            out = [self.patcher(frames[i]) for i in indices]
            pixel_values += [o[0] for o in out]
            positions += [o[1] for o in out]
            frames_per_video.append(len(indices))
            tokens.append(out[0][2])
            # HF falls back to 24 fps when the video's rate is unknown.
            timestamps.append([int(i) / (video_fps or 24) for i in indices])
        return {
            "pixel_values_videos": np.stack(pixel_values),
            "video_position_ids": np.stack(positions),
            "num_frames_per_video": frames_per_video,
            "num_soft_tokens_per_video": tokens,
            "timestamps": timestamps,
        }


# ----------------------------------------------------------------------------------------------------------------
# Prompt expansion


def image_placeholder(num_soft_tokens: int, tokens: dict[str, str] | None = None) -> str:
    t = {**DEFAULT_TOKENS, **(tokens or {})}
    return t["boi_token"] + t["image_token"] * num_soft_tokens + t["eoi_token"]


def video_placeholder(num_soft_tokens: int, timestamps: Sequence[float], tokens: dict[str, str] | None = None) -> str:
    """One "mm:ss <boi><video>...<eoi>" block per frame, joined by spaces."""
    t = {**DEFAULT_TOKENS, **(tokens or {})}
    frame = t["boi_token"] + t["video_token"] * num_soft_tokens + t["eoi_token"]
    return " ".join(f"{int(s // 60):02d}:{int(s % 60):02d} {frame}" for s in timestamps)


def expand_prompt(text: str, image_tokens: Sequence[int] = (), videos: Sequence[tuple[int, Sequence[float]]] = (),
                  audio_tokens: Sequence[int] = (), tokens: dict[str, str] | None = None) -> str:
    """Replace the i-th image / video / audio token of `text` by its expansion, in order of appearance.

    image_tokens: soft tokens per image; videos: (soft tokens per frame, frame timestamps) per video; audio_tokens:
    soft tokens per clip. The number of placeholders must equal the number of media of each kind.
    """
    t = {**DEFAULT_TOKENS, **(tokens or {})}
    kinds = {"image": (t["image_token"], list(image_tokens)), "video": (t["video_token"], list(videos)),
             "audio": (t["audio_token"], list(audio_tokens))}
    for kind, (token, items) in kinds.items():
        found = text.count(token)
        if found != len(items):
            raise MediaError(f"the prompt has {found} {token} placeholder(s) but {len(items)} {kind} input(s) were "
                             "given")
    active = {k: v for k, v in kinds.items() if v[1]}
    if not active:
        return text
    pattern = re.compile("|".join(f"(?P<{k}>{re.escape(v[0])})" for k, v in active.items()))
    iters = {k: iter(v[1]) for k, v in active.items()}

    def replace(m: re.Match) -> str:
        item = next(iters[m.lastgroup])
        if m.lastgroup == "image":
            return image_placeholder(item, t)
        if m.lastgroup == "video":
            return video_placeholder(item[0], item[1], t)
        return t["boa_token"] + t["audio_token"] * int(item) + t["eoa_token"]

    return pattern.sub(replace, text)


def mm_token_type_ids(input_ids: np.ndarray, image_token_id: int, video_token_id: int,
                      audio_token_id: int) -> np.ndarray:
    """(..., T) ids -> modality types: 1 image, 2 video, 3 audio placeholder, 0 otherwise (HF)."""
    ids = np.asarray(input_ids)
    types = np.zeros(ids.shape, np.int64)
    types[ids == image_token_id] = 1
    types[ids == video_token_id] = 2
    types[ids == audio_token_id] = 3
    return types

