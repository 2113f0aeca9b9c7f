"""The device check's whole-model benchmark (benchmarks/gpu_models.py) in its reduced CPU mode: the engine's own
jitted decode/prefill programs on synthetic batches padded as the step builder pads them, with the rooflines
filled in. On a GPU the same code times real presets (docs/benchmarks.md, "On one H200")."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


@pytest.mark.slow
def test_gpu_models_reduced_runs_end_to_end(tmp_path):
    import gpu_models

    out = tmp_path / "models.jsonl"
    code = gpu_models.main(["--reduced", "--preset", "26b-a4b", "--experts", "nvfp4", "--attention", "xla",
                            "--moe-backend", "xla", "--copy-gbps", "10", "--matmul-tflops", "0.1",
                            "--workload", "24,8", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text().splitlines()[-1])
    assert set(result["decode"]) == {"1", "4"} and set(result["prefill"]) == {"24", "64"}
    for entry in result["decode"].values():
        assert entry["tok_s"] > 0 and entry["bytes_per_step_gb"] > 0 and entry["x_roofline"] > 0
    assert result["workload"]["output_tok_s"] > 0
    assert result["compile"]["wall_s_all_variants"] > 0 and not result.get("errors")


def test_decode_batch_tables_are_padded_like_the_step_builder():
    import gpu_models

    from gemma4_jax.config import preset
    from gemma4_jax.serving import kv_cache

    text = preset("tiny").text
    layout = kv_cache.CacheLayout.for_config(text, page_size=4, num_pages=200, max_seqs=4, num_window_pages=100)
    batch = gpu_models.decode_batch(3, 40, (11, 6), layout, 2, text.vocab_size, 0)
    assert batch.page_table.shape == (3, 16)  # 11 pages used, padded to a power of two
    assert (batch.page_table[:, 11:] == kv_cache.TRASH_PAGE).all()
    assert len(set(batch.page_table[:, :11].ravel())) == 33  # each row its own pages
    assert batch.window_table.shape[1] == layout.window_width(3, 16)
    assert (batch.window_start == layout.first_window_page(40) * 4).all()
