"""`gemma4-jax bench`: offline throughput and latency of the serving engine, optionally against HF transformers.

What one run does:
1. build the model: `--model DIR`, or random weights of `--preset NAME` (a config.py preset or `bench-100m`, the
   ~100M-parameter E2B recipe in miniature defined here). With `--hf-baseline` the random weights are made by
   HF transformers, saved with `save_pretrained` and loaded back by `from_pretrained`, so both sides run the very
   same checkpoint;
2. for every concurrency (`--max-num-seqs`, or a list with `--concurrency 64,1`): a warm-up run of the whole
   workload (it triggers every compile; its wall time and the engine's `compile_time_s` are reported), then a
   timed run of the same shapes with new prompts. The timed run must not compile: both the engine's shape count
   and XLA's own backend-compile events are checked and reported;
3. with `--hf-baseline`: HF `generate` (greedy, exactly `--output-len` new tokens) over the same prompts in
   batches of each `--hf-batch-sizes` entry, and the ratios ours/HF from the same process.

Latency figures come from driving `Engine.step()` directly: a request's first token and its finish are stamped
when the step that produced them returns (that is when a caller could see them). All prompts arrive at once, so
TTFT includes queueing behind earlier prompts, as in any offline benchmark.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gemma4_jax.config import FULL, SLIDING, ModelConfig, config_from_dict, preset, preset_dict

# ~100M parameters with the E2B recipe: per-layer embeddings (PLE), KV sharing (the last 4 layers reuse the K/V
# of layers 4 and 7), double-wide MLPs on the shared layers, soft-capping; 4 sliding + 1 full layer pattern with a
# full last layer. 102.5M parameters (embeddings 16.8M, PLE table 25.2M, decoder layers 60M).
BENCH_100M: dict[str, Any] = {
    "model_type": "gemma4_text",
    "architectures": ["Gemma4ForCausalLM"],
    "vocab_size": 32768,
    "vocab_size_per_layer_input": 32768,
    "hidden_size": 512,
    "num_hidden_layers": 12,
    "intermediate_size": 2048,
    "use_double_wide_mlp": True,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "global_head_dim": 128,
    "sliding_window": 128,
    "layer_types": [SLIDING] * 4 + [FULL] + [SLIDING] * 4 + [FULL] + [SLIDING, FULL],
    "num_kv_shared_layers": 4,
    "hidden_size_per_layer_input": 64,
    "final_logit_softcapping": 30.0,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "hidden_activation": "gelu_pytorch_tanh",
    "tie_word_embeddings": True,
    "rope_parameters": {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    },
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": 1,
}
BENCH_PRESETS = {"bench-100m": BENCH_100M}
# Ids below this are special tokens in every Gemma vocabulary (pad, eos, bos, ...); random prompts avoid them.
FIRST_ORDINARY_ID = 16


def bench_preset_dict(name: str) -> dict[str, Any]:
    """HF-style config dict of a bench preset or of a config.py preset (a copy)."""
    key = name.lower().replace("_", "-")
    if key in BENCH_PRESETS:
        return json.loads(json.dumps(BENCH_PRESETS[key]))
    preset(key)  # raises ConfigError listing the known presets
    return preset_dict(key)


def bench_config(name: str) -> ModelConfig:
    return config_from_dict(bench_preset_dict(name), where=f"preset {name}")


def random_prompts(num: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """`num` prompts of `length` uniform random token ids in [FIRST_ORDINARY_ID, vocab_size)."""
    rng = np.random.default_rng(seed)
    return rng.integers(FIRST_ORDINARY_ID, vocab_size, size=(num, length)).tolist()


# ----------------------------------------------------------------------------------------------------------------
# Measurement helpers


class _XlaCompiles:
    """Counts XLA backend compiles (JAX's monitoring event), independent of the engine's own shape bookkeeping."""

    count = 0
    seconds = 0.0
    _registered = False

    @classmethod
    def install(cls) -> None:
        if cls._registered:
            return
        import jax

        def listener(event: str, duration: float, **_: Any) -> None:
            if event == "/jax/core/compile/backend_compile_duration":
                cls.count += 1
                cls.seconds += duration

        jax.monitoring.register_event_duration_secs_listener(listener)
        cls._registered = True


def _reset_peak_rss() -> None:
    """Reset the kernel's RSS high-water mark (Linux), so the next reading is the peak of one phase."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB: VmHWM (resettable) where available, else getrusage."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def _device_memory() -> dict[str, int] | None:
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # backends without allocator stats raise or return None
        return None
    if not stats:
        return None
    keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
    return {k: int(stats[k]) for k in keys if k in stats}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _load_average() -> float | None:
    """1-minute load average: other processes on a shared machine make every figure noisier."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q)) if len(values) else float("nan")


def _commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


# ----------------------------------------------------------------------------------------------------------------
# Our engine


def drive(engine, prompts: Sequence[Sequence[int]], output_len: int) -> dict[str, Any]:
    """Generate exactly `output_len` greedy tokens for every prompt by stepping `engine`; time everything.

    Returns wall time, token counts, per-request TTFT / TPOT and per-step times split into steps that ran a
    prefill chunk ("mixed") and pure decode steps.
    """
    from gemma4_jax.serving.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    compiles0, xla0, xla_s0 = engine.stats["compiles"], _XlaCompiles.count, _XlaCompiles.seconds
    compile_s0 = engine.stats["compile_time_s"]
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    ids = [engine.add_request(list(p), params) for p in prompts]
    first: dict[str, float] = {}
    finish: dict[str, float] = {}
    tokens: dict[str, list[int]] = {}
    mixed_steps: list[float] = []
    decode_steps: list[float] = []
    decode_rows: list[int] = []
    decode_iterations = 0  # single-token decode iterations: a multi-step engine call runs several
    while engine.has_unfinished():
        rows = sum(r.in_decode for r in engine.running)
        prompt_tokens, generated = engine.stats["prompt_tokens"], engine.stats["generated_tokens"]
        s0 = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter()
        if engine.stats["prompt_tokens"] > prompt_tokens:  # the step ran a prefill chunk
            mixed_steps.append(now - s0)
        else:
            decode_steps.append(now - s0)
            decode_rows.append(rows)
            decode_iterations += max(1, round((engine.stats["generated_tokens"] - generated) / max(rows, 1)))
        for out in outs:
            if out.token_ids and out.request_id not in first:
                first[out.request_id] = now
            if out.finished:
                finish[out.request_id] = now
                tokens[out.request_id] = list(out.token_ids)
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    for rid in ids:
        engine.requests.pop(rid, None)
    missing = [rid for rid in ids if rid not in finish]
    if missing:
        raise RuntimeError(f"{len(missing)} request(s) never finished")
    n_out = [len(tokens[rid]) for rid in ids]
    ttft = [first[rid] - t0 for rid in ids]
    tpot = [(finish[rid] - first[rid]) / (n - 1) for rid, n in zip(ids, n_out, strict=True) if n > 1]
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "prompt_tokens": sum(len(p) for p in prompts),
        "output_tokens": sum(n_out),
        "tokens": [tokens[rid] for rid in ids],
        "ttft_s": ttft,
        "tpot_s": tpot,
        "mixed_step_s": mixed_steps,
        "decode_step_s": decode_steps,
        "decode_rows": decode_rows,
        "decode_iterations": decode_iterations,
        "compiles": engine.stats["compiles"] - compiles0,
        "compile_time_s": engine.stats["compile_time_s"] - compile_s0,
        "xla_compiles": _XlaCompiles.count - xla0,
        "xla_compile_time_s": _XlaCompiles.seconds - xla_s0,
    }


def bench_ours(
    model,
    concurrency: int,
    warmup_prompts: Sequence[Sequence[int]],
    timed_prompts: Sequence[Sequence[int]],
    output_len: int,
    engine_options: dict[str, Any],
) -> tuple[dict[str, Any], list[list[int]]]:
    """Warm-up (compiles) then a timed run of the same shapes on a fresh engine of `concurrency` sequences."""
    from gemma4_jax.llm import LLM

    llm = LLM(model, max_num_seqs=concurrency, **engine_options)
    _reset_peak_rss()
    warm = drive(llm.engine, warmup_prompts, output_len)
    timed = drive(llm.engine, timed_prompts, output_len)
    first_timed_compiles = (timed["compiles"], timed["xla_compiles"])
    if any(first_timed_compiles):
        # A shape the warm-up saw was compiled again (e.g. an argument's sharding changed after the first step):
        # the steady-state figures come from one more run of the same prompts, the recompile stays on record.
        print(
            f"[bench] the timed run at concurrency {concurrency} compiled (engine {first_timed_compiles[0]}, "
            f"XLA {first_timed_compiles[1]}); timing it again",
            file=sys.stderr,
            flush=True,
        )
        timed = drive(llm.engine, timed_prompts, output_len)
    decode = timed["decode_step_s"]
    result = {
        "concurrency": concurrency,
        "num_prompts": len(timed_prompts),
        "warmup_wall_s": warm["wall_s"],
        "compile_time_s": warm["compile_time_s"],
        "xla_compile_time_s": warm["xla_compile_time_s"],
        "compiles_warmup": warm["compiles"],
        "xla_compiles_warmup": warm["xla_compiles"],
        "compiles_timed": timed["compiles"],
        "xla_compiles_timed": timed["xla_compiles"],
        "compiles_first_timed": first_timed_compiles[0],
        "xla_compiles_first_timed": first_timed_compiles[1],
        "wall_s": timed["wall_s"],
        "output_tokens": timed["output_tokens"],
        "output_tok_s": timed["output_tokens"] / timed["wall_s"],
        "total_tok_s": (timed["output_tokens"] + timed["prompt_tokens"]) / timed["wall_s"],
        "ttft_mean_s": float(np.mean(timed["ttft_s"])),
        "ttft_p50_s": _percentile(timed["ttft_s"], 50),
        "ttft_p99_s": _percentile(timed["ttft_s"], 99),
        "tpot_mean_s": float(np.mean(timed["tpot_s"])) if timed["tpot_s"] else float("nan"),
        "steps": len(timed["mixed_step_s"]) + len(decode),
        "mixed_steps": len(timed["mixed_step_s"]),
        "mixed_step_time_s": float(np.sum(timed["mixed_step_s"])),
        "decode_steps": len(decode),
        "decode_step_time_s": float(np.sum(decode)),
        "decode_iterations": timed["decode_iterations"],
        # Time of one single-token decode iteration over the batch (a multi-step engine call counts k of them).
        "decode_step_mean_s": float(np.sum(decode)) / timed["decode_iterations"] if decode else float("nan"),
        "decode_rows_mean": float(np.mean(timed["decode_rows"])) if decode else 0.0,
        "cpu_utilization": timed["cpu_s"] / timed["wall_s"],
        "load_avg_1m": _load_average(),
        "peak_rss_mb": _peak_rss_mb(),
        "device_memory": _device_memory(),
    }
    del llm
    gc.collect()
    return result, timed["tokens"]


# ----------------------------------------------------------------------------------------------------------------
# HF transformers baseline


def make_hf_checkpoint(config_dict: dict[str, Any], path: str, seed: int) -> None:
    """Random-init an HF Gemma4ForCausalLM (float32) from a config dict and `save_pretrained` it to `path`."""
    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    kwargs = {k: v for k, v in config_dict.items() if k not in ("model_type", "architectures")}
    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(Gemma4TextConfig(**kwargs)).float().eval()
    model.save_pretrained(path, safe_serialization=True)
    del model
    gc.collect()


def load_hf_model(path: str):
    import torch
    from transformers import Gemma4ForCausalLM

    model = Gemma4ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model


def bench_hf(
    model, prompts: Sequence[Sequence[int]], batch_size: int, output_len: int
) -> tuple[dict[str, Any], list[list[int]]]:
    """HF `generate` (greedy, exactly output_len new tokens) over `prompts` in batches of `batch_size`."""
    import torch

    ids = torch.tensor(np.asarray(prompts, np.int64))
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def generate(batch: torch.Tensor, new_tokens: int) -> torch.Tensor:
        with torch.inference_mode():
            out = model.generate(
                input_ids=batch,
                attention_mask=torch.ones_like(batch),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        return out[:, batch.shape[1] :]

    generate(ids[:batch_size], 2)  # first-call overheads (allocator, lazy init) stay out of the timing
    _reset_peak_rss()
    tokens: list[list[int]] = []
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        tokens.extend(generate(ids[start : start + batch_size], output_len).tolist())
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    n_out = sum(len(t) for t in tokens)
    return {
        "batch_size": batch_size,
        "num_prompts": len(prompts),
        "wall_s": wall,
        "output_tokens": n_out,
        "output_tok_s": n_out / wall,
        "total_tok_s": (n_out + ids.numel()) / wall,
        "torch_threads": torch.get_num_threads(),
        "cpu_utilization": cpu / wall,
        "load_avg_1m": _load_average(),
        "peak_rss_mb": _peak_rss_mb(),
    }, tokens


def _agreement(ours: list[list[int]], theirs: list[list[int]]) -> float:
    """Fraction of generated positions where both greedy sequences agree up to their first divergence."""
    same = total = 0
    for a, b in zip(ours, theirs, strict=False):
        total += len(b)
        for x, y in zip(a, b, strict=False):
            if x != y:
                break
            same += 1
    return same / total if total else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# Entry points


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_parser(
    subparsers: argparse._SubParsersAction, engine_args_fn: Callable[[argparse.ArgumentParser], None]
) -> argparse.ArgumentParser:
    """Register `bench` on the `gemma4-jax` command (cli.py calls this)."""
    p = subparsers.add_parser(
        "bench",
        help="offline throughput/latency benchmark (optionally vs HF transformers)",
        description=__doc__.splitlines()[0],
    )
    engine_args_fn(p)
    g = p.add_argument_group("benchmark")
    g.add_argument(
        "--preset",
        default=None,
        help=f"random weights of a preset: {sorted(BENCH_PRESETS)} or a config preset (default "
        "bench-100m when --model is not given)",
    )
    g.add_argument("--num-prompts", type=int, default=64)
    g.add_argument("--input-len", type=int, default=128)
    g.add_argument("--output-len", type=int, default=64)
    g.add_argument(
        "--concurrency",
        type=_int_list,
        default=None,
        help="comma-separated concurrencies to run (default: --max-num-seqs)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")
    g.add_argument(
        "--hf-baseline",
        action="store_true",
        help="also time HF transformers generate on the same (HF-made random) checkpoint",
    )
    g.add_argument(
        "--hf-batch-sizes",
        "--hf-batch-size",
        dest="hf_batch_sizes",
        type=_int_list,
        default=[8],
        help="HF baseline batch size(s), e.g. 1,8 (default 8)",
    )
    g.add_argument(
        "--hf-num-prompts",
        type=int,
        default=None,
        help="prompts for the HF baseline (default: --num-prompts; fewer keeps batch 1 short)",
    )
    g.add_argument("--json", default=None, help="write the results to this JSON file")
    s = p.add_argument_group("serving mode (vllm bench serve style): load a running `gemma4-jax serve`")
    s.add_argument("--url", default=None, help="server base URL, e.g. http://127.0.0.1:8000 (enables serving mode)")
    s.add_argument("--served-model-name", default=None, help="model name to request (default: the server's first)")
    s.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second (inf)")
    s.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    s.add_argument("--api-key", default=None)
    try:
        g.add_argument(
            "--num-scheduler-steps",
            type=int,
            default=None,
            help="decode steps per engine call when no prefill is pending (default: the engine's)",
        )
    except argparse.ArgumentError:
        pass  # the shared engine options already provide it
    p.set_defaults(func=cmd_bench)
    return p


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _timed_compiles(r: dict[str, Any]) -> str:
    text = f"{r['compiles_timed']}/{r['xla_compiles_timed']}"
    if r["compiles_first_timed"] or r["xla_compiles_first_timed"]:
        text += f" *{r['compiles_first_timed']}/{r['xla_compiles_first_timed']}"
    return text


# (header, value) columns of the printed tables; the JSON holds every field.
_OUR_COLUMNS: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
    ("concurrency", lambda r: r["concurrency"]),
    ("compile_s", lambda r: r["compile_time_s"]),
    ("xla_compile_s", lambda r: r["xla_compile_time_s"]),
    ("warmup_s", lambda r: r["warmup_wall_s"]),
    ("timed_compiles", _timed_compiles),
    ("out_tok/s", lambda r: r["output_tok_s"]),
    ("total_tok/s", lambda r: r["total_tok_s"]),
    ("ttft_mean_ms", lambda r: 1e3 * r["ttft_mean_s"]),
    ("ttft_p50_ms", lambda r: 1e3 * r["ttft_p50_s"]),
    ("ttft_p99_ms", lambda r: 1e3 * r["ttft_p99_s"]),
    ("tpot_ms", lambda r: 1e3 * r["tpot_mean_s"]),
    ("decode_step_ms", lambda r: 1e3 * r["decode_step_mean_s"]),
    ("cpu_util", lambda r: r["cpu_utilization"]),
    ("load_1m", lambda r: r["load_avg_1m"]),
    ("peak_rss_MiB", lambda r: r["peak_rss_mb"]),
]
_HF_COLUMNS: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
    ("hf_batch", lambda r: r["batch_size"]),
    ("out_tok/s", lambda r: r["output_tok_s"]),
    ("total_tok/s", lambda r: r["total_tok_s"]),
    ("wall_s", lambda r: r["wall_s"]),
    ("torch_threads", lambda r: r["torch_threads"]),
    ("cpu_util", lambda r: r["cpu_utilization"]),
    ("load_1m", lambda r: r["load_avg_1m"]),
    ("peak_rss_MiB", lambda r: r["peak_rss_mb"]),
]


def _columns_table(columns: list[tuple[str, Callable[[dict[str, Any]], Any]]], rows: list[dict[str, Any]]) -> str:
    return _table([h for h, _ in columns], [[value(r) for _, value in columns] for r in rows])


def report(results: dict[str, Any]) -> str:
    """Human-readable tables of a `run_bench` result."""
    c = results["config"]
    out = [
        f"model {c['model']}  ({c['num_params'] / 1e6:.1f}M params, {c['dtype']})  {c['num_prompts']} prompts x "
        f"{c['input_len']} tokens -> {c['output_len']} new tokens  [{c['machine']}]",
        "",
        _columns_table(_OUR_COLUMNS, results["ours"]),
        "(compile_s: the engine's first-call time of each new step shape in the warm-up; xla_compile_s: XLA "
        "backend compile time in the warm-up. timed_compiles: engine shape compiles / XLA compiles during the "
        "timed run, both must be 0; '*': the first timed run compiled and was timed again. cpu_util: process CPU "
        "seconds per wall second; load_1m: the machine's load average, other jobs make figures noisy)",
    ]
    if results.get("hf"):
        out += ["", _columns_table(_HF_COLUMNS, results["hf"])]
        out += ["", _table(["ours/hf (output tok/s)", "ratio"], sorted(results["ratios"].items()))]
    agreement = {**results.get("greedy_agreement", {}), **results.get("self_agreement", {})}
    if agreement:
        out.append(
            "greedy agreement (fraction of tokens before the first divergence): "
            + ", ".join(f"{k}: {v:.3f}" for k, v in agreement.items())
        )
    if results["ours"] and results["ours"][0].get("device_memory"):
        out.append(f"device memory: {results['ours'][0]['device_memory']}")
    return "\n".join(out)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by parsed `bench` arguments; returns the results dict (also the JSON)."""
    import jax

    import gemma4_jax

    _XlaCompiles.install()
    dtype = args.dtype or "float32"
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if args.model is not None and args.preset is not None:
        raise ValueError("give --model or --preset, not both")
    concurrencies = args.concurrency or [args.max_num_seqs]
    name = args.model or args.preset or "bench-100m"
    tmp = None
    try:
        if args.model is not None:
            model = gemma4_jax.from_pretrained(args.model, dtype=dtype)
            hf_path = args.model
        elif args.hf_baseline:
            # HF makes the random weights and both sides load the same safetensors.
            tmp = tempfile.TemporaryDirectory(prefix="gemma4-bench-")
            make_hf_checkpoint(bench_preset_dict(args.preset or "bench-100m"), tmp.name, args.seed)
            model = gemma4_jax.from_pretrained(tmp.name, dtype=dtype)
            hf_path = tmp.name
        else:
            model = gemma4_jax.from_config(bench_config(args.preset or "bench-100m"), dtype=dtype, seed=args.seed)
            hf_path = None
        cfg = model.config.text
        max_model_len = args.max_model_len or args.input_len + args.output_len
        engine_options = dict(
            max_model_len=max_model_len,
            max_num_batched_tokens=args.max_num_batched_tokens,
            attention_backend=args.attention_backend,
        )
        if getattr(args, "num_scheduler_steps", None) is not None:
            engine_options["num_scheduler_steps"] = args.num_scheduler_steps
        warmup = random_prompts(args.num_prompts, args.input_len, cfg.vocab_size, args.seed + 1)
        timed = random_prompts(args.num_prompts, args.input_len, cfg.vocab_size, args.seed)
        results: dict[str, Any] = {
            "config": {
                "model": name,
                "num_params": model.num_params(),
                "dtype": dtype,
                "num_prompts": args.num_prompts,
                "input_len": args.input_len,
                "output_len": args.output_len,
                "concurrency": concurrencies,
                "max_num_batched_tokens": args.max_num_batched_tokens,
                "engine_options": {k: v for k, v in engine_options.items() if k != "max_model_len"},
                "max_model_len": max_model_len,
                "seed": args.seed,
                "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__} "
                f"({jax.default_backend()})",
                "commit": _commit(),
                "date": time.strftime("%Y-%m-%d"),
            },
            "ours": [],
        }
        our_tokens = {}
        for c in concurrencies:
            print(f"[bench] ours: concurrency {c} (warm-up, then timed run)", file=sys.stderr, flush=True)
            r, our_tokens[c] = bench_ours(model, c, warmup, timed, args.output_len, engine_options)
            results["ours"].append(r)
        if args.hf_baseline:
            import torch
            import transformers

            del model
            gc.collect()
            hf = load_hf_model(hf_path)
            n_hf = min(args.hf_num_prompts or args.num_prompts, args.num_prompts)
            results["config"]["hf"] = {
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "num_prompts": n_hf,
                "attn_implementation": hf.config._attn_implementation,
            }
            results["hf"] = []
            hf_tokens = {}
            for b in args.hf_batch_sizes:
                print(f"[bench] HF transformers generate: batch {b}", file=sys.stderr, flush=True)
                r, hf_tokens[b] = bench_hf(hf, timed[:n_hf], b, args.output_len)
                results["hf"].append(r)
            results["ratios"] = {
                f"ours@{o['concurrency']} / hf@{h['batch_size']}": o["output_tok_s"] / h["output_tok_s"]
                for o in results["ours"]
                for h in results["hf"]
            }
            # Same checkpoint, float32, greedy: the sequences should agree but for rare near-ties.
            results["greedy_agreement"] = {
                f"ours@{c} vs hf@{b}": _agreement(our_tokens[c], hf_tokens[b]) for c in our_tokens for b in hf_tokens
            }
        results["self_agreement"] = {
            f"ours@{c} vs ours@{concurrencies[0]}": _agreement(our_tokens[c], our_tokens[concurrencies[0]])
            for c in concurrencies[1:]
        }
    finally:
        if tmp is not None:
            tmp.cleanup()
    return results


def _json_safe(x: Any) -> Any:
    """NaN/inf (e.g. TPOT with one output token) become null: strict JSON readers reject them."""
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def cmd_bench_serve(args: argparse.Namespace) -> int:
    """Serving mode: random token-id prompts against a live server; TTFT/TPOT/ITL percentiles, throughput."""
    import asyncio

    import httpx

    from gemma4_jax.serving.bench_serve import format_report, run

    url = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        models = httpx.get(f"{url}/v1/models", headers=headers, timeout=10).json()["data"]
        model = args.served_model_name or models[0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise ValueError(f"cannot reach a gemma4-jax server at {url}: {e}") from None
    # Token ids below 256 exist in every Gemma vocabulary (and in the demo model's 512).
    results = asyncio.run(run(url, model, args.num_prompts, args.input_len, args.output_len, vocab_size=256,
                              request_rate=args.request_rate, max_concurrency=args.max_concurrency,
                              seed=args.seed, api_key=args.api_key))
    print(format_report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_json_safe(results), f, indent=2)
    return 0 if results["failed"] == 0 else 1


def cmd_bench(args: argparse.Namespace) -> int:
    if args.url:
        return cmd_bench_serve(args)
    results = run_bench(args)
    print(report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_json_safe(results), f, indent=2, allow_nan=False)
    bad = [r["concurrency"] for r in results["ours"] if r["compiles_timed"] or r["xla_compiles_timed"]]
    if bad:
        print(
            f"warning: the timed run recompiled at concurrency {bad}: steady-state figures include compile time",
            file=sys.stderr,
        )
    return 0
