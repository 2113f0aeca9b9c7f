"""MoE checkpoint layouts: HF fused experts and per-expert tensors (`experts.<e>.{gate,up,down}_proj.weight`, as the
quantization tools write them) under both prefixes; dense models never touch the expert path; the expert memory of
the 26B-A4B preset with NVFP4 experts (jax.eval_shape, no memory)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import gemma4_jax
from gemma4_jax import checkpoint, quant
from helpers import MOE_K_EQ_V, THREE_LAYERS, TWO_LAYERS, flat_state, random_ids
from hf_reference import edit_safetensors, hf_logits, make_text_checkpoint, rel_err

TOL = 5e-4
MOE = dict(MOE_K_EQ_V, **THREE_LAYERS, num_experts=6)


def _split_experts(path: str, drop: str | None = None, keep_fused_layer: int | None = None,
                   infix: str = "") -> None:
    """Rewrite a checkpoint's fused experts as per-expert tensors (optionally under `moe.`/`mlp.`, minus `drop`)."""
    edit_safetensors(path, lambda tensors: _per_expert(tensors, drop, keep_fused_layer, infix))


def _per_expert(tensors, drop, keep_fused_layer, infix):
    out = {}
    for key, value in tensors.items():
        layer_fused = key.endswith(("experts.gate_up_proj", "experts.down_proj"))
        if layer_fused and keep_fused_layer is not None and f"layers.{keep_fused_layer}." in key:
            out[key] = value
        if key.endswith("experts.gate_up_proj"):
            stem, half = key[: -len("experts.gate_up_proj")] + infix + "experts.", value.shape[1] // 2
            for e in range(value.shape[0]):
                out[f"{stem}{e}.gate_proj.weight"] = value[e, :half].clone()
                out[f"{stem}{e}.up_proj.weight"] = value[e, half:].clone()
        elif key.endswith("experts.down_proj"):
            stem = key[: -len("experts.down_proj")] + infix + "experts."
            for e in range(value.shape[0]):
                out[f"{stem}{e}.down_proj.weight"] = value[e].clone()
        else:
            out[key] = value
    if drop:
        del out[drop]
    return out


@pytest.fixture(scope="module")
def fused(tiny_checkpoint):
    return tiny_checkpoint("moe_fused", seed=21, **MOE)


@pytest.mark.parametrize("wrapper,infix", [(False, ""), (True, ""), (False, "moe.")])
def test_per_expert_equals_fused(fused, tiny_checkpoint, tmp_path, wrapper, infix):
    """Per-expert tensors load to exactly the fused stacks, under model. and model.language_model."""
    path, hf_model = fused
    ids = random_ids(2, 20)
    if wrapper:
        path, hf_model = tiny_checkpoint("moe_wrapped_fused", seed=22, multimodal_wrapper=True, **MOE)
    split = str(tmp_path / "split")
    import shutil

    shutil.copytree(path, split)
    _split_experts(split, infix=infix)
    fused_model = gemma4_jax.from_pretrained(path, dtype="float32")
    split_model = gemma4_jax.from_pretrained(split, dtype="float32")
    a = dict(nnx.to_flat_state(fused_model.state))
    b = dict(nnx.to_flat_state(split_model.state))
    assert a.keys() == b.keys()
    for p in a:
        np.testing.assert_array_equal(np.asarray(a[p][...]), np.asarray(b[p][...]), err_msg=str(p))
    logits = np.asarray(split_model.logits(ids))
    np.testing.assert_array_equal(logits, np.asarray(fused_model.logits(ids)))
    assert rel_err(logits, hf_logits(hf_model, ids)) <= TOL


def test_missing_expert_is_named(fused, tmp_path):
    import shutil

    split = str(tmp_path / "missing")
    shutil.copytree(fused[0], split)
    _split_experts(split, drop="model.layers.1.experts.4.up_proj.weight")
    with pytest.raises(checkpoint.CheckpointError, match=r"missing tensor\(s\): model\.layers\.1\.experts\.4\.up_proj"):
        gemma4_jax.from_pretrained(split, dtype="float32")


