"""Routed experts ("return routed experts", as vLLM and SGLang offer): the router's top-k expert ids per token and
MoE layer, checked against the ids HF's Gemma4TextRouter picks on the same checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

import gemma4_jax
from helpers import MOE_K_EQ_V, TWO_LAYERS, random_ids

MOE = dict(MOE_K_EQ_V, top_k_experts=3, num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2)


@pytest.fixture(scope="module")
def moe_ckpt(tiny_checkpoint):
    return tiny_checkpoint("routed_moe", seed=11, **MOE)


def hf_routed(hf_model, ids: np.ndarray) -> np.ndarray:
    """HF's top-k ids per MoE layer, captured with forward hooks on each router -> (B, T, L, k)."""
    import torch
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRouter

    captured = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: captured.append(out[2].numpy()))
             for m in hf_model.modules() if isinstance(m, Gemma4TextRouter)]
    try:
        with torch.no_grad():
            hf_model(input_ids=torch.as_tensor(ids, dtype=torch.long), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    b, t = ids.shape
    return np.stack([c.reshape(b, t, -1) for c in captured], axis=2)


def test_routed_experts_match_hf(moe_ckpt):
    path, hf_model = moe_ckpt
    ids = random_ids(2, 24)
    model = gemma4_jax.from_pretrained(path, dtype="float32")
    logits, routed = model.logits(ids, return_routed_experts=True)
    routed = np.asarray(routed)
    ref = hf_routed(hf_model, ids)
    assert routed.shape == ref.shape == (2, 24, 4, 3)
    assert routed.dtype == np.int32
    # Same experts in the same order (the router's order: highest weight first).
    assert (routed == ref).mean() == 1.0
    # Asking for the ids changes nothing about the logits.
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(model.logits(ids)))
    # Not degenerate: the tokens really spread over the experts.
    assert len(np.unique(routed)) == MOE["num_experts"]


def test_dense_model_refuses_routed_experts(tiny_checkpoint):
    path = tiny_checkpoint("routed_dense", seed=1, **TWO_LAYERS).path
    model = gemma4_jax.from_pretrained(path, dtype="float32")
    with pytest.raises(ValueError, match="dense"):
        model.logits(np.array([[3, 4, 5]]), return_routed_experts=True)


def _engine_routed(path, prompts, pp=1, **engine_kwargs):
    llm = gemma4_jax.LLM(path, dtype="float32", pp=pp, max_num_seqs=4, page_size=8, num_pages=64,
                         max_model_len=128, **engine_kwargs)
    params = gemma4_jax.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, return_routed_experts=True)
    return llm.generate(prompts, params, use_tqdm=False)


def _check_against_full_forward(model, prompts, outs):
    for prompt, out in zip(prompts, outs, strict=True):
        seq = list(prompt) + list(out.token_ids)
        _, full = model.logits(np.array([seq]), return_routed_experts=True)
        full = np.asarray(full)[0]  # (T, L, k)
        # Token j was sampled from the logits of input position len(prompt) - 1 + j.
        expect = full[len(prompt) - 1: len(prompt) - 1 + len(out.token_ids)]
        assert out.routed_experts.shape == expect.shape == (6, 4, 3)
        np.testing.assert_array_equal(out.routed_experts, expect)


@pytest.mark.parametrize("num_scheduler_steps", [1, 3])
def test_engine_returns_routed_experts(moe_ckpt, num_scheduler_steps):
    path, _ = moe_ckpt
    prompts = [[2, 17, 33, 80, 5], [2, 9, 250, 31, 77, 12, 140, 6, 90]]
    outs = _engine_routed(path, prompts, num_scheduler_steps=num_scheduler_steps, max_num_batched_tokens=8)
    _check_against_full_forward(gemma4_jax.from_pretrained(path, dtype="float32"), prompts, outs)


def test_engine_routed_experts_pipelined(moe_ckpt):
    """pp=2: each stage returns its own layers' ids; the engine joins them in layer order."""
    path, _ = moe_ckpt
    prompts = [[2, 17, 33, 80, 5], [2, 9, 250, 31]]
    outs = _engine_routed(path, prompts, pp=2)
    model = gemma4_jax.from_pretrained(path, dtype="float32")
    _check_against_full_forward(model, prompts, outs)
    piped = gemma4_jax.from_pretrained(path, dtype="float32", pp=2)
    ids = np.array([prompts[0] + list(outs[0].token_ids)])
    np.testing.assert_array_equal(np.asarray(piped.logits(ids, return_routed_experts=True)[1]),
                                  np.asarray(model.logits(ids, return_routed_experts=True)[1]))


def test_routed_experts_requests_checked(moe_ckpt, tmp_path):
    path, _ = moe_ckpt
    with pytest.raises(ValueError, match="return_routed_experts must be a bool"):
        gemma4_jax.SamplingParams(return_routed_experts="yes")
    llm = gemma4_jax.LLM(path, dtype="float32", max_num_seqs=2, num_pages=32, max_model_len=64,
                         enable_return_routed_experts=False)
    with pytest.raises(ValueError, match="enable_return_routed_experts=False"):
        llm.generate([[2, 5, 6]], gemma4_jax.SamplingParams(max_tokens=2, return_routed_experts=True),
                     use_tqdm=False)
    # Not asked for: no ids in the output.
    out = llm.generate([[2, 5, 6]], gemma4_jax.SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert out.routed_experts is None
