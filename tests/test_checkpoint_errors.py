"""Loader errors: truncated files, wrong shapes, missing and unexpected tensors, bad directories."""

import json
import os
import shutil

import numpy as np
import pytest

import gemma4_jax
from gemma4_jax.checkpoint import CheckpointError, SafetensorsFile
from hf_reference import rewrite_config


@pytest.fixture(scope="module")
def good(tiny_checkpoint):
    return tiny_checkpoint("errors_good", seed=11, hidden_size_per_layer_input=8, num_kv_shared_layers=2).path


def _copy(good, tmp_path):
    dst = str(tmp_path / "ckpt")
    shutil.copytree(good, dst)
    return dst


def _rewrite_tensors(path, fn):
    """Rewrite model.safetensors through a dict transform (numpy, float32 checkpoints)."""
    from safetensors.numpy import save_file

    file = os.path.join(path, "model.safetensors")
    sf = SafetensorsFile(file)
    tensors = {k: np.array(sf.get(k)) for k in sf.tensors}
    del sf
    save_file(fn(tensors), file)


def test_truncated_file(good, tmp_path):
    path = _copy(good, tmp_path)
    file = os.path.join(path, "model.safetensors")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)
    with pytest.raises(CheckpointError, match="truncated"):
        gemma4_jax.from_pretrained(path, dtype="float32")


def test_header_garbage(good, tmp_path):
    path = _copy(good, tmp_path)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(b"\x00" * 4)
    with pytest.raises(CheckpointError, match="truncated"):
        gemma4_jax.from_pretrained(path, dtype="float32")


def test_wrong_shape(good, tmp_path):
    path = _copy(good, tmp_path)

    def widen(t):
        key = "model.layers.1.mlp.up_proj.weight"
        t[key] = np.zeros((t[key].shape[0] + 1, t[key].shape[1]), np.float32)
        return t

    _rewrite_tensors(path, widen)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: checkpoint shape \(97, 64\)"):
        gemma4_jax.from_pretrained(path, dtype="float32")


def test_missing_and_unexpected(good, tmp_path):
    path = _copy(good, tmp_path)

    def edit(t):
        del t["model.layers.2.self_attn.q_norm.weight"]
        t["model.layers.0.mystery.weight"] = np.zeros((3,), np.float32)
        return t

    _rewrite_tensors(path, edit)
    with pytest.raises(CheckpointError) as info:
        gemma4_jax.from_pretrained(path, dtype="float32")
    msg = str(info.value)
    assert "layers.2.self_attn.q_norm.weight" in msg and "missing" in msg
    assert "model.layers.0.mystery.weight" in msg and "unexpected" in msg


def test_kv_shared_layer_weights_are_ignored(good, tmp_path):
    """K/V projections of KV-shared layers are ignored (as HF does), not reported as unexpected."""
    path = _copy(good, tmp_path)

    def add(t):
        t["model.layers.5.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
        t["model.layers.5.self_attn.k_norm.weight"] = np.zeros((32,), np.float32)
        return t

    _rewrite_tensors(path, add)
    gemma4_jax.from_pretrained(path, dtype="float32")


def test_config_and_checkpoint_disagree(good, tmp_path):
    path = _copy(good, tmp_path)
    rewrite_config(path, lambda d: d.update(intermediate_size=100))  # the checkpoint's MLPs are 96 wide
    with pytest.raises(CheckpointError, match="does not match its config"):
        gemma4_jax.from_pretrained(path, dtype="float32")


def test_bad_directories(good, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        gemma4_jax.checkpoint.CheckpointFiles(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(os.path.join(good, "config.json"), empty)
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        gemma4_jax.from_pretrained(str(empty), dtype="float32")
    idx = _copy(good, tmp_path)
    with open(os.path.join(idx, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}, f)
    with pytest.raises(CheckpointError, match="missing"):
        gemma4_jax.from_pretrained(idx, dtype="float32")


def test_bad_arguments(good):
    with pytest.raises(ValueError, match="dtype"):
        gemma4_jax.from_pretrained(good, dtype="int8")
    model = gemma4_jax.from_pretrained(good, dtype="float32")
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 384\)"):
        model.logits([[1, 2, 999]])
    with pytest.raises(ValueError, match="integer array"):
        model.logits([[0.5, 1.0]])
    with pytest.raises(TypeError, match="text-only"):
        model.logits([[1, 2]], pixel_values=np.zeros((1, 3)))
