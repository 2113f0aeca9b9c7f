"""Log-mel features from 16 kHz waveforms, in numpy, equal to HF's `Gemma4AudioFeatureExtractor`.

Steps (per batch): every clip is truncated to `max_length` samples (30 s), the batch is right-padded with zeros to
the longest clip rounded up to a multiple of 128 samples; then per clip: `frame_length // 2` zeros in front
(semicausal framing, the first frame centred at t = 0), frames of `frame_length + 1` samples every `hop_length`
(the extra sample only feeds the optional pre-emphasis), periodic Hann window, |rfft| with `fft_length` points,
HTK mel filter bank (no area normalisation), log(mel + mel_floor), optional per-bin normalisation. A frame is
valid when the last sample of its window is real audio; invalid frames are zeroed.

The tower turns T valid-or-not frames into len(mask[::2][::2]) soft tokens, of which the valid ones are kept
(`audio.num_soft_tokens`). Inputs that cannot work (another sample rate, empty or too short clips, wrong
dimensions, non-finite samples) raise ValueError naming the problem.

Clips reach the extractor through `load_audio` (the audio twin of processing.load_image): a WAV path or bytes
(`decode_wav`), or samples, checked against the per-request `MediaLimits`; bad clips raise MediaError.
"""

from __future__ import annotations

import io
import json
import math
import os
import wave
from collections.abc import Sequence
from typing import Any

import numpy as np

from gemma4_jax.processing import MediaError, MediaLimits, read_media_file

SAMPLING_RATE = 16_000


# ----------------------------------------------------------------------------------------------------------------
# Decoding clips


def decode_wav(data: bytes, what: str) -> tuple[np.ndarray, int]:
    """WAV bytes (PCM, 8/16/24/32-bit) -> (mono float32 samples (N,) in [-1, 1], sample rate). Channels are
    averaged."""
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


def load_audio(audio: Any, limits: MediaLimits | None = None, what: str = "audio") -> np.ndarray:
    """A WAV path or bytes, a 1-D float array at 16 kHz, or (array, sample_rate) -> mono float32 (N,) at 16 kHz.

    limits: the request's caps (default MediaLimits()). Another sample rate raises MediaError (resampling is the
    caller's choice, not ours)."""
    limits = limits or MediaLimits()
    rate = SAMPLING_RATE
    if isinstance(audio, (str, os.PathLike)):
        audio = read_media_file(audio, limits.max_audio_bytes, what, "audio")
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
# Log-mel features


def hertz_to_mel(freq: np.ndarray | float) -> np.ndarray | float:
    """HTK mel scale."""
    return 2595.0 * np.log10(1.0 + np.asarray(freq) / 700.0)


def mel_to_hertz(mels: np.ndarray | float) -> np.ndarray | float:
    return 700.0 * (np.power(10, np.asarray(mels) / 2595.0) - 1.0)


