"""Tiny random Hugging Face Gemma 4 checkpoints for parity tests (torch + transformers, float32).

Every parameter and buffer is randomised (norm weights, layer scalars, PLE tables, router scales too), so a
parameter that we load into the wrong place or ignore changes the logits far beyond the tolerance.
"""

from __future__ import annotations

import json
import os

import numpy as np

BASE_TEXT = dict(
    vocab_size=384,
    vocab_size_per_layer_input=384,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    sliding_window=64,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
    hidden_size_per_layer_input=0,
    num_kv_shared_layers=0,
    final_logit_softcapping=None,
    tie_word_embeddings=True,
    max_position_embeddings=1024,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=1,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
    },
)


def text_config(**overrides):
    cfg = dict(BASE_TEXT)
    cfg.update(overrides)
    return cfg


def randomize_(model, seed: int = 0) -> None:
    """Overwrite every parameter and persistent buffer with random values."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name or name.endswith("embed_scale"):
                continue  # derived constants, not weights
            if p.dtype not in (torch.float32, torch.float64):
                continue
            if p.ndim <= 1:
                # norms, layer scalars, router scales: positive, around 1, but clearly not 1
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / fan_in**0.5))


def make_text_checkpoint(path: str, seed: int = 0, multimodal_wrapper: bool = False, **overrides):
    """Save a random Gemma4ForCausalLM (or a text-only Gemma4ForConditionalGeneration) to `path`."""
    import torch
    from transformers import Gemma4Config, Gemma4ForCausalLM, Gemma4ForConditionalGeneration, Gemma4TextConfig

    torch.manual_seed(seed)
    tc = Gemma4TextConfig(**text_config(**overrides))
    if multimodal_wrapper:
        cfg = Gemma4Config(text_config=tc.to_dict(), vision_config=None, audio_config=None,
                           tie_word_embeddings=tc.tie_word_embeddings)
        model = Gemma4ForConditionalGeneration(cfg)
    else:
        model = Gemma4ForCausalLM(tc)
    model = model.float().eval()
    model.config._attn_implementation = "eager"
    randomize_(model, seed)
    model.save_pretrained(path, safe_serialization=True)
    return model


def hf_logits(model, input_ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long), use_cache=False)
    return out.logits.float().numpy()


def rewrite_config(path: str, fn) -> None:
    file = os.path.join(path, "config.json")
    with open(file) as f:
        d = json.load(f)
    d = fn(d) or d
    with open(file, "w") as f:
        json.dump(d, f, indent=2)


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
