"""`from_config(quant_plan=...)`: random weights in a packed layout (NVFP4 experts), as the benchmarks and the GPU
device check build 26B-A4B-NVFP4-shaped models without a download."""

import numpy as np
from flax import nnx

from gemma4_jax import model as model_lib
from gemma4_jax import quant
from gemma4_jax.config import preset


def _moe_config():
    return preset("tiny", enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=32)


def test_random_nvfp4_experts_have_realistic_scale_and_seed():
    cfg = _moe_config()
    plan = quant.QuantPlan.experts_only(cfg.text.num_hidden_layers)
    m = model_lib.from_config(cfg, dtype="float32", quant_plan=plan)
    flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(m.state)}
    w, scale = flat["layers.0.moe.experts.gate_up.w"], flat["layers.0.moe.experts.gate_up.block_scale"]
    assert w.dtype == np.uint8 and len(np.unique(np.asarray(w))) > 100  # random codes, not zeros
    values = np.asarray(quant.weight_values(quant.NVFP4, w, scale, np.float32))
    std = values.std()
    k = cfg.text.hidden_size
    assert 0.5 * k**-0.5 < std < 2.0 * k**-0.5, std  # the size of the unpacked model's weights
    logits = np.asarray(m.logits(np.array([[5, 6, 7, 8]])))
    assert np.isfinite(logits).all() and logits.std() > 0.1
    # another seed, other codes
    other = model_lib.from_config(cfg, dtype="float32", quant_plan=plan, seed=1)

    def first(m):
        return np.asarray(dict(nnx.to_flat_state(m.state))[("layers", 1, "moe", "experts", "down", "w")].get_value())

    assert (first(m) != first(other)).mean() > 0.5


def test_random_weights_fast_path_builds_a_working_model():
    """random_weights.random_model (real-size presets in benchmarks): packed experts, finite logits, refusals."""
    import pytest

    from gemma4_jax.random_weights import random_model

    cfg = _moe_config()
    m = random_model(cfg, dtype="float32", experts="nvfp4", moe_backend="xla", attention_backend="xla")
    flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(m.state)}
    assert flat["layers.0.moe.experts.gate_up.w"].dtype == np.uint8
    logits = np.asarray(m.logits(np.array([[5, 6, 7, 8]])))
    assert np.isfinite(logits).all() and logits.std() > 0
    with pytest.raises(ValueError, match="needs a MoE model"):
        random_model("tiny", experts="nvfp4")
    with pytest.raises(ValueError, match="experts must be one of"):
        random_model(cfg, experts="int4")


def test_bench_refuses_experts_without_a_moe_preset_or_with_a_checkpoint(capsys):
    from gemma4_jax import cli

    assert cli.main(["bench", "--preset", "tiny", "--experts", "nvfp4", "--num-prompts", "1"]) != 0
    assert "needs a MoE model" in capsys.readouterr().err
    assert cli.main(["bench", "--preset", "tiny", "--experts", "fp8", "--hf-baseline"]) != 0
    assert "keeps its own experts" in capsys.readouterr().err