def test_fused_and_per_expert_together_fail(fused, tmp_path):
    import shutil

    split = str(tmp_path / "both")
    shutil.copytree(fused[0], split)
    _split_experts(split, keep_fused_layer=0)
    with pytest.raises(checkpoint.CheckpointError, match=r"layers\.0\.moe\.experts\.\w+_proj.*already fills"):
        gemma4_jax.from_pretrained(split, dtype="float32")


def test_dense_model_never_touches_the_expert_path(tmp_path):
    """A dense checkpoint: empty plan, plain Linear/MLP modules; stray expert tensors are unexpected; a MoE backend
    that needs experts is refused."""
    path = str(tmp_path / "dense")
    make_text_checkpoint(path, seed=23, **TWO_LAYERS)
    cfg = gemma4_jax.load_config(path)
    assert checkpoint.quant_plan(path, cfg) == quant.QuantPlan()
    model = gemma4_jax.from_pretrained(path, dtype="float32")
    assert not any("moe" in name for name in flat_state(model.state))
    with pytest.raises(quant.QuantizationError, match="needs a model with MoE experts; this model has none"):
        gemma4_jax.from_pretrained(path, dtype="float32", moe_backend="fp4_pallas")
    def add_stray_expert(tensors):
        tensors["model.layers.0.experts.0.gate_proj.weight"] = tensors["model.layers.0.mlp.gate_proj.weight"].clone()
        return tensors

    edit_safetensors(path, add_stray_expert)
    with pytest.raises(checkpoint.CheckpointError, match=r"unexpected tensor\(s\): model\.layers\.0\.experts\.0"):
        gemma4_jax.from_pretrained(path, dtype="float32")


def test_bf16_moe_backend_choices(fused):
    path = fused[0]
    assert gemma4_jax.from_pretrained(path, dtype="float32", moe_backend="xla").module.layers[0].moe.experts.backend \
        == "xla"
    with pytest.raises(quant.QuantizationError, match=r"needs NVFP4 experts; this checkpoint's experts are "
                                                      r"bf16/float \(unquantized\)\. Valid for it: \['auto', 'xla'\]"):
        gemma4_jax.from_pretrained(path, dtype="float32", moe_backend="fp4_pallas")
    with pytest.raises(quant.QuantizationError, match="moe_backend 'cuda' is unknown"):
        gemma4_jax.from_config("tiny", moe_backend="cuda")


def test_auto_backend_picks_the_kernel_on_gpu_for_nvfp4_only():
    assert quant.resolve_moe_backend("auto", True, {"nvfp4"}, platform="gpu") == "fp4_pallas"
    assert quant.resolve_moe_backend("auto", True, {"nvfp4"}, platform="cpu") == "xla"
    assert quant.resolve_moe_backend("auto", True, {"fp8"}, platform="gpu") == "xla"
    assert quant.resolve_moe_backend("auto", True, {None}, platform="gpu") == "xla"
    assert quant.resolve_moe_backend("auto", True, {"nvfp4", None}, platform="gpu") == "xla"
    assert quant.resolve_moe_backend("fp4_pallas", True, {"nvfp4"}, platform="cpu") == "fp4_pallas"


def test_26b_a4b_nvfp4_expert_bytes():
    """The real 26B-A4B with NVFP4 experts keeps ~0.56 byte per expert weight (and no bf16 expert copy)."""
    cfg = gemma4_jax.config.preset("26b-a4b")
    text = cfg.text
    _, state = gemma4_jax.abstract_model(cfg, "bfloat16", quant.QuantPlan.experts_only(text.num_hidden_layers))
    flat = flat_state(state)
    experts = {p: v for p, v in flat.items() if ".moe.experts." in p}
    assert experts and all(isinstance(v.get_value(), jax.ShapeDtypeStruct) for v in experts.values())
    weights = text.num_hidden_layers * text.num_experts * 3 * text.moe_intermediate_size * text.hidden_size
    nbytes = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in experts.values())
    assert 0.56 <= nbytes / weights < 0.566, nbytes / weights  # 0.5 + 1/16 + f32 row scales (0.003)
    assert {str(v.dtype) for v in experts.values()} == {"uint8", "float8_e4m3fn", "float32"}
