"""Benchmarks of gemma4-jax: offline throughput/latency of the engine (optionally against HF transformers) and the
serving load benchmark against a running server. The top layer, beside the CLI; `gemma4-jax bench` is `cli.py`.

Modules: presets.py (bench presets, random prompts), offline.py (driving the engine, machine measures),
hf_baseline.py (HF transformers `generate` on the same checkpoint), serving_load.py (`vllm bench serve` style),
report.py (tables, strict JSON), cli.py (the `bench` command).
"""

from gemma4_jax.bench.cli import run_bench
from gemma4_jax.bench.offline import bench_ours, drive
from gemma4_jax.bench.presets import BENCH_PRESETS, FIRST_ORDINARY_ID, bench_config, bench_preset_dict, random_prompts

__all__ = [
    "BENCH_PRESETS",
    "FIRST_ORDINARY_ID",
    "bench_config",
    "bench_ours",
    "bench_preset_dict",
    "drive",
    "random_prompts",
    "run_bench",
]
