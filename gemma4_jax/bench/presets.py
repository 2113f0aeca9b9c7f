"""Benchmark workloads: model presets (`bench-100m`, the E2B recipe in miniature, beside config.py's presets) and
random token-id prompts. Both sides of a comparison (ours, HF transformers, a live server) draw from here.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from gemma4_jax.config import FULL, SLIDING, ModelConfig, config_from_dict, preset, preset_dict

# ~100M parameters with the E2B recipe: per-layer embeddings (PLE), KV sharing (the last 4 layers reuse the K/V
# of layers 4 and 7), double-wide MLPs on the shared layers, soft-capping; 4 sliding + 1 full layer pattern with a
# full last layer. 102.5M parameters (embeddings 16.8M, PLE table 25.2M, decoder layers 60M).
BENCH_100M: dict[str, Any] = {
    "model_type": "gemma4_text",
    "architectures": ["Gemma4ForCausalLM"],
    "vocab_size": 32768,
    "vocab_size_per_layer_input": 32768,
    "hidden_size": 512,
    "num_hidden_layers": 12,
    "intermediate_size": 2048,
    "use_double_wide_mlp": True,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "global_head_dim": 128,
    "sliding_window": 128,
    "layer_types": [SLIDING] * 4 + [FULL] + [SLIDING] * 4 + [FULL] + [SLIDING, FULL],
    "num_kv_shared_layers": 4,
    "hidden_size_per_layer_input": 64,
    "final_logit_softcapping": 30.0,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "hidden_activation": "gelu_pytorch_tanh",
    "tie_word_embeddings": True,
    "rope_parameters": {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    },
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": 1,
}
BENCH_PRESETS = {"bench-100m": BENCH_100M}
# Ids below this are special tokens in every Gemma vocabulary (pad, eos, bos, ...); random prompts avoid them.
FIRST_ORDINARY_ID = 16


def bench_preset_dict(name: str) -> dict[str, Any]:
    """HF-style config dict of a bench preset or of a config.py preset (a copy)."""
    key = name.lower().replace("_", "-")
    if key in BENCH_PRESETS:
        return json.loads(json.dumps(BENCH_PRESETS[key]))
    preset(key)  # raises ConfigError listing the known presets
    return preset_dict(key)


def bench_config(name: str) -> ModelConfig:
    """The validated `ModelConfig` of a bench preset or of a config.py preset."""
    return config_from_dict(bench_preset_dict(name), where=f"preset {name}")


def random_prompts(num: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """`num` prompts of `length` uniform random token ids in [FIRST_ORDINARY_ID, vocab_size)."""
    rng = np.random.default_rng(seed)
    return rng.integers(FIRST_ORDINARY_ID, vocab_size, size=(num, length)).tolist()
