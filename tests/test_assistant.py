"""The MTP assistant (drafter) model against HF's `Gemma4AssistantForCausalLM` (transformers 5.23, float32).

- one draft step: logits and the next recurrent state equal HF's forward given the same target K/V, token embedding
  and hidden state, for the plain and the centroid-masked head (rows at different positions, contexts longer and
  shorter than the sliding window, keys in any slot order with stale and empty slots that must be ignored);
- a draft round: HF's own candidate generator (`SinglePositionMultiTokenCandidateGenerator`) against `draft`, with
  the target's K/V and final-normed hidden state from an HF target and the token embedding from our loaded target;
- loading: bf16 and a compressed-tensors FP8 checkpoint through `from_pretrained`; config validation errors (also
  refused by HF where HF validates the field); `eval_shape` of the real assistants.

Every parameter is randomised (hf_reference.randomize_), token_ordering is a random permutation.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import gemma4_jax
from gemma4_jax import assistant_config as ac
from gemma4_jax import sharding
from gemma4_jax.assistant import TargetKV, draft
from gemma4_jax.config import ConfigError, preset
from gemma4_jax.model import AssistantModel, abstract_assistant, load_assistant
from helpers import flat_state
from hf_reference import (
    BASE_ASSISTANT_TEXT,
    BASE_TEXT,
    ORDERED,
    assistant_kv_sharing_patch,
    hf_assistant_step,
    make_assistant_checkpoint,
    rel_err,
    rewrite_config,
)

TOL = 5e-4
D_TARGET = BASE_TEXT["hidden_size"]
KV_HEADS = BASE_ASSISTANT_TEXT["num_key_value_heads"]
HEAD_DIMS = {"sliding_attention": BASE_ASSISTANT_TEXT["head_dim"],
             "full_attention": BASE_ASSISTANT_TEXT["global_head_dim"]}
WINDOW = BASE_ASSISTANT_TEXT["sliding_window"]


@pytest.fixture(scope="module", params=["plain", "ordered"])
def assistant(request, tiny_checkpoint):
    """(HF model, our AssistantModel) of a tiny assistant; "ordered": the centroid-masked head."""
    overrides = ORDERED if request.param == "ordered" else {}
    ckpt = tiny_checkpoint(f"assistant-{request.param}", seed=5, maker=make_assistant_checkpoint, **overrides)
    ours = gemma4_jax.from_pretrained(ckpt.path, dtype="float32")
    return ckpt.hf, ours


# ----------------------------------------------------------------------------------------------------------------
# One draft step against HF's forward


def _target_kv(rng, positions: list[int], slots: int):
    """Random target K/V for rows whose current position is positions[b]: keys at positions 0..p-1 in shuffled
    slots, plus two stale keys at p and p + 1 (rejected drafts still in a pool: never seen) and empty slots.
    Returns (TargetKV, {kind: [per-row HF arrays (1, K, p, H), keys in position order]})."""
    views, hf = {}, {}
    for kind, head_dim in HEAD_DIMS.items():
        b = len(positions)
        k = rng.randn(b, slots, KV_HEADS, head_dim).astype(np.float32)
        v = rng.randn(b, slots, KV_HEADS, head_dim).astype(np.float32)
        pos = np.full((b, slots), -1, np.int32)
        rows = []
        for i, p in enumerate(positions):
            order = rng.permutation(slots)[: p + 2]
            pos[i, order] = np.arange(p + 2)
            by_position = order[:p]  # slot of position 0, 1, ..., p-1
            rows.append((k[i, by_position].transpose(1, 0, 2)[None], v[i, by_position].transpose(1, 0, 2)[None]))
        views[kind] = (k, v, pos)
        hf[kind] = rows
    return TargetKV.dense(sliding=views["sliding_attention"], full=views["full_attention"]), hf


def test_step_matches_hf(assistant):
    hf, ours = assistant
    rng = np.random.RandomState(0)
    positions = [13, 5, 1]  # a context longer than the window + 1 (= 7 keys), a shorter one, a single key
    target_kv, hf_kv = _target_kv(rng, positions, slots=16)
    embedding = rng.randn(len(positions), D_TARGET).astype(np.float32)
    hidden = rng.randn(len(positions), D_TARGET).astype(np.float32)
    out = ours.step(embedding, hidden, target_kv, np.array(positions))
    assert out.logits.shape == (3, BASE_TEXT["vocab_size"]) and out.hidden.shape == (3, D_TARGET)
    for b, p in enumerate(positions):
        kv = {kind: rows[b] for kind, rows in hf_kv.items()}
        ref_logits, ref_hidden = hf_assistant_step(hf, embedding[b], hidden[b], kv, p)
        assert rel_err(out.logits[b], ref_logits) <= TOL, (b, rel_err(out.logits[b], ref_logits))
        assert rel_err(out.hidden[b], ref_hidden) <= TOL
        assert int(np.argmax(out.logits[b])) == int(np.argmax(ref_logits))


def test_centroid_head_scores_only_the_selected_clusters(assistant):
    hf, ours = assistant
    if not ours.config.use_ordered_embeddings:
        pytest.skip("plain head")
    rng = np.random.RandomState(1)
    positions = [13, 5, 1]  # the shapes of test_step_matches_hf: its compiled step is reused
    target_kv, _ = _target_kv(rng, positions, slots=16)
    out = ours.step(rng.randn(3, D_TARGET), rng.randn(3, D_TARGET), target_kv, np.array(positions))
    cfg = ours.config
    scored = cfg.centroid_intermediate_top_k * cfg.vocab_size_per_centroid
    for row in np.asarray(out.logits):
        floor = row.min()
        assert np.sum(row > floor) == scored  # every other token sits at (lowest selected logit - 1)
        assert np.isclose(np.sort(row)[-scored], floor + 1.0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# A round of drafts against HF's candidate generator


def test_draft_round_matches_hf_candidate_generator(tiny_checkpoint):
    import torch
    from transformers import GenerationConfig
    from transformers.generation.candidate_generator import SinglePositionMultiTokenCandidateGenerator

    # HF's target stores K/V for the assistant only from layers that KV-shared layers read.
    target_ckpt = tiny_checkpoint("assistant-target", seed=6, num_kv_shared_layers=2)
    ckpt = tiny_checkpoint("assistant-ordered", seed=5, maker=make_assistant_checkpoint, **ORDERED)
    hf_target, hf_assistant = target_ckpt.hf, ckpt.hf
    prompt = torch.from_numpy(np.random.RandomState(2).randint(3, BASE_TEXT["vocab_size"], size=(1, 12)))
    with torch.no_grad():
        out = hf_target(input_ids=prompt, output_hidden_states=True, return_shared_kv_states=True, use_cache=False)
    first = out.logits[:, -1].argmax(-1, keepdim=True)  # the token the target samples after the prompt
    k = 3
    hf_assistant.generation_config.num_assistant_tokens = k
    with assistant_kv_sharing_patch(), torch.no_grad():
        generator = SinglePositionMultiTokenCandidateGenerator(
            hf_assistant, hf_target.get_input_embeddings(), GenerationConfig(max_length=100))
        ids, logits = generator.get_candidates(torch.cat([prompt, first], 1), {}, out, is_first_iteration=False,
                                               n_last_matches=0)
    ref_tokens, ref_logits = ids[0, -k:].numpy(), logits[0].numpy()

    target = gemma4_jax.from_pretrained(target_ckpt.path, dtype="float32")
    ours = gemma4_jax.from_pretrained(ckpt.path, dtype="float32")
    layers = ours.check_target(target)
    assert layers == {"sliding_attention": 3, "full_attention": 2}  # HF's "store" layers of this target
    length = prompt.shape[1]
    kv = {kind: (out.shared_kv_states[kind][0].numpy().transpose(0, 2, 1, 3),
                 out.shared_kv_states[kind][1].numpy().transpose(0, 2, 1, 3),
                 np.arange(length, dtype=np.int32)[None]) for kind in layers}
    target_kv = TargetKV.dense(sliding=kv["sliding_attention"], full=kv["full_attention"])

    @jax.jit
    def run(target_state, assistant_state, token, hidden, target_kv, position):
        t = nnx.merge(target.graphdef, target_state)
        a = nnx.merge(ours.graphdef, assistant_state)
        return draft(a, t.embed_tokens, token, hidden, target_kv, position, num_tokens=k)

    drafts = run(target.state, ours.state, np.asarray(first[:, 0], np.int32), out.hidden_states[-1][:, -1].numpy(),
                 target_kv, np.array([length], np.int32))
    assert drafts.tokens.shape == (1, k) and drafts.logits.shape == (1, k, BASE_TEXT["vocab_size"])
    np.testing.assert_array_equal(np.asarray(drafts.tokens[0]), ref_tokens)
    for step in range(k):
        assert rel_err(drafts.logits[0, step], ref_logits[step]) <= TOL, step


# ----------------------------------------------------------------------------------------------------------------
# Loading: bf16, FP8 (compressed-tensors), errors


def test_bfloat16_load_drifts_no_more_than_hf(assistant):
    """bf16 weights from the same checkpoint: our drift from float32 is no larger than HF's bf16 run's (tiny random
    models amplify rounding a lot, so the bound is relative to HF's)."""
    import copy

    import torch
    from ml_dtypes import bfloat16

    hf, ours32 = assistant
    if not ours32.config.use_ordered_embeddings:
        pytest.skip("one variant is enough (the ordered one has every module)")
    ours16 = gemma4_jax.from_pretrained(ours32.path, dtype="bfloat16")
    assert isinstance(ours16, AssistantModel)
    dtypes = {v.get_value().dtype for p, v in flat_state(ours16.state).items() if "token_ordering" not in p}
    assert dtypes == {np.dtype(bfloat16)}
    rng = np.random.RandomState(3)
    target_kv, hf_kv = _target_kv(rng, [8], slots=10)
    # K/V as a bf16 target stores them: bf16 for ours16, their exact float32 values for the float32 runs.
    kv16 = jax.tree.map(lambda a: a.astype(bfloat16) if a.dtype == np.float32 else a, target_kv)
    kv32 = jax.tree.map(lambda a: a.astype(np.float32) if a.dtype == bfloat16 else a, kv16)
    hf_kv = {kind: tuple(x.astype(bfloat16).astype(np.float32) for x in rows[0]) for kind, rows in hf_kv.items()}
    e, h = rng.randn(1, D_TARGET).astype(bfloat16), rng.randn(1, D_TARGET).astype(bfloat16)
    ref, low = ours32.step(e, h, kv32, np.array([8])), ours16.step(e, h, kv16, np.array([8]))
    assert low.logits.dtype == np.float32 and low.hidden.dtype == np.dtype(bfloat16)
    hf32, _ = hf_assistant_step(hf, e[0], h[0], hf_kv, 8)
    hf16, _ = hf_assistant_step(copy.deepcopy(hf).to(torch.bfloat16), e[0], h[0], hf_kv, 8)
    assert rel_err(ref.logits[0], hf32) <= TOL
    print(f"\nbf16 drift: ours {rel_err(low.logits[0], hf32):.4f}, HF {rel_err(hf16, hf32):.4f}")
    assert rel_err(low.logits[0], hf32) < 1.25 * rel_err(hf16, hf32)


def _fp8_copy(src: str, dst: str) -> dict[str, np.ndarray]:
    """A compressed-tensors FP8 (per-channel, weights only) copy of an assistant checkpoint; returns the HF state
    dict with those weights dequantized (float32), the reference."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    file = os.path.join(dst, "model.safetensors")
    tensors, reference = load_file(file), {}
    for key in list(tensors):
        w = tensors[key]
        if key.endswith(("_proj.weight", "projection.weight")) and w.ndim == 2:
            scale = w.abs().amax(dim=1, keepdim=True) / 448.0
            q = (w / scale).to(torch.float8_e4m3fn)
            tensors[key], tensors[key[: -len("weight")] + "weight_scale"] = q, scale
            reference[key] = q.to(torch.float32) * scale
    save_file(tensors, file, metadata={"format": "pt"})
    weights = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}
    config = {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None}},
              "ignore": ["lm_head", "re:.*embed_tokens.*", "re:.*centroids.*"]}
    rewrite_config(dst, lambda d: d.update(quantization_config=config))
    return reference


def test_fp8_checkpoint_stays_packed_and_matches_hf_dequantized(assistant, tmp_path):
    hf, ours32 = assistant
    if ours32.config.use_ordered_embeddings:
        pytest.skip("one variant is enough (the head stays unquantized)")
    reference = _fp8_copy(ours32.path, str(tmp_path / "fp8"))
    packed = gemma4_jax.from_pretrained(str(tmp_path / "fp8"), dtype="float32")
    state = flat_state(packed.state)
    assert state["pre_projection.w"].dtype == np.dtype("float8_e4m3fn")
    assert state["layers.0.mlp.down_proj.w"].dtype == np.dtype("float8_e4m3fn")
    original = {k: v.clone() for k, v in hf.state_dict().items() if k in reference}
    try:
        hf.load_state_dict(reference, strict=False)
        rng = np.random.RandomState(4)
        target_kv, hf_kv = _target_kv(rng, [10], slots=12)
        e, h = rng.randn(D_TARGET).astype(np.float32), rng.randn(D_TARGET).astype(np.float32)
        ref_logits, _ = hf_assistant_step(hf, e, h, {kind: rows[0] for kind, rows in hf_kv.items()}, 10)
    finally:
        hf.load_state_dict(original, strict=False)
    out = packed.step(e[None], h[None], target_kv, np.array([10]))
    assert rel_err(out.logits[0], ref_logits) <= TOL


def test_token_ordering_must_be_a_permutation(assistant, tmp_path):
    import torch

    from gemma4_jax.checkpoint import CheckpointError
    from hf_reference import edit_safetensors

    _, ours = assistant
    if not ours.config.use_ordered_embeddings:
        pytest.skip("plain head")
    dst = str(tmp_path / "bad")
    shutil.copytree(ours.path, dst)
    edit_safetensors(dst, lambda t: {**t, "masked_embedding.token_ordering": torch.zeros_like(
        t["masked_embedding.token_ordering"])})
    with pytest.raises(CheckpointError, match="not a permutation"):
        gemma4_jax.from_pretrained(dst, dtype="float32")


def test_pipelined_assistant_refused(assistant):
    with pytest.raises(ConfigError, match="one pipeline stage"):
        gemma4_jax.from_pretrained(assistant[1].path, dtype="float32", pp=2)
    with pytest.raises(ConfigError, match="stage_meshes"):
        load_assistant(assistant[1].path, dtype="float32", mesh=sharding.make_mesh(pp=2, tp=1))


def test_tensor_parallel_equals_one_device(assistant):
    """tp=2 (query heads, MLP and the vocabulary split over two devices) drafts what one device drafts."""
    _, ours = assistant
    if not ours.config.use_ordered_embeddings:
        pytest.skip("one variant is enough (the ordered one has every module)")
    sharded = load_assistant(ours.path, dtype="float32", mesh=sharding.make_mesh(pp=1, tp=2, dp=1))
    kernel = sharded.state["layers"][0]["mlp"]["up_proj"]["kernel"].get_value()
    assert len(kernel.sharding.device_set) == 2
    rng = np.random.RandomState(6)
    positions = [13, 5, 1]
    target_kv, _ = _target_kv(rng, positions, slots=16)
    e, h = rng.randn(3, D_TARGET), rng.randn(3, D_TARGET)
    one, two = ours.step(e, h, target_kv, np.array(positions)), sharded.step(e, h, target_kv, np.array(positions))
    np.testing.assert_allclose(np.asarray(two.logits), np.asarray(one.logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(two.hidden), np.asarray(one.hidden), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Config validation


def _config(**text_overrides) -> dict:
    return {"model_type": "gemma4_assistant", "architectures": ["Gemma4AssistantForCausalLM"],
            "backbone_hidden_size": D_TARGET,
            "text_config": {"model_type": "gemma4_text", **BASE_ASSISTANT_TEXT, **text_overrides}}


def test_all_layers_read_the_target():
    for shared in (3, 0, None):  # HF turns 0 / absent into "all layers"
        cfg = ac.assistant_config_from_dict(_config(num_kv_shared_layers=shared))
        assert all(s.kv_sharing == "reuse" and s.kv_source_layer == ac.TARGET_KV_SOURCE for s in cfg.text.layers)
        assert cfg.text.kv_bytes_per_token() == 0 and not cfg.text.has_ple
    assert cfg.attention_types == ("sliding_attention", "full_attention")


# (text_config overrides, our message, whether HF's validate_architecture refuses it too)
BAD_TEXT = [
    (dict(hidden_size_per_layer_input=16), "hidden_size_per_layer_input must be 0", True),
    (dict(hidden_size_per_layer_input=None), r"hidden_size_per_layer_input must be 0.*absent", True),
    (dict(vocab_size_per_layer_input=384), "vocab_size_per_layer_input must be 0", True),
    (dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=8), "enable_moe_block", True),
    (dict(use_double_wide_mlp=True), "use_double_wide_mlp", True),
    (dict(num_kv_shared_layers=2), "all layers of an assistant must be KV-shared", True),
    (dict(final_logit_softcapping=30.0), "never soft-caps", False),
]


@pytest.mark.parametrize("overrides,message,hf_refuses", BAD_TEXT, ids=[m for _, m, _ in BAD_TEXT])
def test_bad_text_config(overrides, message, hf_refuses):
    d = _config(**overrides)
    d["text_config"] = {k: v for k, v in d["text_config"].items() if v is not None or k not in overrides}
    with pytest.raises(ConfigError, match=message):
        ac.assistant_config_from_dict(d)
    if hf_refuses:
        from transformers import Gemma4AssistantConfig

        with assistant_kv_sharing_patch(), pytest.raises(Exception, match="must be"):
            Gemma4AssistantConfig(**{k: v for k, v in d.items() if k not in ("model_type", "architectures")})


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(model_type="gemma4_unified_assistant"), "gemma4_unified"),
    (lambda d: d.update(architectures=["Gemma4ForCausalLM"]), "unknown assistant architecture"),
    (lambda d: d.pop("text_config"), "needs a 'text_config'"),
    (lambda d: d.update(backbone_hidden_size=0), "backbone_hidden_size"),
    (lambda d: d.update(use_ordered_embeddings=True, num_centroids=5), "num_centroids"),
    (lambda d: d.update(use_ordered_embeddings=True, num_centroids=8, centroid_intermediate_top_k=9),
     "centroid_intermediate_top_k"),
])
def test_bad_outer_config(change, message):
    d = _config()
    change(d)
    with pytest.raises(ConfigError, match=message):
        ac.assistant_config_from_dict(d)


def test_assistant_config_is_not_a_model_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_config()))
    with pytest.raises(ConfigError, match="MTP assistant"):
        gemma4_jax.load_config(tmp_path)
    assert ac.load_assistant_config(tmp_path).backbone_hidden_size == D_TARGET


@pytest.mark.parametrize("target_overrides,message", [
    (dict(hidden_size=128), "backbone_hidden_size=64 but the target's hidden_size is 128"),
    (dict(vocab_size=400, vocab_size_per_layer_input=400), "vocab_size"),
    (dict(num_key_value_heads=1), "1 KV heads"),
    (dict(global_head_dim=64), "head_dim 32"),
])
def test_target_mismatch(target_overrides, message):
    from hf_reference import text_config

    target = gemma4_jax.config.config_from_dict({"model_type": "gemma4_text", **text_config(**target_overrides)})
    with pytest.raises(ConfigError, match=message):
        ac.check_target(ac.assistant_config_from_dict(_config()), target.text)


# ----------------------------------------------------------------------------------------------------------------
# The real assistants through eval_shape

# Parameter counts (token_ordering included); the model cards say 78M, 78.8M, ~0.4B and ~0.5B. `tiny-assistant`
# drafts for the `tiny` text preset.
EXPECTED = {"e2b-assistant": 77_993_476, "e4b-assistant": 78_779_908, "26b-a4b-assistant": 419_711_236,
            "31b-assistant": 469_518_596, "tiny-assistant": 58_996}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_real_assistants_eval_shape(name):
    _, state = abstract_assistant(name, dtype="bfloat16")
    flat = flat_state(state)
    assert all(isinstance(v.get_value(), jax.ShapeDtypeStruct) for v in flat.values())  # no memory used
    total = sum(int(np.prod(v.shape)) for v in flat.values())
    print(f"\n{name}: {total / 1e6:.1f}M parameters")
    assert total == EXPECTED[name]
    cfg = ac.assistant_preset(name)
    ac.check_target(cfg, preset(ac.ASSISTANT_TARGETS[name]).text)
    d, backbone = cfg.text.hidden_size, cfg.backbone_hidden_size
    assert flat["pre_projection.kernel"].shape == (2 * backbone, d)
    assert flat["post_projection.kernel"].shape == (d, backbone)
    assert ("masked_embedding.centroids.kernel" in flat) == cfg.use_ordered_embeddings
    real = {"e2b-assistant": (256, True), "e4b-assistant": (256, True), "26b-a4b-assistant": (1024, False),
            "31b-assistant": (1024, False)}
    if name in real:  # E2B/E4B: hidden 256, 2048 centroids, top 32; 26B-A4B/31B: hidden 1024, plain head
        assert (d, cfg.use_ordered_embeddings) == real[name]
        assert not cfg.use_ordered_embeddings or (cfg.num_centroids, cfg.centroid_intermediate_top_k) == (2048, 32)
    if cfg.use_ordered_embeddings:
        assert flat["masked_embedding.centroids.kernel"].shape == (d, cfg.num_centroids)
        assert flat["masked_embedding.token_ordering"].shape == (cfg.text.vocab_size,)
    assert not any("k_proj" in p or "v_proj" in p for p in flat)  # every layer reads the target's K/V
