"""Quantized checkpoints made by the real tools (tests/fixtures/quant, see make_fixtures.py there): ModelOpt NVFP4
(experts only; experts + attention + dense MLP), llmcompressor FP8_DYNAMIC and compressed-tensors NVFP4A16.

Reference: HF transformers' model (float32) on the same checkpoint, its weights dequantized by the independent numpy
code below (E2M1 decoded from the bits; scales read through torch), since transformers 5.23 cannot load per-expert
quantized Gemma 4 experts itself. Our side keeps the weights packed. Tolerance as in test_parity_text.py.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gemma4_jax
from gemma4_jax import checkpoint, quant
from helpers import flat_state, random_ids
from hf_reference import edit_safetensors, hf_greedy, hf_logits, rel_err, rewrite_config, rewrite_json

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "quant")
NAMES = ("modelopt_nvfp4_experts", "modelopt_nvfp4_all", "ct_fp8_dynamic", "ct_nvfp4a16")
TOL = 5e-4
VOCAB = 128
_QUANT_LEAVES = ("weight_packed", "weight_scale_2", "weight_scale", "weight_global_scale", "input_scale", "weight")


# ----------------------------------------------------------------------------------------------------------------
# Independent dequantization (numpy from the bits; torch reads the files)


def e2m1_from_bits(codes: np.ndarray) -> np.ndarray:
    """E2M1: sign bit 3, exponent bits 2-1 (bias 1, 0 = subnormal), mantissa bit 0."""
    codes = codes.astype(np.int64)
    exponent, mantissa = (codes >> 1) & 3, codes & 1
    magnitude = np.where(exponent == 0, 0.5 * mantissa, (1.0 + 0.5 * mantissa) * 2.0 ** (exponent - 1))
    return np.where(codes & 8, -magnitude, magnitude)


def nvfp4_numpy(packed: np.ndarray, block_scale: np.ndarray, scale: float, low_first: bool = True) -> np.ndarray:
    """(out, in/2) uint8 + (out, in/16) float scales + per-tensor scale -> float32 (out, in)."""
    first, second = (packed & 0x0F, packed >> 4) if low_first else (packed >> 4, packed & 0x0F)
    values = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.float64)
    values[..., 0::2] = e2m1_from_bits(first)
    values[..., 1::2] = e2m1_from_bits(second)
    blocks = np.repeat(block_scale.astype(np.float64), 16, axis=-1)
    return (values * blocks * scale).astype(np.float32)


def _scalar(t: np.ndarray) -> float:
    return float(np.asarray(t).reshape(()))


def read_tensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint as numpy (float8 through torch's own float conversion)."""
    import torch
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            for key, t in load_file(os.path.join(path, name)).items():
                out[key] = t.numpy() if t.dtype == torch.uint8 else t.to(torch.float64).numpy()
    return out


def dequantized_state(path: str) -> dict[str, np.ndarray]:
    """HF state dict (fused experts) with every quantized weight dequantized in float64 -> float32."""
    tensors = read_tensors(path)
    modules: dict[str, dict[str, np.ndarray]] = {}
    plain = {}
    for key, t in tensors.items():
        for leaf in _QUANT_LEAVES:
            if key.endswith("." + leaf):
                modules.setdefault(key[: -len(leaf) - 1], {})[leaf] = t
                break
        else:
            plain[key] = t.astype(np.float32)
    experts: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for base, leaves in modules.items():
        if "weight_packed" in leaves:
            scale = 1.0 / _scalar(leaves["weight_global_scale"])  # compressed-tensors stores the reciprocal
            w = nvfp4_numpy(leaves["weight_packed"], leaves["weight_scale"], scale)
        elif "weight_scale_2" in leaves:
            w = nvfp4_numpy(leaves["weight"], leaves["weight_scale"], _scalar(leaves["weight_scale_2"]))
        elif "weight_scale" in leaves:
            w = (leaves["weight"] * leaves["weight_scale"].reshape(-1, 1)).astype(np.float32)
        else:
            w = leaves["weight"].astype(np.float32)
        parts = base.split(".")
        if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
            i = parts.index("experts")
            stem, e, proj = ".".join(parts[: i + 1]), int(parts[i + 1]), parts[i + 2]
            experts.setdefault(stem, {}).setdefault(e, {})[proj] = w
        else:
            plain[base + ".weight"] = w
    for stem, by_expert in experts.items():
        order = sorted(by_expert)
        plain[stem + ".gate_up_proj"] = np.stack(
            [np.concatenate([by_expert[e]["gate_proj"], by_expert[e]["up_proj"]]) for e in order])
        plain[stem + ".down_proj"] = np.stack([by_expert[e]["down_proj"] for e in order])
    return plain


