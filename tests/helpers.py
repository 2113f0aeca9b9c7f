"""Plain helpers shared by the test files: the config overrides (of hf_reference.BASE_TEXT) that the tiny text
checkpoints are made of, token ids, and a model state by dotted name. Checkpoints themselves are built by the
`tiny_checkpoint` fixture (tests/conftest.py)."""

from __future__ import annotations

import numpy as np

from hf_reference import BASE_TEXT

VOCAB = BASE_TEXT["vocab_size"]  # 384
BYTE_VOCAB = 512  # the byte-level demo tokenizer's (gemma4_jax.serving.demo)

# ----------------------------------------------------------------------------------------------------------------
# Text-model recipes: each file's checkpoint variants combine these ({**A, **B, key=value}).

# E2B recipe: per-layer embeddings (PLE), KV sharing over both layer kinds, final soft-capping.
PLE_KVSHARE_SOFTCAP = dict(hidden_size_per_layer_input=16, num_kv_shared_layers=2, final_logit_softcapping=30.0)
# 31B / 26B recipe: keys as values on full layers with fewer global KV heads, untied LM head.
K_EQ_V_UNTIED = dict(attention_k_eq_v=True, num_key_value_heads=2, num_global_key_value_heads=1,
                     tie_word_embeddings=False)
# Double-wide MLP on the KV-shared layers.
DOUBLE_WIDE = dict(use_double_wide_mlp=True, num_kv_shared_layers=3, hidden_size_per_layer_input=8)
# A window much shorter than the test sequences, so the sliding mask matters.
SHORT_WINDOW = dict(sliding_window=8)
# 26B-A4B recipe: routed experts beside the dense MLP ...
MOE = dict(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=24)
# ... with keys as values and one global KV head on the full layers, as 26B-A4B has.
MOE_K_EQ_V = dict(MOE, attention_k_eq_v=True, num_global_key_value_heads=1)
# Fewer layers than BASE_TEXT's 6, for tests that only need a model.
TWO_LAYERS = dict(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
THREE_LAYERS = dict(num_hidden_layers=3, layer_types=["sliding_attention", "sliding_attention", "full_attention"])


# ----------------------------------------------------------------------------------------------------------------
# Token ids


def random_ids(batch: int = 2, length: int = 12, seed: int = 0, vocab: int = VOCAB) -> np.ndarray:
    """(batch, length) random token ids in [3, vocab): no pad, EOS or BOS."""
    return np.random.RandomState(seed).randint(3, vocab, size=(batch, length))


# ----------------------------------------------------------------------------------------------------------------
# Model state


def flat_state(state) -> dict:
    """An nnx state as {dotted path ("layers.0.mlp.up_proj.kernel"): variable}."""
    from flax import nnx

    return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}