def mel_filter_bank(num_frequency_bins: int, num_mel_filters: int, min_frequency: float, max_frequency: float,
                    sampling_rate: int) -> np.ndarray:
    """Triangular HTK mel filters without normalisation, float64 (num_frequency_bins, num_mel_filters).

    Filter edges are spaced evenly in mel between min and max frequency; each triangle rises from its left edge
    to its centre and falls to its right edge, evaluated at the FFT bin frequencies."""
    mel_points = np.linspace(hertz_to_mel(min_frequency), hertz_to_mel(max_frequency), num_mel_filters + 2)
    edges = mel_to_hertz(mel_points)  # (M + 2,) Hz
    bins = np.linspace(0, sampling_rate // 2, num_frequency_bins)  # (K,) Hz
    widths = np.diff(edges)
    offsets = edges[None, :] - bins[:, None]  # (K, M + 2)
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    return np.maximum(0.0, np.minimum(rising, falling))


class AudioFeatureExtractor:
    """Waveforms at 16 kHz -> (input_features (B, T, n_mels) float32, input_features_mask (B, T) bool).

    Parameters and defaults are HF's (`preprocessor_config.json` keys); `from_dict` / `from_pretrained` read them.
    """

    def __init__(
        self,
        feature_size: int = 128,
        sampling_rate: int = SAMPLING_RATE,
        padding_value: float = 0.0,
        frame_length_ms: float = 20.0,
        hop_length_ms: float = 10.0,
        min_frequency: float = 0.0,
        max_frequency: float = 8000.0,
        preemphasis: float = 0.0,
        preemphasis_htk_flavor: bool = True,
        fft_overdrive: bool = False,
        dither: float = 0.0,
        input_scale_factor: float = 1.0,
        mel_floor: float = 1e-3,
        per_bin_mean: Sequence[float] | None = None,
        per_bin_stddev: Sequence[float] | None = None,
    ):
        if feature_size <= 0 or sampling_rate <= 0:
            raise ValueError("feature extractor: feature_size and sampling_rate must be positive")
        if not 0.0 <= min_frequency <= max_frequency <= sampling_rate / 2:
            raise ValueError(f"feature extractor: need 0 <= min_frequency ({min_frequency}) <= max_frequency "
                             f"({max_frequency}) <= sampling_rate / 2 ({sampling_rate / 2})")
        self.feature_size = int(feature_size)
        self.sampling_rate = int(sampling_rate)
        self.padding_value = float(padding_value)
        self.frame_length = int(round(sampling_rate * frame_length_ms / 1000.0))
        self.hop_length = int(round(sampling_rate * hop_length_ms / 1000.0))
        if self.frame_length < 2 or self.hop_length < 1:
            raise ValueError(f"feature extractor: frame length {self.frame_length} / hop {self.hop_length} samples "
                             "are too short")
        self.preemphasis = float(preemphasis)
        self.preemphasis_htk_flavor = bool(preemphasis_htk_flavor)
        self.dither = float(dither)
        self.input_scale_factor = float(input_scale_factor)
        self.mel_floor = np.float64(mel_floor)
        self.fft_length = 2 ** math.ceil(math.log2(self.frame_length)) * (2 if fft_overdrive else 1)
        # Periodic Hann window: the first `frame_length` points of a symmetric one of frame_length + 1.
        self.window = np.hanning(self.frame_length + 1)[:-1].astype(np.float32)
        self.mel_filters = mel_filter_bank(self.fft_length // 2 + 1, self.feature_size, min_frequency, max_frequency,
                                           self.sampling_rate)
        self.per_bin_mean = self._per_bin(per_bin_mean, "per_bin_mean")
        self.per_bin_stddev = self._per_bin(per_bin_stddev, "per_bin_stddev")

    def _per_bin(self, values: Sequence[float] | None, name: str) -> np.ndarray | None:
        if values is None:
            return None
        arr = np.asarray(values, dtype=np.float64)
        if arr.size != self.feature_size:
            raise ValueError(f"feature extractor: {name} has {arr.size} values for {self.feature_size} mel bins")
        return arr.reshape(1, self.feature_size)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AudioFeatureExtractor:
        """From HF's feature-extractor dict (unknown keys such as `feature_extractor_type` are ignored)."""
        keys = cls.__init__.__code__.co_varnames[1 : cls.__init__.__code__.co_argcount]
        return cls(**{k: d[k] for k in keys if k in d and d[k] is not None})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> AudioFeatureExtractor:
        """From a checkpoint directory: `processor_config.json`'s "feature_extractor" entry, else
        `preprocessor_config.json`; HF's defaults when neither is there."""
        path = os.fspath(path)
        for name, key in (("processor_config.json", "feature_extractor"), ("preprocessor_config.json", None)):
            file = os.path.join(path, name)
            if os.path.exists(file):
                with open(file) as f:
                    d = json.load(f)
                d = d.get(key) if key else d
                if isinstance(d, dict) and (key or "Audio" in str(d.get("feature_extractor_type", "Audio"))):
                    return cls.from_dict(d)
        return cls()

    # ------------------------------------------------------------------------------------------------------------

    def _clips(self, waveforms: Any, limit: int) -> list[np.ndarray]:
        """One 1-D array, a 2-D (batch, samples) array or a list of 1-D arrays -> list of 1-D float32 clips."""
        if isinstance(waveforms, np.ndarray):
            if waveforms.ndim == 1:
                clips = [waveforms]
            elif waveforms.ndim == 2:
                clips = list(waveforms)
            else:
                raise ValueError(f"audio: expected a 1-D waveform or a (batch, samples) array, got shape "
                                 f"{waveforms.shape}")
        elif isinstance(waveforms, (list, tuple)):
            if not waveforms:
                raise ValueError("audio: empty list of waveforms")
            if all(np.ndim(w) == 0 for w in waveforms):
                clips = [np.asarray(waveforms)]  # a plain list of samples is one clip
            else:
                clips = [np.asarray(w) for w in waveforms]
        else:
            raise ValueError(f"audio: expected a numpy waveform or a list of them, got {type(waveforms).__name__}")
        out = []
        min_samples = self.frame_length + 1 - self.frame_length // 2  # one complete analysis frame
        for i, clip in enumerate(clips):
            if clip.ndim != 1:
                raise ValueError(f"audio clip {i}: expected a mono 1-D waveform, got shape {clip.shape} (mix "
                                 "channels down to mono first)")
            if not (np.issubdtype(clip.dtype, np.floating) or np.issubdtype(clip.dtype, np.integer)):
                raise ValueError(f"audio clip {i}: samples must be real numbers, got dtype {clip.dtype}")
            if clip.size == 0:
                raise ValueError(f"audio clip {i} is empty")
            if clip.size < min_samples:
                raise ValueError(f"audio clip {i} has {clip.size} samples; at least {min_samples} "
                                 f"({1000 * min_samples / self.sampling_rate:.1f} ms) are needed for one frame")
            clip = clip.astype(np.float32)
            if not np.isfinite(clip).all():
                raise ValueError(f"audio clip {i} contains NaN or infinite samples")
            out.append(clip[:limit])
        return out

    def _log_mel(self, waveform: np.ndarray, sample_mask: np.ndarray,
                 rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
        """One padded clip (N,) float32 and its sample mask (N,) -> features (T, n_mels) float32, mask (T,)."""
        if self.dither > 0.0:
            rng = rng if rng is not None else np.random.default_rng()
            waveform = waveform + self.dither * rng.standard_normal(waveform.shape).astype(waveform.dtype)
        if self.input_scale_factor != 1.0:
            waveform = waveform * self.input_scale_factor
        pad_left = self.frame_length // 2
        waveform = np.pad(waveform, (pad_left, 0))
        sample_mask = np.pad(sample_mask, (pad_left, 0))
        window_size = self.frame_length + 1
        num_frames = (waveform.shape[0] - window_size) // self.hop_length + 1
        frames = np.lib.stride_tricks.sliding_window_view(waveform, window_size)[:: self.hop_length][:num_frames]
        if self.preemphasis > 0.0:
            if self.preemphasis_htk_flavor:
                first = frames[:, :1] * (1.0 - self.preemphasis)
                rest = frames[:, 1:-1] - self.preemphasis * frames[:, :-2]
                frames = np.concatenate([first, rest], axis=-1)
            else:
                frames = frames[:, 1:] - self.preemphasis * frames[:, :-1]
        else:
            frames = frames[:, :-1]
        # float32 spectrum (as the reference), mel projection and log in float64.
        magnitude = np.abs(np.fft.rfft(frames * self.window, n=self.fft_length, axis=-1))
        log_mel = np.log(magnitude @ self.mel_filters + self.mel_floor)
        if self.per_bin_mean is not None:
            log_mel = log_mel - self.per_bin_mean
        if self.per_bin_stddev is not None:
            log_mel = log_mel / self.per_bin_stddev
        frame_ends = np.arange(num_frames) * self.hop_length + window_size - 1
        mask = sample_mask[frame_ends]
        return log_mel.astype(np.float32) * mask[:, None], mask

    def __call__(
        self,
        waveforms: Any,
        sampling_rate: int = SAMPLING_RATE,
        max_length: int = 480_000,
        pad_to_multiple_of: int = 128,
        rng: np.random.Generator | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """waveforms: one 1-D array, a list of them or a (batch, samples) array, mono at `sampling_rate` Hz.

        Clips longer than `max_length` samples (30 s) are truncated; the batch is padded to its longest clip
        rounded up to `pad_to_multiple_of` (HF's call arguments and defaults). Returns input_features
        (B, T, n_mels) float32 and input_features_mask (B, T) bool, the HF processor's names. `rng` only matters
        when the config asks for dithering.
        """
        if int(sampling_rate) != self.sampling_rate:
            raise ValueError(f"audio: sampling rate {sampling_rate} Hz is not supported; resample to "
                             f"{self.sampling_rate} Hz first")
        if max_length <= 0 or pad_to_multiple_of <= 0:
            raise ValueError("audio: max_length and pad_to_multiple_of must be positive")
        round_up = lambda n: -(-n // pad_to_multiple_of) * pad_to_multiple_of  # noqa: E731
        clips = self._clips(waveforms, round_up(max_length))
        padded_length = round_up(max(c.shape[0] for c in clips))
        features, masks = [], []
        for clip in clips:
            sample_mask = np.zeros(padded_length, bool)
            sample_mask[: clip.shape[0]] = True
            padded = np.full(padded_length, self.padding_value, np.float32)
            padded[: clip.shape[0]] = clip
            f, m = self._log_mel(padded, sample_mask, rng)
            features.append(f)
            masks.append(m)
        return np.stack(features), np.stack(masks)