def hf_dequantized_model(path: str):
    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    with open(os.path.join(path, "config.json")) as f:
        d = json.load(f)
    d.pop("quantization_config", None)
    model = Gemma4ForCausalLM(Gemma4TextConfig.from_dict(d)).float().eval()
    model.config._attn_implementation = "eager"
    state = {k: torch.from_numpy(v) for k, v in dequantized_state(path).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    return model


@pytest.fixture(scope="module")
def hf_models():
    return {name: hf_dequantized_model(os.path.join(FIXTURES, name)) for name in NAMES}


@pytest.fixture(scope="module")
def ours():
    return {name: gemma4_jax.from_pretrained(os.path.join(FIXTURES, name), dtype="float32") for name in NAMES}


# ----------------------------------------------------------------------------------------------------------------
# The reference itself


@pytest.mark.parametrize("name", NAMES)
def test_reference_dequantization_recovers_the_quantized_weights(name):
    """The numpy dequantization lands near the weights the tool quantized; a swapped nibble order does not."""
    path = os.path.join(FIXTURES, name)
    originals = dict(np.load(os.path.join(path, "originals.npz")))
    state = dequantized_state(path)
    tensors = read_tensors(path)
    checked = 0
    for key, original in originals.items():
        ours_w = state[key][1] if "experts" in key else state[key][:16]
        err = rel_err(ours_w, original)
        quantized = not np.array_equal(ours_w, original)
        assert err < (0.2 if quantized else 1e-7), f"{name} {key}: dequantized weight off by {err:.3f}"
        checked += quantized
    assert checked >= 2, f"{name}: too few quantized samples"
    gate = "model.layers.0.experts.1.gate_proj"
    packed = tensors.get(gate + ".weight", tensors.get(gate + ".weight_packed"))
    if packed.dtype == np.uint8:
        scale = (_scalar(tensors[gate + ".weight_scale_2"]) if gate + ".weight_scale_2" in tensors
                 else 1.0 / _scalar(tensors[gate + ".weight_global_scale"]))
        swapped = nvfp4_numpy(packed, tensors[gate + ".weight_scale"], scale, low_first=False)
        assert rel_err(swapped, originals["model.layers.0.experts.gate_up_proj"][:32]) > 0.6


# ----------------------------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_hf_dequantized(name, hf_models, ours):
    ids = random_ids(2, 24, vocab=VOCAB)
    ref = hf_logits(hf_models[name], ids)
    got = np.asarray(ours[name].logits(ids))
    err = rel_err(got, ref)
    assert err <= TOL, f"{name}: relative logits error {err:.2e} > {TOL}"
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_plans_follow_the_tensors(ours):
    """Each fixture quantizes what its tool quantized, and keys-as-values layers have no v_proj at all."""
    plans = {n: checkpoint.quant_plan(os.path.join(FIXTURES, n), ours[n].config) for n in NAMES}
    assert plans["modelopt_nvfp4_experts"].linears == ()
    assert plans["modelopt_nvfp4_experts"].experts == ((0, "nvfp4"), (1, "nvfp4"), (2, "nvfp4"))
    all_linears = dict(plans["modelopt_nvfp4_all"].linears)
    assert set(all_linears.values()) == {"nvfp4"}
    assert "layers.0.self_attn.v_proj" in all_linears and "layers.2.self_attn.v_proj" not in all_linears
    assert {"layers.2.self_attn.q_proj", "layers.2.self_attn.k_proj", "layers.2.self_attn.o_proj",
            "layers.1.mlp.down_proj"} <= set(all_linears)
    assert all(not p.endswith("router.proj") for p in all_linears)
    fp8 = plans["ct_fp8_dynamic"]
    assert set(dict(fp8.linears).values()) == {"fp8"} and dict(fp8.experts) == {0: "fp8", 1: "fp8", 2: "fp8"}
    ct4 = plans["ct_nvfp4a16"]
    assert ct4.config.method == "compressed-tensors" and ct4.config.formats == ("nvfp4",)
    assert {p.split(".")[2] for p, _ in ct4.linears} == {"mlp"}
    for n in ("modelopt_nvfp4_experts", "modelopt_nvfp4_all", "ct_fp8_dynamic"):
        paths = set(flat_state(ours[n].state))
        assert not any(p.startswith("layers.2.self_attn.v_proj") for p in paths)


def test_packed_state_dtypes_and_bytes(ours):
    """Experts and linears stay packed: uint8 codes, e4m3 block scales, f32 row scales; no float expert copy."""
    model = ours["modelopt_nvfp4_all"]
    cfg = model.config.text
    e, d, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    flat = flat_state(model.state)
    want = {
        "layers.0.moe.experts.gate_up.w": ((e, 2 * i, d // 2), np.uint8),
        "layers.0.moe.experts.gate_up.block_scale": ((e, 2 * i, d // 16), jax.numpy.float8_e4m3fn),
        "layers.0.moe.experts.gate_up.row_scale": ((e, 2 * i), np.float32),
        "layers.0.moe.experts.down.w": ((e, d, i // 2), np.uint8),
        "layers.0.moe.experts.down.block_scale": ((e, d, i // 16), jax.numpy.float8_e4m3fn),
        "layers.0.moe.experts.down.row_scale": ((e, d), np.float32),
        "layers.2.self_attn.q_proj.w": ((4 * 32, d // 2), np.uint8),
        "layers.2.self_attn.o_proj.block_scale": ((d, 4 * 32 // 16), jax.numpy.float8_e4m3fn),
    }
    for path, (shape, dtype) in want.items():
        arr = flat[path][...]
        assert arr.shape == shape and arr.dtype == np.dtype(dtype), (path, arr.shape, arr.dtype)
        assert isinstance(arr, jax.Array)
    assert not any("gate_up_proj" in p or p.endswith("q_proj.kernel") for p in flat)
    expert_bytes = sum(v[...].nbytes for p, v in flat.items() if p.startswith("layers.0.moe.experts."))
    weights = 3 * e * i * d
    per_weight = expert_bytes / weights
    # 4 bits + one e4m3 per 16 + one f32 row scale per output row (2I gate/up rows, D down rows per expert)
    assert per_weight == pytest.approx(0.5 + 1 / 16 + 4 * e * (2 * i + d) / weights, rel=1e-12)
    fp8 = flat_state(ours["ct_fp8_dynamic"].state)
    assert fp8["layers.0.moe.experts.gate_up.w"][...].dtype == np.dtype(jax.numpy.float8_e4m3fn)
    assert fp8["layers.0.moe.experts.gate_up.row_scale"][...].shape == (e, 2 * i)
    assert fp8["layers.0.mlp.down_proj.w"][...].shape == (d, cfg.intermediate_size)


@pytest.mark.slow
def test_bfloat16_model_drifts_no_more_than_hf(ours, hf_models):
    """The bf16 path (block-scaled values exact in bf16, row scale applied in f32 to the output) drifts from float32
    no more than HF's bf16 run of the dequantized weights (tiny random models amplify rounding a lot)."""
    import copy

    import torch

    path = os.path.join(FIXTURES, "modelopt_nvfp4_all")
    ids = random_ids(1, 16, seed=3, vocab=VOCAB)
    f32 = np.asarray(ours["modelopt_nvfp4_all"].logits(ids))
    model = gemma4_jax.from_pretrained(path, dtype="bfloat16")
    assert model.module.layers[0].moe.router.proj.kernel[...].dtype == jax.numpy.bfloat16
    bf16 = np.asarray(model.logits(ids))
    hf_bf16 = hf_logits(copy.deepcopy(hf_models["modelopt_nvfp4_all"]).to(torch.bfloat16), ids)
    assert rel_err(bf16, f32) < 1.25 * rel_err(hf_bf16, f32)


@pytest.mark.slow
def test_fp4_pallas_backend_matches_xla(ours):
    """The explicit kernel backend (interpret mode on CPU) gives the XLA path's logits."""
    path = os.path.join(FIXTURES, "modelopt_nvfp4_experts")
    kernel = gemma4_jax.from_pretrained(path, dtype="float32", moe_backend="fp4_pallas")
    assert kernel.module.layers[0].moe.experts.backend == "fp4_pallas"
    assert ours["modelopt_nvfp4_experts"].module.layers[0].moe.experts.backend == "xla"  # auto on CPU
    ids = random_ids(1, 12, seed=4, vocab=VOCAB)
    assert rel_err(kernel.logits(ids), ours["modelopt_nvfp4_experts"].logits(ids)) < 1e-5


@pytest.mark.slow
def test_greedy_generation_matches_hf(hf_models):
    """The engine on a packed NVFP4 checkpoint generates HF's greedy tokens (dequantized reference)."""
    name = "modelopt_nvfp4_all"
    llm = gemma4_jax.LLM(os.path.join(FIXTURES, name), dtype="float32", max_num_seqs=2, max_model_len=64,
                         num_pages=16, page_size=8, moe_backend="xla")
    prompts = [list(map(int, row)) for row in random_ids(2, 10, seed=5, vocab=VOCAB)]
    outs = llm.generate(prompts, gemma4_jax.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ref = hf_greedy(hf_models[name], prompt, 8, ban_eos=False, eos_token_id=None, pad_token_id=0)
        assert list(out.token_ids) == ref


# ----------------------------------------------------------------------------------------------------------------
# Gate and up with their own weight_scale_2


def _rewrite(src: str, dst: str, edit) -> None:
    """Copy a checkpoint, editing its tensors: edit(dict of torch tensors) -> dict."""
    shutil.copytree(src, dst)
    edit_safetensors(dst, edit)
    index = os.path.join(dst, "model.safetensors.index.json")
    if os.path.exists(index):
        os.remove(index)


def test_gate_and_up_keep_their_own_scales(tmp_path):
    """ModelOpt may give an expert's gate and up different weight_scale_2: both survive (per-row scales).

    Made from the real fixture by scaling each gate's weight_scale_2 by 3 and each up's by 0.5 (the reference
    dequantizes the edited file, so parity holds only if each half keeps its own scale)."""
    import torch

    def edit(tensors):
        for key in list(tensors):
            if key.endswith("gate_proj.weight_scale_2") and ".experts." in key:
                tensors[key] = tensors[key] * 3.0
            elif key.endswith("up_proj.weight_scale_2") and ".experts." in key:
                tensors[key] = tensors[key] * torch.tensor(0.5)
        return tensors

    dst = str(tmp_path / "distinct")
    _rewrite(os.path.join(FIXTURES, "modelopt_nvfp4_experts"), dst, edit)
    ids = random_ids(2, 16, seed=6, vocab=VOCAB)
    ref = hf_logits(hf_dequantized_model(dst), ids)
    got = np.asarray(gemma4_jax.from_pretrained(dst, dtype="float32").logits(ids))
    assert rel_err(got, ref) <= TOL


# ----------------------------------------------------------------------------------------------------------------
# Errors


def test_missing_scale_is_named(tmp_path):
    dst = str(tmp_path / "missing")
    gone = "model.layers.1.experts.5.up_proj.weight_scale_2"
    _rewrite(os.path.join(FIXTURES, "modelopt_nvfp4_experts"), dst, lambda t: {k: v for k, v in t.items() if k != gone})
    with pytest.raises(checkpoint.CheckpointError, match=gone.replace(".", r"\.")):
        gemma4_jax.from_pretrained(dst, dtype="float32")


def test_wrong_packed_shape_is_named(tmp_path):
    import torch

    key = "model.layers.0.self_attn.q_proj.weight"

    def edit(tensors):
        tensors[key] = torch.zeros((64, 64), dtype=torch.uint8)  # unpacked width: one value per byte
        return tensors

    dst = str(tmp_path / "badshape")
    _rewrite(os.path.join(FIXTURES, "modelopt_nvfp4_all"), dst, edit)
    with pytest.raises(checkpoint.CheckpointError, match=rf"{key.replace('.', '[.]')}: checkpoint shape \(64, 64\), "
                       r"expected \(64, 32\) \(NVFP4 packs two E2M1 values per byte\)"):
        gemma4_jax.from_pretrained(dst, dtype="float32")


def test_wrong_scale_dtype_is_named(tmp_path):
    import torch

    key = "model.layers.2.experts.0.down_proj.weight_scale"

    def edit(tensors):
        tensors[key] = tensors[key].to(torch.bfloat16)
        return tensors

    dst = str(tmp_path / "baddtype")
    _rewrite(os.path.join(FIXTURES, "modelopt_nvfp4_experts"), dst, edit)
    with pytest.raises(checkpoint.CheckpointError, match=rf"{key.replace('.', '[.]')}: dtype BF16, expected F8_E4M3"):
        gemma4_jax.from_pretrained(dst, dtype="float32")


def test_quantized_tensors_without_config_fail(tmp_path):
    dst = str(tmp_path / "noconfig")
    shutil.copytree(os.path.join(FIXTURES, "ct_fp8_dynamic"), dst)
    rewrite_config(dst, lambda d: d.pop("quantization_config"))
    with pytest.raises(checkpoint.CheckpointError, match="no quantization_config"):
        gemma4_jax.from_pretrained(dst, dtype="float32")


def test_tensors_contradicting_the_config_fail(tmp_path):
    dst = str(tmp_path / "excluded")
    shutil.copytree(os.path.join(FIXTURES, "modelopt_nvfp4_experts"), dst)
    quant_config = os.path.join(dst, "hf_quant_config.json")
    rewrite_json(quant_config, lambda d: d["quantization"]["exclude_modules"].append("model.layers.1.experts*"))
    with pytest.raises(checkpoint.CheckpointError, match=r"model\.layers\.1\.experts\.\d\.\w+_proj.*excludes them"):
        gemma4_jax.from_pretrained(dst, dtype="float32")
    rewrite_json(quant_config, lambda d: d["quantization"].update(quant_algo="INT4_AWQ"))
    with pytest.raises(quant.QuantizationError, match="quant_algo 'INT4_AWQ' is not supported"):
        gemma4_jax.from_pretrained(dst, dtype="float32")


@pytest.mark.parametrize(
    "name,backend,message",
    [
        ("modelopt_nvfp4_experts", "triton",
         r"moe_backend 'triton' is unknown; valid: \['auto', 'xla', 'fp4_pallas'\]"),
        ("ct_fp8_dynamic", "fp4_pallas", r"needs NVFP4 experts; this checkpoint's experts are fp8\. Valid for it: "
                                         r"\['auto', 'xla'\]"),
    ],
)
def test_moe_backend_validated_at_start_up(name, backend, message):
    with pytest.raises(quant.QuantizationError, match=message):
        gemma4_jax.from_pretrained(os.path.join(FIXTURES, name), dtype="float32", moe_backend=backend)
    with pytest.raises(quant.QuantizationError, match=message):
        gemma4_jax.LLM(os.path.join(FIXTURES, name), dtype="float32", moe_backend=backend)


@pytest.mark.parametrize("layout", [dict(tp=2), dict(pp=2)])
def test_packed_weights_shard_like_bf16(layout):
    """Packed experts and linears follow the same rules table: tp splits experts (expert parallel) and the
    packed arrays stay packed on each device; pp gives each stage its own layers. Logits equal one device."""
    path = os.path.join(FIXTURES, "modelopt_nvfp4_all")
    ids = random_ids(2, 24, vocab=VOCAB)
    one = np.asarray(gemma4_jax.from_pretrained(path, dtype="float32").logits(ids))
    model = gemma4_jax.from_pretrained(path, dtype="float32", **layout)
    assert rel_err(np.asarray(model.logits(ids)), one) <= 3e-5
    if "tp" in layout:
        flat = dict(nnx.to_flat_state(model.state))
        packed = [(p, v) for p, v in flat.items() if "experts" in map(str, p) and str(p[-1]) == "w"]
        assert packed, "no packed expert weights found"
        for path_, var in packed:
            arr = var.get_value()
            assert arr.dtype == np.uint8
            shard = arr.addressable_shards[0].data.shape
            assert shard[0] == arr.shape[0] // 2, f"{path_}: experts not split over tp ({shard} of {arr.shape})"


@pytest.mark.parametrize("fmt", [quant.NVFP4, quant.FP8])
def test_xla_experts_with_fewer_rows_than_experts_unpack_only_the_used_ones(fmt):
    """Decode-sized calls (M rows < E experts) unpack only the experts that hold rows: the same values as a
    per-row matmul against each row's expert (empty experts, uneven groups, padding rows past the sum)."""
    rng = np.random.default_rng(1)
    groups, k, n = 16, 32, 24
    sizes = np.zeros(groups, np.int32)
    sizes[[2, 3, 9, 15]] = [3, 1, 4, 2]
    m = int(sizes.sum()) + 2  # 12 rows < 16 experts; two padding rows
    rows = rng.standard_normal((m, k)).astype(np.float32)
    if fmt == quant.NVFP4:
        w = rng.integers(0, 256, (groups, n, k // 2), dtype=np.uint8)
        block_scale = (rng.uniform(0.5, 1.5, (groups, n, k // 16)) * 0.1).astype(jnp.float8_e4m3fn)
    else:
        w, block_scale = rng.uniform(-2, 2, (groups, n, k)).astype(jnp.float8_e4m3fn), None
    row_scale = rng.uniform(0.5, 2.0, (groups, n)).astype(np.float32)
    ids = np.concatenate([np.repeat(np.arange(groups), sizes), np.full(2, groups - 1)]).astype(np.int32)
    got = np.asarray(quant.grouped_matmul(fmt, rows, w, block_scale, row_scale, sizes, ids, "xla"))
    values = np.asarray(quant.weight_values(fmt, w, block_scale, jnp.float32))  # (E, N, K)
    want = np.zeros((m, n), np.float32)
    for r in range(int(sizes.sum())):
        want[r] = (values[ids[r]] @ rows[r]) * row_scale[ids[r]]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
