"""`gemma4-jax bench`: the command runs end to end, writes its JSON, and its timed phase never compiles.

The full-size figures (bench-100m against HF transformers) are in docs/benchmarks.md; here a tiny preset keeps the
run short. The HF-baseline path is exercised by a slow test.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flax import nnx

import gemma4_jax
from gemma4_jax import bench
from gemma4_jax.cli import main

TINY_ARGS = ["--preset", "tiny", "--num-prompts", "4", "--input-len", "8", "--output-len", "4"]


def _run(tmp_path, *extra: str) -> dict:
    out = tmp_path / "bench.json"
    assert main(["bench", *TINY_ARGS, "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_bench_tiny_json(tmp_path):
    results = _run(tmp_path, "--concurrency", "4,1")
    assert results["config"]["num_params"] > 0
    assert [r["concurrency"] for r in results["ours"]] == [4, 1]
    for r in results["ours"]:
        assert r["output_tokens"] == 4 * 4  # ignore_eos: exactly output-len tokens per prompt
        assert r["output_tok_s"] > 0 and r["total_tok_s"] > r["output_tok_s"]
        # The steady-state figures must come from a run without any compile, by the engine's count and XLA's.
        assert r["compiles_timed"] == 0
        assert r["xla_compiles_timed"] == 0
        assert r["compiles_warmup"] > 0 and r["compile_time_s"] > 0
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"]
        assert math.isfinite(r["tpot_mean_s"]) and r["tpot_mean_s"] > 0
        assert r["decode_steps"] + r["mixed_steps"] == r["steps"]
        assert r["peak_rss_mb"] > 0
    assert "hf" not in results
    # Greedy tokens do not depend on the batch they were computed in.
    assert results["self_agreement"] == {"ours@1 vs ours@4": 1.0}


def test_bench_100m_preset_size():
    cfg = bench.bench_config("bench-100m")
    text = cfg.text
    assert text.has_ple and text.num_kv_shared_layers == 4 and text.use_double_wide_mlp
    assert text.layer_types[-1] == "full_attention"
    _, state = gemma4_jax.abstract_model(cfg, "float32")
    num_params = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(state))
    assert 90e6 <= num_params <= 110e6, num_params


def test_random_prompts_avoid_special_ids():
    prompts = bench.random_prompts(8, 32, 64, seed=3)
    ids = np.asarray(prompts)
    assert ids.shape == (8, 32)
    assert ids.min() >= bench.FIRST_ORDINARY_ID and ids.max() < 64
    assert prompts == bench.random_prompts(8, 32, 64, seed=3)
    assert prompts != bench.random_prompts(8, 32, 64, seed=4)


def test_bench_rejects_model_and_preset(tmp_path):
    assert main(["bench", "--model", str(tmp_path), "--preset", "tiny"]) == 2


@pytest.mark.slow
def test_bench_hf_baseline(tmp_path):
    results = _run(tmp_path, "--concurrency", "4", "--hf-baseline", "--hf-batch-sizes", "1,2", "--dtype", "float32")
    assert [r["batch_size"] for r in results["hf"]] == [1, 2]
    for r in results["hf"]:
        assert r["output_tokens"] == 4 * 4 and r["output_tok_s"] > 0
    assert set(results["ratios"]) == {"ours@4 / hf@1", "ours@4 / hf@2"}
    assert all(v > 0 for v in results["ratios"].values())
    # Same checkpoint, float32, greedy: both sides pick the same tokens.
    assert results["config"]["hf"]["dtype"] == results["config"]["dtype"] == "float32"
    assert results["greedy_agreement"] == {"ours@4 vs hf@1": 1.0, "ours@4 vs hf@2": 1.0}


def test_hf_baseline_runs_in_our_dtype(tiny_checkpoint):
    """The HF side is loaded in the dtype ours runs in (a bfloat16 run was compared with float32 HF before)."""
    from gemma4_jax.bench.hf_baseline import load_hf_model

    path = tiny_checkpoint("bench_hf_dtype", seed=2).path
    assert str(next(load_hf_model(path, "bfloat16").parameters()).dtype) == "torch.bfloat16"
    assert str(next(load_hf_model(path).parameters()).dtype) == "torch.float32"
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        load_hf_model(path, "int8")


def test_report_says_what_each_figure_means(tmp_path):
    """Every printed figure has its meaning beside it; a dtype mismatch with HF is said loudly."""
    from gemma4_jax.bench.report import format_report

    results = _run(tmp_path, "--concurrency", "2")
    results["config"]["hf"] = {"dtype": "float32"}
    results["config"]["dtype"] = "bfloat16"
    results["hf"] = [dict(batch_size=2, output_tok_s=1.0, total_tok_s=2.0, wall_s=3.0, torch_threads=1,
                          cpu_utilization=1.0, load_avg_1m=0.5, peak_rss_mb=10.0)]
    results["ratios"] = {"ours@2 / hf@2": 3.0}
    results["greedy_agreement"] = {"ours@2 vs hf@2": 0.01}
    text = format_report(results)
    for meaning in ("out_tok/s: generated tokens per wall second", "ttft_*:", "tpot_ms:", "decode_step_ms:",
                    "peak_rss_MiB:", "prefix_hit:", "hf_batch: prompts per generate call", "ratio > 1:",
                    "counting each sequence only up to its first different token"):
        assert meaning in text, meaning
    assert "NOT the dtype of ours (bfloat16)" in text and "DIFFERENT dtypes" in text
