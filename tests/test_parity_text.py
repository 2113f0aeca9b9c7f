"""Logits parity with HF transformers (float32) on tiny random checkpoints of every text-model variant.

Tolerance: relative error (max |ours - HF| / max |HF|) <= 5e-4. HF's own float32 result is ~5e-5 from float64 on
such checkpoints; real bugs show up above 1e-3. `test_tolerance_catches_small_mistakes` shows the bound is tight
enough to catch a single misloaded or ignored parameter.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import gemma4_jax
from helpers import DOUBLE_WIDE, K_EQ_V_UNTIED, MOE_K_EQ_V, PLE_KVSHARE_SOFTCAP, SHORT_WINDOW, VOCAB, random_ids
from hf_reference import hf_logits, make_text_checkpoint, rel_err, rewrite_config

TOL = 5e-4

VARIANTS = {  # the recipes of tests/helpers.py
    "ple_kvshare_softcap": PLE_KVSHARE_SOFTCAP,
    "k_eq_v_untied": dict(K_EQ_V_UNTIED, final_logit_softcapping=30.0),
    "double_wide": DOUBLE_WIDE,
    "short_window": dict(SHORT_WINDOW, hidden_size_per_layer_input=8, num_kv_shared_layers=2),
    "moe": MOE_K_EQ_V,
}


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint):
    return {name: tiny_checkpoint(f"text_{name}", seed=i, **overrides)
            for i, (name, overrides) in enumerate(VARIANTS.items())}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_hf(checkpoints, variant):
    path, hf_model = checkpoints[variant]
    ids = random_ids(2, 40)
    ref = hf_logits(hf_model, ids)
    ours = np.asarray(gemma4_jax.from_pretrained(path, dtype="float32").logits(ids))
    assert ours.shape == ref.shape == (2, 40, VOCAB)
    err = rel_err(ours, ref)
    assert err <= TOL, f"{variant}: relative logits error {err:.2e} > {TOL}"
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_config_parsed_as_intended(checkpoints):
    """The variants really exercise their features (a parity test over a disabled feature proves nothing)."""
    cfg = gemma4_jax.load_config(checkpoints["ple_kvshare_softcap"][0]).text
    assert cfg.has_ple and cfg.final_logit_softcapping == 30.0
    assert [s.kv_sharing for s in cfg.layers] == [None, None, "store", "store", "reuse", "reuse"]
    assert [s.kv_source_layer for s in cfg.layers] == [0, 1, 2, 3, 3, 2]
    cfg = gemma4_jax.load_config(checkpoints["k_eq_v_untied"][0]).text
    assert not cfg.tie_word_embeddings
    assert [(s.k_eq_v, s.num_kv_heads, s.head_dim) for s in cfg.layers[:3]] == [(False, 2, 16), (False, 2, 16),
                                                                               (True, 1, 32)]
    cfg = gemma4_jax.load_config(checkpoints["double_wide"][0]).text
    assert [s.intermediate_size for s in cfg.layers] == [96, 96, 96, 192, 192, 192]
    assert gemma4_jax.load_config(checkpoints["short_window"][0]).text.layers[0].sliding_window == 8


def test_old_style_global_overrides(checkpoints, tmp_path):
    """`global_head_dim` / `num_global_key_value_heads` keys (pre-5.23 configs) load like `per_layer_config`."""
    import shutil

    src, hf_model = checkpoints["k_eq_v_untied"]
    dst = str(tmp_path / "old_style")
    shutil.copytree(src, dst)

    def to_old(d):
        d.pop("per_layer_config")
        d["global_head_dim"] = 32
        d["num_global_key_value_heads"] = 1

    rewrite_config(dst, to_old)
    ids = random_ids(1, 12)
    err = rel_err(gemma4_jax.from_pretrained(dst, dtype="float32").logits(ids), hf_logits(hf_model, ids))
    assert err <= TOL


def test_multimodal_wrapper_prefix(tiny_checkpoint):
    """A Gemma4ForConditionalGeneration checkpoint (keys under model.language_model.) loads its text model."""
    path, hf_model = tiny_checkpoint("text_wrapped", seed=7, multimodal_wrapper=True, hidden_size_per_layer_input=8,
                                     num_kv_shared_layers=2, final_logit_softcapping=30.0)
    model = gemma4_jax.from_pretrained(path, dtype="float32")
    assert model.config.model_type == "gemma4"
    ids = random_ids(2, 16)
    assert rel_err(model.logits(ids), hf_logits(hf_model, ids)) <= TOL


def test_sharded_checkpoint(tmp_path):
    """Several safetensors shards with an index load like one file."""
    import os

    path = str(tmp_path / "sharded")
    hf_model = make_text_checkpoint(path, seed=3, hidden_size_per_layer_input=8, num_kv_shared_layers=2)
    os.remove(os.path.join(path, "model.safetensors"))
    hf_model.save_pretrained(path, safe_serialization=True, max_shard_size="60KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 2
    ids = random_ids(1, 20)
    assert rel_err(gemma4_jax.from_pretrained(path, dtype="float32").logits(ids), hf_logits(hf_model, ids)) <= TOL


def test_padding_positions(checkpoints):
    """Left padding marked by negative positions leaves the real tokens' logits unchanged."""
    path, _ = checkpoints["short_window"]
    model = gemma4_jax.from_pretrained(path, dtype="float32")
    ids = random_ids(1, 20)
    plain = np.asarray(model.logits(ids))
    padded_ids = np.concatenate([np.zeros((1, 5), np.int64), ids], axis=1)
    positions = np.concatenate([-np.ones((1, 5), np.int32), np.arange(20, dtype=np.int32)[None]], axis=1)
    padded = np.asarray(model.logits(padded_ids, positions=positions))[:, 5:]
    assert rel_err(padded, plain) < 1e-5


