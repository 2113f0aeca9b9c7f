"""`gemma4-jax convert` (Hugging Face -> orbax) and loading a converted directory with from_pretrained.

A converted directory must give exactly the parameters (values, dtypes, shardings) and logits that loading the
Hugging Face directory gives, in any (pp, tp) layout, whatever layout the conversion ran with; quantized weights
stay packed; broken directories fail naming the file.
"""

import glob
import json
import os
import shutil

import numpy as np
import pytest

import gemma4_jax
from gemma4_jax import cli, orbax_io
from gemma4_jax.checkpoint import CheckpointError
from helpers import MOE_K_EQ_V, PLE_KVSHARE_SOFTCAP, THREE_LAYERS, flat_state, random_ids
from hf_reference import hf_logits, make_text_checkpoint, rel_err, rewrite_config, rewrite_json

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "quant")
MOE = dict(MOE_K_EQ_V, **THREE_LAYERS, num_experts=4)


def _convert(src, out, *extra):
    return cli.main(["convert", "--model", str(src), "--output", str(out), *extra])


def _flat(model):
    return {name: v.get_value() for name, v in flat_state(model.state).items()}


def _assert_same_state(ours, ref):
    """Same parameter set, and every array equal in value, dtype and sharding."""
    a, b = _flat(ours), _flat(ref)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].sharding == b[name].sharding, name
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_text")
    src, out = root / "hf", root / "converted"
    hf_model = make_text_checkpoint(str(src), seed=61, **PLE_KVSHARE_SOFTCAP)
    (src / "tokenizer.json").write_text("{}")  # copied unchanged, whatever it holds
    (src / "chat_template.jinja").write_text("{{ messages }}")
    assert _convert(src, out, "--dtype", "float32") == 0
    return src, out, hf_model


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_moe")
    src, out = root / "hf", root / "converted"
    make_text_checkpoint(str(src), seed=62, **MOE)
    # Converted while laid out over 2 stages x 2 tensor-parallel devices; read back in other layouts below.
    assert _convert(src, out, "--dtype", "float32", "--pp", "2", "--tp", "2") == 0
    return src, out


def test_output_layout_and_metadata(text):
    src, out, _ = text
    names = set(os.listdir(out))
    assert {orbax_io.METADATA_FILE, orbax_io.PARAMS_DIR, "config.json", "tokenizer.json", "chat_template.jinja",
            "generation_config.json"} <= names
    assert not any(n.endswith(".safetensors") for n in names)
    assert not glob.glob(str(out.parent / f".{out.name}.converting-*")), "temporary directory left behind"
    meta = json.loads((out / orbax_io.METADATA_FILE).read_text())
    assert meta["format"] == orbax_io.FORMAT and meta["format_version"] == orbax_io.FORMAT_VERSION
    assert meta["dtype"] == "float32" and meta["source"] == str(src)
    assert meta["quant_plan"] == {"linears": [], "experts": [], "config_source": None}
    ref = gemma4_jax.from_pretrained(src, dtype="float32")
    assert meta["parameters"] == {k: {"shape": list(v.shape), "dtype": v.dtype.name} for k, v in _flat(ref).items()}


def test_converted_logits_equal_the_hf_directory(text):
    src, out, hf_model = text
    ids = random_ids()
    ref = gemma4_jax.from_pretrained(src, dtype="float32")
    model = gemma4_jax.from_pretrained(out, dtype="float32")
    assert model.path == str(out)
    _assert_same_state(model, ref)
    logits = np.asarray(model.logits(ids))
    np.testing.assert_array_equal(logits, np.asarray(ref.logits(ids)))
    assert rel_err(logits, hf_logits(hf_model, ids)) <= 5e-4


@pytest.mark.parametrize("layout", [dict(tp=2), dict(pp=2)])
def test_any_layout_restores_straight_into_its_sharding(text, layout):
    """Converted on one device, read back sharded: the same arrays on the same devices as loading the HF directory
    in that layout, and identical logits."""
    src, out, _ = text
    ids = random_ids()
    ref = gemma4_jax.from_pretrained(src, dtype="float32", **layout)
    model = gemma4_jax.from_pretrained(out, dtype="float32", **layout)
    assert model.num_stages == layout.get("pp", 1)
    _assert_same_state(model, ref)
    np.testing.assert_array_equal(np.asarray(model.logits(ids)), np.asarray(ref.logits(ids)))


def test_bfloat16_load_of_a_float32_conversion_equals_bfloat16_from_hf(text):
    src, out, _ = text
    model = gemma4_jax.from_pretrained(out, dtype="bfloat16")
    _assert_same_state(model, gemma4_jax.from_pretrained(src, dtype="bfloat16"))


@pytest.mark.parametrize("layout", [dict(), dict(tp=2)])
def test_moe_converted_sharded_loads_in_other_layouts(moe, layout):
    src, out = moe
    ids = random_ids()
    ref = gemma4_jax.from_pretrained(src, dtype="float32", **layout)
    model = gemma4_jax.from_pretrained(out, dtype="float32", **layout)
    _assert_same_state(model, ref)
    np.testing.assert_array_equal(np.asarray(model.logits(ids)), np.asarray(ref.logits(ids)))


