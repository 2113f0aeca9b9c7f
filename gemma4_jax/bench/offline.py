"""Offline measurement of our engine: drive `Engine.step()` over a fixed workload and time everything.

`drive` runs one workload to completion and stamps each request's first token and finish when the step that
produced them returns (that is when a caller could see them); `bench_ours` does a warm-up run (every compile) and
a timed run of the same shapes on a fresh engine, and checks that the timed run did not compile. The machine
measures beside them (peak RSS, CPU seconds, load average, XLA compile events) are shared with the HF baseline.
"""

from __future__ import annotations

import gc
import os
import resource
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

# ----------------------------------------------------------------------------------------------------------------
# Machine measures


class XlaCompiles:
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


def reset_peak_rss() -> None:
    """Reset the kernel's RSS high-water mark (Linux), so the next reading is the peak of one phase."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
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


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all threads: XLA's and torch's pools included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_average() -> float | None:
    """1-minute load average: other processes on a shared machine make every figure noisier."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q)) if len(values) else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# Our engine


def drive(engine, prompts: Sequence[Sequence[int]], output_len: int) -> dict[str, Any]:
    """Generate exactly `output_len` greedy tokens for every prompt by stepping `engine`; time everything.

    Returns wall time, token counts, per-request TTFT / TPOT and per-step times split into steps that ran a
    prefill chunk ("mixed") and pure decode steps.
    """
    from gemma4_jax.serving.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    engine.reset_prefix_cache()  # every pass starts cold: a re-timed pass must not hit the previous one's blocks
    queries0, hits0 = engine.stats["prefix_cache_queries"], engine.stats["prefix_cache_hits"]
    compiles0, xla0, xla_s0 = engine.stats["compiles"], XlaCompiles.count, XlaCompiles.seconds
    compile_s0 = engine.stats["compile_time_s"]
    cpu0 = cpu_seconds()
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
    cpu = cpu_seconds() - cpu0
    for rid in ids:
        engine.release(rid)
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
        "xla_compiles": XlaCompiles.count - xla0,
        "xla_compile_time_s": XlaCompiles.seconds - xla_s0,
        "prefix_cache_queries": engine.stats["prefix_cache_queries"] - queries0,
        "prefix_cache_hits": engine.stats["prefix_cache_hits"] - hits0,
    }


def _spec_snapshot(engine) -> tuple | None:
    """The engine's speculative counters now (None when speculation is off)."""
    if engine.spec_stats is None:
        return None
    return engine.spec_stats.copy(), engine.stats["verify_steps"]


def _spec_metrics(before: tuple, engine) -> dict[str, Any]:
    """Speculative decoding over the timed run (counters after minus `before`): draft tokens proposed and accepted,
    acceptance overall and per draft position, mean accepted length (tokens per verify row: 1 + accepted)."""
    (b, steps0), a = before, engine.spec_stats
    proposed = [n - (b.proposed_per_pos[i] if i < len(b.proposed_per_pos) else 0)
                for i, n in enumerate(a.proposed_per_pos)]
    accepted = [n - (b.accepted_per_pos[i] if i < len(b.accepted_per_pos) else 0)
                for i, n in enumerate(a.accepted_per_pos)]
    drafts, tokens = a.num_drafts - b.num_drafts, a.num_draft_tokens - b.num_draft_tokens
    taken = a.num_accepted_tokens - b.num_accepted_tokens
    return {
        "method": engine.speculative.method,
        "num_speculative_tokens": engine.speculative.num_speculative_tokens,
        "verify_steps": engine.stats["verify_steps"] - steps0,
        "num_drafts": drafts,
        "draft_tokens": tokens,
        "accepted_tokens": taken,
        "acceptance_rate": taken / tokens if tokens else 0.0,
        "acceptance_per_pos": [x / n if n else 0.0 for x, n in zip(accepted, proposed, strict=True)],
        "mean_accepted_length": 1.0 + taken / drafts if drafts else 0.0,
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
    from gemma4_jax.serving.llm import LLM

    llm = LLM(model, max_num_seqs=concurrency, **engine_options)
    reset_peak_rss()
    warm = drive(llm.engine, warmup_prompts, output_len)
    spec0 = _spec_snapshot(llm.engine)
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
        spec0 = _spec_snapshot(llm.engine)
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
        "prefix_cache_hit_rate": timed["prefix_cache_hits"] / max(timed["prefix_cache_queries"], 1),
        "load_avg_1m": load_average(),
        "peak_rss_mb": peak_rss_mb(),
        "device_memory": _device_memory(),
    }
    if spec0 is not None:
        result["speculative"] = _spec_metrics(spec0, llm.engine)
    del llm
    gc.collect()
    return result, timed["tokens"]