def test_bfloat16_greedy_matches_float32(checkpoints):
    """bf16 greedy tokens agree with float32 on most positions, and bf16 drifts no more than HF's own bf16."""
    import copy

    import torch

    path, hf_model = checkpoints["ple_kvshare_softcap"]
    ids = random_ids(2, 40, seed=5)
    f32 = np.asarray(gemma4_jax.from_pretrained(path, dtype="float32").logits(ids))
    bf16_model = gemma4_jax.from_pretrained(path, dtype="bfloat16")
    assert jax.tree.leaves(bf16_model.state)[0].dtype == np.dtype("bfloat16")
    bf16 = np.asarray(bf16_model.logits(ids))
    agree = (f32.argmax(-1) == bf16.argmax(-1)).mean()
    assert agree >= 0.85, f"bf16 greedy agrees with float32 on only {agree:.0%} of positions"
    hf_bf16 = hf_logits(copy.deepcopy(hf_model).to(torch.bfloat16), ids)
    # Random tiny models amplify rounding (norm weights up to 1.5 in every layer): calibrate against HF's bf16.
    assert rel_err(bf16, f32) < 2 * rel_err(hf_bf16, f32)


@pytest.mark.parametrize(
    "mutation",
    ["layer_scalar", "ple_table", "store_layer_k_norm", "post_per_layer_input_norm", "final_norm"],
)
def test_tolerance_catches_small_mistakes(checkpoints, mutation):
    """Perturbing one parameter by 2% pushes the error past the tolerance: the parity tests can fail."""
    path, hf_model = checkpoints["ple_kvshare_softcap"]
    model = gemma4_jax.from_pretrained(path, dtype="float32")
    target = {
        "layer_scalar": ("layers", 1, "layer_scalar"),
        "ple_table": ("embed_tokens_per_layer", "embedding"),
        "store_layer_k_norm": ("layers", 3, "self_attn", "k_norm", "weight"),
        "post_per_layer_input_norm": ("layers", 4, "post_per_layer_input_norm", "weight"),
        "final_norm": ("norm", "weight"),
    }[mutation]
    flat = []
    for p, var in nnx.to_flat_state(model.state):
        flat.append((p, var.replace(var[...] * 1.02) if p == target else var))
    assert any(p == target for p, _ in flat)
    model.state = nnx.from_flat_state(flat)
    ids = random_ids(2, 40)
    err = rel_err(model.logits(ids), hf_logits(hf_model, ids))
    assert err > TOL, f"a 2% change of {mutation} went unnoticed (error {err:.2e})"
