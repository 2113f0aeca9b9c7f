"""Shared by the multimodal engine and server tests: a tiny random image + audio checkpoint with a real tokenizer.json
(byte-level, Gemma 4's media tokens at the tiny config's placeholder ids) and a chat template that renders media
parts as placeholder tokens, as Gemma 4's template does; plus small media makers (PNG bytes, WAV bytes)."""

from __future__ import annotations

import io
import json
import os
import wave

import numpy as np
from tokenizers import AddedToken, decoders, models, processors
from tokenizers import Tokenizer as BackendTokenizer

from hf_reference import BASE_AUDIO, N_MELS, TINY_MM_TOKENS, make_multimodal_checkpoint

VOCAB = 512
FIRST_BYTE = 16
SPECIALS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 4, "<end_of_turn>": 5,
            "<|image|>": TINY_MM_TOKENS["image_token_id"], "<|video|>": TINY_MM_TOKENS["video_token_id"],
            "<|audio|>": TINY_MM_TOKENS["audio_token_id"], "<|image>": TINY_MM_TOKENS["boi_token_id"],
            "<image|>": TINY_MM_TOKENS["eoi_token_id"], "<|audio>": TINY_MM_TOKENS["boa_token_id"],
            "<audio|>": TINY_MM_TOKENS["eoa_token_index"]}

CHAT_TEMPLATE = """{{- bos_token -}}
{%- for message in messages -%}
{{- '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' -}}
{%- if message['content'] is string -%}
{{- message['content'] | trim -}}
{%- else -%}
{%- for part in message['content'] -%}
{%- if part['type'] == 'text' -%}{{- part['text'] | trim -}}
{%- elif part['type'] == 'image' -%}{{- '\n\n<|image|>\n\n' -}}
{%- elif part['type'] == 'audio' -%}{{- '<|audio|>' -}}
{%- elif part['type'] == 'video' -%}{{- '<|video|>' -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{- '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}
"""


def save_mm_tokenizer(path: str) -> None:
    """tokenizer.json (bytes at 16 + b, media tokens as specials), tokenizer_config.json with the chat template."""
    names = {i: n for n, i in SPECIALS.items()}
    vocab = {}
    for i in range(VOCAB):
        if i in names:
            vocab[names[i]] = i
        elif FIRST_BYTE <= i < FIRST_BYTE + 256:
            vocab[f"<0x{i - FIRST_BYTE:02X}>"] = i
        else:
            vocab[f"<unused{i}>"] = i
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if not t.startswith("<0x")])
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    backend.save(os.path.join(path, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
              "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True, "chat_template": CHAT_TEMPLATE}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 2, "eos_token_id": [1, 5], "pad_token_id": 0}, f)


def make_mm_checkpoint(path: str, seed: int = 0, bidirectional: bool = True, **text_overrides):
    """A random image + audio Gemma4ForConditionalGeneration (PLE on, a sliding window shorter than an image) with
    the tokenizer above and processor configs for the tiny towers (70 soft tokens per image, 16 mel bins)."""
    overrides = dict(vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8,
                     sliding_window=8, num_hidden_layers=3,
                     layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    if bidirectional:
        overrides["use_bidirectional_attention"] = "vision"
    overrides.update(text_overrides)
    hf = make_multimodal_checkpoint(path, seed=seed, audio_config=BASE_AUDIO, **overrides)
    save_mm_tokenizer(path)
    with open(os.path.join(path, "processor_config.json"), "w") as f:
        json.dump({"image_processor": {"max_soft_tokens": 70}, "video_processor": {"max_soft_tokens": 70,
                   "num_frames": 2}, "feature_extractor": {"feature_size": N_MELS}}, f)
    return hf


def png_bytes(height: int, width: int, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(samples: np.ndarray, rate: int = 16_000, channels: int = 1) -> bytes:
    """float samples in [-1, 1] -> 16-bit PCM WAV bytes (samples interleaved when channels > 1)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def noise(n: int, seed: int = 0) -> np.ndarray:
    """A clip that 16-bit WAV round-trips exactly (multiples of 1/32768)."""
    rng = np.random.default_rng(seed)
    return (np.round(0.2 * rng.standard_normal(n) * 32767) / 32768).astype(np.float32)
