"""Printing and saving benchmark results: the tables `gemma4-jax bench` prints and strict-JSON cleanup.

The printed tables show a curated set of columns; the JSON written with `--json` holds every field.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


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
    ("prefix_hit", lambda r: r.get("prefix_cache_hit_rate", 0.0)),
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


def format_report(results: dict[str, Any]) -> str:
    """Human-readable tables of a `run_bench` result."""
    c = results["config"]
    out = [
        f"model {c['model']}  ({c['num_params'] / 1e6:.1f}M params, {c['dtype']})  {c['num_prompts']} prompts x "
        f"{c['input_len']} tokens -> {c['output_len']} new tokens  [{c['machine']}]",
        "",
        "gemma4-jax (ours), one row per concurrency (max_num_seqs):",
        _columns_table(_OUR_COLUMNS, results["ours"]),
        "(compile_s: the engine's first-call time of each new step shape in the warm-up; xla_compile_s: XLA "
        "backend compile time in the warm-up. warmup_s: wall time of the untimed first pass over the workload. "
        "timed_compiles: engine shape compiles / XLA compiles during the timed run, both must be 0; '*': the first "
        "timed run compiled and was timed again. out_tok/s: generated tokens per wall second of the timed run; "
        "total_tok/s: prompt + generated tokens per wall second. ttft_*: time from submitting all prompts at once "
        "to a request's first token (queueing included), mean / median / 99th percentile; tpot_ms: mean time per "
        "output token after the first, per request; decode_step_ms: mean wall time of an engine step with no "
        "prefill. prefix_hit: prompt tokens found in the prefix cache / prompt tokens (each pass starts with the "
        "cache reset; random prompts share little). cpu_util: process CPU seconds per wall second; load_1m: the "
        "machine's load average (other jobs make figures noisy); peak_rss_MiB: the process's peak resident memory)",
    ]
    spec = [dict(r["speculative"], concurrency=r["concurrency"]) for r in results["ours"] if r.get("speculative")]
    if spec:
        out += ["", f"speculative decoding ({spec[0]['method']}, k = {spec[0]['num_speculative_tokens']}), timed run:"]
        out += [_table(["concurrency", "verify_steps", "draft_tokens", "accepted", "acceptance", "per_position",
                        "mean_accepted_len"],
                       [[s["concurrency"], s["verify_steps"], s["draft_tokens"], s["accepted_tokens"],
                         s["acceptance_rate"], " ".join(f"{x:.2f}" for x in s["acceptance_per_pos"]),
                         s["mean_accepted_length"]] for s in spec])]
        out += ["(draft_tokens: tokens proposed; accepted: of them accepted by the target; per_position: acceptance "
                "of the 1st, 2nd, ... draft of a step; mean_accepted_len: tokens a row emits per verify step, "
                "1 + accepted drafts. Random weights accept few drafts)"]
    if results.get("hf"):
        hf_dtype = c.get("hf", {}).get("dtype", "float32")
        same = hf_dtype == c["dtype"]
        out += ["", f"HF transformers generate, greedy, {hf_dtype}"
                + (" (the same dtype as ours)" if same else f" -- NOT the dtype of ours ({c['dtype']})") + ":"]
        out += [_columns_table(_HF_COLUMNS, results["hf"])]
        out += ["(hf_batch: prompts per generate call; out_tok/s, total_tok/s: as above; wall_s: the timed run; "
                "torch_threads: torch's intra-op threads)"]
        out += ["", _table(["ours/hf (output tok/s)", "ratio"], sorted(results["ratios"].items()))]
        out += ["(ratio > 1: ours generates that many times more tokens per second than HF at those batch sizes, "
                "same process, same checkpoint" + (", same dtype)" if same else ", DIFFERENT dtypes)")]
    agreement = {**results.get("greedy_agreement", {}), **results.get("self_agreement", {})}
    if agreement:
        out.append(
            "greedy agreement: "
            + ", ".join(f"{k}: {v:.3f}" for k, v in agreement.items())
            + " (the fraction of generated tokens that match, counting each sequence only up to its first "
            "different token; 1.000 = identical. Random weights give near-flat logits, so a near-tie flips one "
            "token and the rest of that sequence counts as different: low figures on random weights, especially "
            "in bfloat16, mean near-ties, not a wrong model; parity is tested at float32 in "
            "tests/test_parity_text.py)"
        )
    if results["ours"] and results["ours"][0].get("device_memory"):
        out.append(f"device memory: {results['ours'][0]['device_memory']}")
    return "\n".join(out)


def json_safe(x: Any) -> Any:
    """NaN/inf (e.g. TPOT with one output token) become null: strict JSON readers reject them."""
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    return x
