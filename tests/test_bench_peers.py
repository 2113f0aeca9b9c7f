"""`gemma4-jax bench --peers`: the interleaved harness on the tiny preset with the systems of our own environment.

Only ours and HF transformers run here (both use this environment's python); vLLM CPU and llama.cpp live in
venvs made by benchmarks/install_peers.sh, so with an empty `--peers-dir` they must be reported as skipped with the
command that installs them. No network, no venv is created. The full figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import json

import pytest

from gemma4_jax.bench import peers
from gemma4_jax.bench.presets import bench_preset_dict
from gemma4_jax.cli import main

FULL, SLIDING = "full_attention", "sliding_attention"


def _kv_sources_hf(types: list[str], shared: int) -> dict[int, int]:
    """HF: a KV-shared layer reads the last non-shared layer of its own kind."""
    n = len(types) - shared
    return {i: max(j for j in range(n) if types[j] == types[i]) for i in range(n, len(types))}


def _kv_sources_llama_cpp(types: list[str], shared: int) -> dict[int, int]:
    """llama.cpp (llama-model.cpp, Gemma 4): n_layer_kv_from_start - (2 if sliding else 1)."""
    n = len(types) - shared
    return {i: n - (2 if types[i] == SLIDING else 1) for i in range(n, len(types))}


@pytest.mark.parametrize("preset", ["bench-100m", "tiny"])
def test_llama_cpp_kv_layout_agrees_with_hf(preset):
    config = bench_preset_dict(preset)
    shared = config["num_kv_shared_layers"]
    before = config["layer_types"]
    # The preset as it is: llama.cpp would read other layers' caches than HF does.
    assert _kv_sources_hf(before, shared) != _kv_sources_llama_cpp(before, shared)
    after = peers.peer_config(preset)["layer_types"]
    assert _kv_sources_hf(after, shared) == _kv_sources_llama_cpp(after, shared)
    assert sorted(after) == sorted(before)  # same number of full and sliding layers: same parameter count
    assert after[len(after) - shared :] == before[len(before) - shared :]  # the shared layers keep their kinds
    if preset == "bench-100m":  # the layout: the KV-owning full layer moves from index 4 to 7
        assert (before[4], before[7], after[4], after[7]) == (FULL, SLIDING, SLIDING, FULL)


def test_synthetic_tokenizer_has_exact_vocab(tmp_path):
    from transformers import AutoTokenizer

    peers.write_tokenizer(str(tmp_path), 512)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert tokenizer.is_fast and len(tokenizer.get_vocab()) == 512
    assert tokenizer.convert_tokens_to_ids(["<pad>", "<eos>", "<bos>"]) == [0, 1, 2]  # Gemma's special ids


def test_peers_refuses_options_it_cannot_honour(tmp_path, capsys):
    base = ["bench", "--peers", "--preset", "tiny", "--peers-dir", str(tmp_path)]
    for extra, message in (
        (["--hf-baseline"], "--hf-baseline is not supported with --peers"),
        (["--peer-dtypes", "float16"], "--peer-dtypes: ['float16'] not supported"),
        (["--peer-systems", "ours,sglang"], "unknown ['sglang']"),
        (["--num-scheduler-steps", "0"], "--num-scheduler-steps must be >= 1"),
        (["--num-scheduler-steps", "2", "--peer-systems", "ours,hf"], "which --peer-systems leaves out"),
    ):
        assert main([*base, *extra]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow  # end to end with HF: ~45 s; the layout, tokenizer and refusal tests stay fast
def test_peers_tiny_ours_and_hf_interleaved(tmp_path):
    out, md = tmp_path / "peers.json", tmp_path / "peers.md"
    args = ["bench", "--peers", "--preset", "tiny", "--num-prompts", "2", "--input-len", "8", "--output-len", "3"]
    args += ["--concurrency", "2,1", "--windows", "2", "--batch1-prompts", "1", "--peers-dir", str(tmp_path / "none")]
    args += ["--gemm-size", "128", "--bandwidth-mib", "4", "--json", str(out), "--markdown", str(md)]
    # ours_auto is left out (it runs only on CPUs where auto is not float32); ours_steps: 2 decode steps per call.
    args += ["--peer-systems", "ours,ours_steps,hf,vllm,llama_cpp", "--num-scheduler-steps", "2"]
    assert main(args) == 0
    results = json.loads(out.read_text())

    assert set(results["skipped"]) == {"vllm", "llama_cpp"}
    for name in ("vllm", "llama_cpp"):
        assert f"install_peers.sh --dir {tmp_path / 'none'} {name}" in results["skipped"][name]
    session = results["dtypes"]["float32"]
    assert session["failed"] == {}
    assert set(session["systems"]) == {"ours", "ours_steps", "hf"}
    # Interleaved: in each window, each batch size, ours, ours with 2 steps per call, then HF.
    order = [(r["window"], r["batch"], r["system"]) for r in session["runs"]]
    assert order == [(w, b, s) for w in (0, 1) for b in (2, 1) for s in ("ours", "ours_steps", "hf")]
    for r in session["runs"]:
        assert r["output_tokens"] == (2 if r["batch"] == 2 else 1) * 3
        assert r["output_tok_s"] > 0 and r["load_before"] >= 0 and r["load_after"] >= 0
        assert r["agreement"] >= 0.9  # same float32 weights, greedy
        if r["system"] in ("ours", "ours_steps"):
            assert r["extra"] == {"compiles": 0, "xla_compiles": 0}  # warmed up before the timed runs

    summary = {(row["batch"], row["system"]): row for row in session["summary"]}
    assert set(summary) == {(b, s) for b in (2, 1) for s in ("ours", "ours_steps", "hf")}
    assert summary[2, "ours_steps"]["version"].endswith("2 steps per call")
    assert summary[2, "ours_steps"]["agreement_min"] == 1.0  # the same greedy tokens as one step per call
    for (batch, system), row in summary.items():
        assert len(row["output_tok_s"]) == 2 and len(row["peer_over_ours"]) == 2
        if system == "ours":
            assert row["peer_over_ours"] == [1.0, 1.0]
        assert row["compute_roofline"] > 0
        assert (row["bandwidth_roofline"] is None) == (batch != 1)
    # Costs from the checkpoint: every weight read once per step except the PLE table (vocab x layers x 16).
    config = results["config"]
    costs = session["costs"]
    ple_table = 512 * len(config["layer_types"]) * 16
    assert costs["bytes_per_step"] == 4 * (costs["num_params"] - ple_table)
    assert costs["flops_per_prompt"] > 2 * 3 * (costs["num_params"] - ple_table)
    assert results["roofline"]["gemm_gflops"]["float32"] > 0 and results["roofline"]["read_gb_s"] > 0

    table = md.read_text()
    assert "| batch | system | out tok/s (median, range) | peer / ours | load 1m |" in table
    assert "gemma4-jax" in table and "HF transformers generate" in table
    assert "skipped vLLM CPU" in table and "skipped llama.cpp" in table