def test_quantized_checkpoint_stays_packed(tmp_path):
    src, out = os.path.join(FIXTURES, "modelopt_nvfp4_experts"), tmp_path / "nvfp4"
    assert _convert(src, out, "--dtype", "float32") == 0
    assert (out / "hf_quant_config.json").exists()
    meta = json.loads((out / orbax_io.METADATA_FILE).read_text())
    assert meta["quant_plan"]["experts"] == [[0, "nvfp4"], [1, "nvfp4"], [2, "nvfp4"]]
    ids = random_ids(length=10, vocab=128)
    for layout in (dict(), dict(tp=2)):
        ref = gemma4_jax.from_pretrained(src, dtype="float32", **layout)
        model = gemma4_jax.from_pretrained(out, dtype="float32", **layout)
        _assert_same_state(model, ref)
        packed = {k: v for k, v in _flat(model).items() if ".experts." in k and k.endswith(".w")}
        assert len(packed) == 6 and all(v.dtype == np.uint8 for v in packed.values())  # gate_up + down x 3
        assert all(v.dtype.name == "float8_e4m3fn" for k, v in _flat(model).items() if k.endswith(".block_scale"))
        np.testing.assert_array_equal(np.asarray(model.logits(ids)), np.asarray(ref.logits(ids)))


def test_multimodal_towers_and_processor_files(tiny_checkpoint, tmp_path):
    from mm_fixtures import make_mm_checkpoint

    src, out = tiny_checkpoint("convert_mm", seed=63, maker=make_mm_checkpoint).path, tmp_path / "mm_converted"
    assert _convert(src, out, "--dtype", "float32") == 0
    assert {"tokenizer.json", "tokenizer_config.json", "processor_config.json"} <= set(os.listdir(out))
    model = gemma4_jax.from_pretrained(out, dtype="float32")
    assert any(k.startswith("vision_tower.") for k in _flat(model)) and any(k.startswith("audio.") for k in
                                                                             _flat(model))
    _assert_same_state(model, gemma4_jax.from_pretrained(src, dtype="float32"))


# ----------------------------------------------------------------------------------------------------------------
# Errors


def test_existing_output_needs_overwrite(text, tmp_path, capsys):
    src, _, _ = text
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert _convert(src, busy) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    # --overwrite replaces a previous conversion only, never some other directory.
    assert _convert(src, busy, "--overwrite") == 2
    assert "holds no gemma4_jax conversion" in capsys.readouterr().err
    assert (busy / "notes.txt").read_text() == "mine"
    done = tmp_path / "done"
    assert _convert(src, done, "--dtype", "float32") == 0
    assert _convert(src, done, "--dtype", "bfloat16", "--overwrite") == 0
    assert json.loads((done / orbax_io.METADATA_FILE).read_text())["dtype"] == "bfloat16"
    assert _convert(src, src) == 2
    assert "is the source checkpoint directory" in capsys.readouterr().err


@pytest.fixture
def broken(text, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(text[1], dst)
    return dst


def test_missing_metadata_file_is_named(broken):
    (broken / orbax_io.METADATA_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{orbax_io.METADATA_FILE} is missing"):
        gemma4_jax.from_pretrained(broken, dtype="float32")


def test_unknown_format_version_is_named(broken):
    rewrite_json(broken / orbax_io.METADATA_FILE, lambda meta: meta.update(format_version=99))
    with pytest.raises(CheckpointError, match=f"{orbax_io.METADATA_FILE}: format_version 99 is not supported"):
        gemma4_jax.from_pretrained(broken, dtype="float32")


def test_missing_orbax_metadata_is_named(broken):
    (broken / "params" / "_METADATA").unlink()
    with pytest.raises(CheckpointError, match=r"params/_METADATA: orbax metadata file is missing"):
        gemma4_jax.from_pretrained(broken, dtype="float32")


def test_missing_array_files_are_named(broken):
    data = glob.glob(str(broken / "params" / "ocdbt.process_*" / "d" / "*"))
    assert data
    for f in data:
        os.unlink(f)
    with pytest.raises(CheckpointError, match=r"params: restoring the parameters failed; the orbax data files"):
        gemma4_jax.from_pretrained(broken, dtype="float32")


def test_missing_tree_metadata_is_named(broken):
    for f in glob.glob(str(broken / "params" / "d" / "*")):
        os.unlink(f)
    with pytest.raises(CheckpointError, match=r"params: the orbax tree metadata is missing"):
        gemma4_jax.from_pretrained(broken, dtype="float32")


def test_config_that_disagrees_with_the_arrays_is_named(broken):
    rewrite_config(broken, lambda cfg: cfg.update(hidden_size_per_layer_input=8))
    with pytest.raises(CheckpointError, match=r"embed_tokens_per_layer\.embedding: stored shape"):
        gemma4_jax.from_pretrained(broken, dtype="float32")
