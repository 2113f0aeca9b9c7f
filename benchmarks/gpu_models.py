"""Whole-model figures of the device check (issue 12): one preset, one attention backend, in one process.

Random weights of a real-size preset (`e4b`, `26b-a4b`, `31b`; experts in bf16 or NVFP4; made fast by
`gemma4_jax.random_weights.random_model`) on the first device, KV pools sized for the largest batch, then the
engine's own jitted programs (serving/runner.py) on synthetic batches:

- decode: B rows at `--context` tokens of context each, `--decode-steps` steps per call (the engine's multi-step
  decode, `runner.decode_steps`), timed over `--repeats` calls after two warm ones: ms per step and tokens/s;
- prefill (TTFT): one row of L tokens as one chunk (`runner.model_step`, phase prefill), which is the engine's
  time to first token for an L-token prompt when L fits one chunk;
- beside each decode figure, the bandwidth roofline: the fewest bytes a step must read (every weight it uses once:
  dense weights, the LM head, the experts the batch's routing can touch (expected count for uniform routing),
  one embedding/PLE row per token; each owned K/V pool over the context, sliding ones up to the window) over the
  measured copy bandwidth (`--copy-gbps`), and XLA's own byte estimate of the compiled program (which does not see
  inside Pallas kernels). Beside each prefill figure, the compute roofline: 2 x active params x tokens plus the
  attention's QK/PV FLOPs over the measured bf16 matmul rate (`--matmul-tflops`).

All programs are lowered first and compiled in parallel threads (compile time is reported separately, total and
per program). The pools hold random values, not zeros. `--reduced` runs the same path on the `tiny` preset for a
CPU (attention `pallas-interpret` there), so the script is known to work before a GPU is available.

Usage: python benchmarks/gpu_models.py --preset e4b --attention pallas --json out.json
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import os
import sys
import time
from typing import Any

import numpy as np


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="e4b")
    ap.add_argument("--experts", choices=("bf16", "nvfp4", "fp8"), default="bf16", help="MoE experts' storage")
    ap.add_argument("--attention", default="pallas", help="attention backend(s), comma-separated, each a variant run "
                    "on the same weights (pallas, xla, pallas-interpret, auto); the xla variant of a packed-experts "
                    "model also runs the XLA expert path")
    ap.add_argument("--one-row-variant", action="store_true", help="add a variant of the first backend's batch-1 "
                    "decode with one-row products treated the other way from this platform's default: unpadded where "
                    "they are padded to two rows (layers.ONE_ROW_PAD_BACKENDS), padded elsewhere")
    ap.add_argument("--moe-backend", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", type=_ints, default=[1, 8, 64])
    ap.add_argument("--context", type=int, default=1024, help="tokens of context of every decode row")
    ap.add_argument("--prefill", type=_ints, default=[1024, 8192], help="prompt lengths timed as one chunk")
    ap.add_argument("--decode-steps", type=int, default=8, help="decode steps per call (multi-step decode)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--copy-gbps", type=float, default=None, help="measured device copy bandwidth, GB/s")
    ap.add_argument("--matmul-tflops", type=float, default=None, help="measured bf16 matmul rate, TFLOP/s")
    ap.add_argument("--compile-threads", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--workload", default=None, metavar="PROMPT,OUTPUT",
                    help="also report the concurrency-1 workload PROMPT tokens -> OUTPUT tokens (e.g. 1000,250) "
                    "from the prefill and batch-1 decode figures")
    ap.add_argument("--reduced", action="store_true", help="tiny preset on a CPU, kernels in interpret mode")
    ap.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    ap.add_argument("--profile-batches", type=_ints, default=[], help="decode batch sizes to profile (one call under "
                    "jax.profiler.trace after timing): the device's kernels by total time go into the result")
    ap.add_argument("--profile-prefill", type=_ints, default=[], help="prefill lengths (of --prefill) to profile "
                    "the same way")
    ap.add_argument("--profile-top", type=int, default=60, help="kernels kept per profile, by total time")
    ap.add_argument("--hlo-dir", default=None, help="write the optimized HLO of each profiled decode program here")
    args = ap.parse_args(argv)
    if args.reduced:  # the tiny preset (with 8 small experts where the preset has experts)
        args.moe = args.experts == "nvfp4" or args.preset.startswith("26b")
        args.preset, args.batches, args.context, args.prefill = "tiny", [1, 4], 40, [24, 64]
        args.decode_steps, args.repeats = 2, 2
        args.attention = ",".join("pallas-interpret" if a == "pallas" else a for a in args.attention.split(","))
    for flag, asked, timed in (("--profile-batches", args.profile_batches, args.batches),
                               ("--profile-prefill", args.profile_prefill, args.prefill)):
        if set(asked) - set(timed):  # only timed shapes are profiled: refuse the rest rather than skip them
            ap.error(f"{flag} {sorted(set(asked) - set(timed))} not among the timed sizes {timed}")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Building the model and the batches


def _random_pool(key, pool, dtype):
    """Random values in a pool's storage (uint16 pools hold bfloat16 bits: kv_cache.pool_dtype)."""
    import jax
    import jax.numpy as jnp

    from gemma4_jax.kv_view import BF16_BITS

    values = jax.random.normal(key, pool.shape, jnp.float32) * 0.5
    if pool.dtype == BF16_BITS:
        return jax.lax.bitcast_convert_type(values.astype(jnp.bfloat16), BF16_BITS)
    return values.astype(pool.dtype)


def build(args):
    """The random-weight model, its text config, the attention plan and a Runner with allocated, random pools."""
    import jax

    import gemma4_jax
    from gemma4_jax.attention_backends import resolve_attention
    from gemma4_jax.random_weights import random_model
    from gemma4_jax.serving import kv_cache
    from gemma4_jax.serving.runner import Runner

    moe = dict(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=32)
    from gemma4_jax.bench.presets import BENCH_PRESETS, bench_config

    if args.preset in BENCH_PRESETS:  # bench-100m: the CPU bench's model, to profile its steps here
        cfg = bench_config(args.preset)
    else:
        cfg = gemma4_jax.preset(args.preset, **(moe if getattr(args, "moe", False) else {}))
    text = cfg.text
    if args.experts != "bf16" and not text.enable_moe_block:
        raise SystemExit(f"--experts {args.experts} needs a MoE preset; {args.preset} has no experts")
    t0 = time.perf_counter()
    model = random_model(cfg, args.dtype, experts=args.experts, moe_backend=args.moe_backend,
                         attention_backend="xla")
    jax.block_until_ready(model.state)
    init_s = time.perf_counter() - t0
    _say(args, f"weights ready in {init_s:.1f} s")
    if jax.default_backend() == "cpu":  # the host memory the engine's steps have (serving/host_memory.py)
        from gemma4_jax.serving import host_memory

        host_memory.keep_freed_memory()
        huge = host_memory.weights_on_huge_pages(jax.tree.leaves(model.state), background=False)
        _say(args, f"weights on huge pages: {huge!r}")
    attention = resolve_attention("xla", log_choice=lambda s: None)  # the pools' Runner; variants bring their own
    ps = args.page_size
    # Tables as the engine's step builder pads them (serving/step_builder.py): the full table to a power-of-two
    # bucket of pages, the windowed sliding table to CacheLayout.window_width, unused columns on the trash page;
    # each row owns only the pages it uses (in both pools), as the engine allocates them.
    live = kv_cache.pages_needed(args.context + args.decode_steps + 1, ps)
    prefill_pages = kv_cache.pages_needed(max(args.prefill, default=1), ps)
    num_pages = 1 + max(max(args.batches) * live, prefill_pages)
    keep = text.sliding_window - 1
    live_window = (args.context + args.decode_steps) // ps - max(0, args.context - keep) // ps + 1
    num_window = 1 + max(max(args.batches) * live_window, prefill_pages)
    layout = kv_cache.CacheLayout.for_config(text, page_size=ps, num_pages=num_pages, max_seqs=max(args.batches),
                                             num_window_pages=num_window)
    per_row = (live, live_window)
    runner = Runner(model, layout, attention)
    cache = runner.allocate()
    _say(args, f"pools allocated: {sum(v.nbytes for v in cache.values()) / 1e9:.1f} GB")
    key = jax.random.key(7)
    cache = {name: _random_pool(jax.random.fold_in(key, i), pool, model.dtype)
             for i, (name, pool) in enumerate(sorted(cache.items()))}
    jax.block_until_ready(cache)
    return model, runner, cache, per_row, init_s


def _say(args, text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} {args.preset}/{args.experts}/{args.attention}] {text}", flush=True)


def decode_batch(b: int, context: int, per_row: tuple[int, int], layout, steps: int, vocab: int, seed: int):
    """A decode StepBatch of b rows, each with `context` tokens cached; per_row: (full pages, live window pages)
    each row owns, its tables padded as the step builder pads them."""
    from gemma4_jax.serving import kv_cache
    from gemma4_jax.serving.kv_cache import TRASH_PAGE, StepBatch

    rng = np.random.default_rng(seed)
    live, live_window = per_row
    p = kv_cache.bucket(live, 4)
    pw = layout.window_width(steps + 1, p)
    table = np.full((b, p), TRASH_PAGE, np.int32)
    table[:, :live] = 1 + np.arange(b)[:, None] * live + np.arange(live)[None, :]
    window = np.full((b, pw), TRASH_PAGE, np.int32)
    window[:, :live_window] = 1 + np.arange(b)[:, None] * live_window + np.arange(live_window)[None, :]
    return StepBatch(
        tokens=rng.integers(16, vocab, (b, 1)).astype(np.int32),
        positions=np.full((b, 1), context, np.int32),
        context_lens=np.full((b,), context, np.int32),
        slots=np.arange(b, dtype=np.int32),
        page_table=table,
        last_index=np.zeros((b,), np.int32),
        window_table=window,
        window_start=np.full((b,), layout.first_window_page(context) * layout.page_size, np.int32),
    )


def prefill_batch(length: int, layout, vocab: int, seed: int):
    """One row of `length` prompt tokens as a single chunk (no context before it)."""
    from gemma4_jax.serving import kv_cache
    from gemma4_jax.serving.kv_cache import TRASH_PAGE, StepBatch

    rng = np.random.default_rng(seed)
    live = kv_cache.pages_needed(length, layout.page_size)
    p = kv_cache.bucket(live, 4)
    pw = layout.window_width(length, p)
    table = np.full((1, p), TRASH_PAGE, np.int32)
    table[0, :live] = 1 + np.arange(live)
    window = np.full((1, pw), TRASH_PAGE, np.int32)
    window[0, : min(live, pw)] = 1 + np.arange(min(live, pw))
    return StepBatch(
        tokens=rng.integers(16, vocab, (1, length)).astype(np.int32),
        positions=np.arange(length, dtype=np.int32)[None, :],
        context_lens=np.zeros((1,), np.int32),
        slots=np.zeros((1,), np.int32),
        page_table=table,
        last_index=np.full((1,), length - 1, np.int32),
        window_table=window,
        window_start=np.zeros((1,), np.int32),
    )


def greedy(b: int):
    from gemma4_jax.serving.sampling import SamplingBatch, SamplingParams

    return SamplingBatch.from_params([SamplingParams(temperature=0.0)] * b, np.zeros((b, 2), np.uint32), b)


# ----------------------------------------------------------------------------------------------------------------
# Rooflines


def param_bytes(model) -> dict[str, float]:
    """Bytes of the weights by kind: experts (per layer), embedding tables, the rest."""
    from flax import nnx

    out = {"experts": 0.0, "embed": 0.0, "ple_table": 0.0, "dense": 0.0}
    for path, var in nnx.to_flat_state(model.state):
        name = ".".join(map(str, path))
        v = var.get_value()
        nbytes = float(v.size * v.dtype.itemsize)
        if ".experts." in name:
            out["experts"] += nbytes
        elif "per_layer" in name and "embed" in name:
            out["ple_table"] += nbytes
        elif "embed" in name:
            out["embed"] += nbytes
        else:
            out["dense"] += nbytes
    return out


def decode_bytes(model, cache: dict, layout, b: int, context: int, weights: dict[str, float]) -> float:
    """The fewest bytes one decode step of b rows must read (see the module docstring)."""
    text = model.config.text
    total = weights["dense"] + weights["embed"]  # the tied LM head reads the whole table once
    if text.enable_moe_block:
        e, k = text.num_experts, text.top_k_experts
        touched = e * (1.0 - (1.0 - k / e) ** b)  # expected experts hit per layer, uniform routing
        total += weights["experts"] * touched / e
    if weights["ple_table"]:
        total += weights["ple_table"] / max(text.vocab_size_per_layer_input, 1) * b
    for name, pool in cache.items():
        per_token = pool.shape[-1] * pool.shape[-2] * pool.dtype.itemsize
        sliding = int(name[1:]) in layout.sliding_layers
        keys = min(context + 1, text.sliding_window) if sliding else context + 1
        total += b * keys * per_token
    return total


def prefill_flops(model, length: int, weights: dict[str, float]) -> float:
    """2 x (weights a prompt token multiplies) x tokens, the LM head for the last token only (the step keeps one
    token's logits), plus causal QK/PV per layer (sliding layers see up to the window)."""
    text = model.config.text
    itemsize = np.dtype(model.dtype).itemsize
    per_token = weights["dense"] / itemsize  # the embedding lookup multiplies nothing
    if text.enable_moe_block:
        per_token += text.num_hidden_layers * text.top_k_experts * 3 * text.hidden_size * text.moe_intermediate_size
    flops = 2.0 * per_token * length + 2.0 * text.vocab_size * text.hidden_size
    for spec in text.layers:
        keys = length / 2 if not spec.is_sliding else min(length / 2, text.sliding_window)
        flops += 4.0 * length * keys * text.num_attention_heads * spec.head_dim
    return flops


# ----------------------------------------------------------------------------------------------------------------
# The run


def _median_time(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), times


class Variant:
    """One way to run the same weights: an attention backend, a MoE backend (the xla variant of an NVFP4 model runs
    the XLA expert path), and optionally one-row products treated the other way from the platform's default
    (flip_one_row: the first device check found batch-1 decode slower than batch 8 on an H200 until they were
    padded to two rows there too)."""

    def __init__(self, name: str, attention, graph, flip_one_row: bool = False):
        self.name, self.attention, self.graph, self.flip_one_row = name, attention, graph, flip_one_row


def _variants(args, model, dtype):
    import jax

    from gemma4_jax import model as model_lib
    from gemma4_jax import quant
    from gemma4_jax.attention_backends import resolve_attention

    out = []
    for name in args.attention.split(","):
        graph = model.static_graph
        if name == "xla" and args.experts != "bf16":  # the XLA expert path beside the XLA attention
            fmt = quant.NVFP4 if args.experts == "nvfp4" else quant.FP8
            plan = quant.QuantPlan.experts_only(model.config.text.num_hidden_layers, fmt)
            graph = model_lib.static_graph(model_lib._abstract(model.config, dtype, plan, "xla")[0])
        out.append(Variant(name, resolve_attention(name, log_choice=lambda _: None), graph))
    if args.one_row_variant:
        from gemma4_jax import layers

        first = out[0]
        suffix = "+row1" if jax.default_backend() in layers.ONE_ROW_PAD_BACKENDS else "+pad1"
        out.append(Variant(first.name + suffix, first.attention, first.graph, flip_one_row=True))
    return out


@contextlib.contextmanager
def flipped_one_row(on: bool):
    """Trace with one-row products treated the other way from this platform's default (padded to two rows or not:
    layers.ONE_ROW_PAD_BACKENDS); JAX's trace caches are cleared around it so that the variant's programs are traced
    anew."""
    if not on:
        yield
        return
    import jax

    from gemma4_jax import layers

    saved = layers.ONE_ROW_PAD_BACKENDS
    platform = jax.default_backend()
    if platform in saved:
        layers.ONE_ROW_PAD_BACKENDS = tuple(p for p in saved if p != platform)
    else:
        layers.ONE_ROW_PAD_BACKENDS = (*saved, platform)
    jax.clear_caches()
    try:
        yield
    finally:
        layers.ONE_ROW_PAD_BACKENDS = saved
        jax.clear_caches()


def run(args) -> list[dict[str, Any]]:
    """Build the model once, lower every variant's programs, compile them all in parallel, time each; one result
    dict per variant."""
    import jax

    from gemma4_jax.serving import runner as runner_lib

    t_start = time.perf_counter()
    model, runner, cache, per_row, init_s = build(args)
    text = model.config.text
    weights = param_bytes(model)
    variants = _variants(args, model, model.dtype)
    # The parameter state as the engine passes it (flattened once: model.FlatState), else the nnx.State.
    state = getattr(model, "flat_state", model.state)
    layout = runner.layout
    lowered: dict[tuple[str, str], Any] = {}
    inputs: dict[str, tuple] = {}
    for b in args.batches:
        inputs[f"decode_b{b}"] = (decode_batch(b, args.context, per_row, layout, args.decode_steps, text.vocab_size,
                                               b), greedy(b), np.zeros((b,), np.int32))
    for n in args.prefill:
        inputs[f"prefill_{n}"] = (prefill_batch(n, layout, text.vocab_size, n), greedy(1), np.zeros((1,), np.int32),
                                  np.ones((1,), bool))
    t0 = time.perf_counter()
    for v in variants:
        with jax.set_mesh(runner.mesh), flipped_one_row(v.flip_one_row):
            for b in args.batches:
                if v.flip_one_row and b != 1:
                    continue
                batch, sampling, steps = inputs[f"decode_b{b}"]
                lowered[(v.name, f"decode_b{b}")] = runner_lib.decode_steps.lower(
                    v.graph, state, cache, None, batch, sampling, steps, layout=layout, attention=v.attention,
                    num_logprobs=0, num_steps=args.decode_steps)
            for n in [] if v.flip_one_row else args.prefill:
                batch, sampling, steps, rows = inputs[f"prefill_{n}"]
                lowered[(v.name, f"prefill_{n}")] = runner_lib.model_step.lower(
                    v.graph, state, cache, None, batch, sampling, steps, rows, None, None, layout=layout,
                    attention=v.attention, phase="prefill", num_logprobs=0)
    lower_s = time.perf_counter() - t0
    _say(args, f"{len(lowered)} programs of {len(variants)} variants lowered in {lower_s:.1f} s; compiling")

    def compile_one(key):
        c0 = time.perf_counter()
        try:
            exe = lowered[key].compile()
            _say(args, f"compiled {key[0]} {key[1]} in {time.perf_counter() - c0:.1f} s")
            return key, exe, time.perf_counter() - c0, None
        except Exception as e:  # noqa: BLE001 (reported per program; the others still run)
            return key, None, time.perf_counter() - c0, f"{type(e).__name__}: {str(e)[:2000]}"

    t0 = time.perf_counter()
    compiled, compile_s, errors = {}, {}, {}
    with cf.ThreadPoolExecutor(max_workers=max(1, args.compile_threads)) as pool:
        for key, exe, secs, err in pool.map(compile_one, list(lowered)):
            compile_s[key] = round(secs, 2)
            if err:
                errors[key] = err
                _say(args, f"{key[0]} {key[1]}: compile failed: {err[:300]}")
            else:
                compiled[key] = exe
    compile_wall = time.perf_counter() - t0
    box = {"cache": cache}
    results = []
    for v in variants:
        result: dict[str, Any] = {
            "preset": args.preset, "experts": args.experts, "attention": v.name,
            "attention_plan": {p: v.attention.names(p) for p in ("prefill", "decode")},
            "moe_backend": "xla" if v.graph is not model.static_graph or args.experts == "bf16" else args.moe_backend,
            "dtype": args.dtype, "device": str(jax.devices()[0]), "init_s": init_s,
            "weights_gb": sum(weights.values()) / 1e9, "context": args.context, "decode_steps": args.decode_steps,
            "decode": {}, "prefill": {},
            "compile": {"lower_s_all_variants": lower_s, "wall_s_all_variants": compile_wall,
                        **{k[1]: t for k, t in compile_s.items() if k[0] == v.name}},
        }
        for key, err in errors.items():
            if key[0] == v.name:
                result.setdefault("errors", {})[key[1]] = err
        for b in args.batches:
            exe = compiled.get((v.name, f"decode_b{b}"))
            if exe is None:
                continue
            batch, sampling, steps = inputs[f"decode_b{b}"]

            def call(exe=exe, batch=batch, sampling=sampling, steps=steps):
                out, box["cache"], _ = exe(state, box["cache"], None, batch, sampling, steps)
                jax.block_until_ready(out.tokens)

            try:
                call()
                call()
                med, times = _median_time(call, args.repeats)
            except Exception as e:  # noqa: BLE001
                result.setdefault("errors", {})[f"decode_b{b}"] = f"{type(e).__name__}: {str(e)[:2000]}"
                continue
            step_s = med / args.decode_steps
            need = decode_bytes(model, box["cache"], layout, b, args.context, weights)
            entry = {"step_ms": step_s * 1e3, "tok_s": b / step_s, "bytes_per_step_gb": need / 1e9,
                     "call_ms_all": [round(t * 1e3, 3) for t in times]}
            cost = _cost_bytes(exe)
            if cost is not None:
                entry["xla_bytes_per_step_gb"] = cost / args.decode_steps / 1e9
            if args.copy_gbps:
                floor = need / (args.copy_gbps * 1e9)
                entry["roofline_ms"] = floor * 1e3
                entry["x_roofline"] = step_s / floor
            result["decode"][str(b)] = entry
            if b in args.profile_batches:
                _profile(args, result, f"decode_b{b}", call, args.decode_steps, exe, v.name)
            _say(args, f"{v.name} decode B={b}: {step_s * 1e3:.3f} ms/step, {b / step_s:.1f} tok/s"
                 + (f", {entry['x_roofline']:.2f}x roofline" if args.copy_gbps else ""))
        for n in args.prefill:
            exe = compiled.get((v.name, f"prefill_{n}"))
            if exe is None:
                continue
            batch, sampling, steps, rows = inputs[f"prefill_{n}"]

            def call(exe=exe, batch=batch, sampling=sampling, steps=steps, rows=rows):
                out, box["cache"], _ = exe(state, box["cache"], None, batch, sampling, steps, rows, None, None)
                jax.block_until_ready(out.tokens)

            try:
                call()
                med, times = _median_time(call, max(2, args.repeats // 2))
            except Exception as e:  # noqa: BLE001
                result.setdefault("errors", {})[f"prefill_{n}"] = f"{type(e).__name__}: {str(e)[:2000]}"
                continue
            flops = prefill_flops(model, n, weights)
            entry = {"ttft_ms": med * 1e3, "tok_s": n / med, "flops": flops}
            if args.matmul_tflops:
                entry["x_compute_roofline"] = med / (flops / (args.matmul_tflops * 1e12))
            result["prefill"][str(n)] = entry
            if n in args.profile_prefill:
                _profile(args, result, f"prefill_{n}", call, 1, exe, v.name)
            _say(args, f"{v.name} prefill {n}: {med * 1e3:.1f} ms")
        if args.workload:
            p, o = _ints(args.workload)
            nearest = min(args.prefill, key=lambda x: abs(x - p)) if args.prefill else None
            pre = result["prefill"].get(str(nearest))
            dec = result["decode"].get("1")
            if pre and dec:
                total = pre["ttft_ms"] / 1e3 + (o - 1) * dec["step_ms"] / 1e3
                result["workload"] = {"prompt": p, "output": o, "output_tok_s": o / total, "seconds": total,
                                      "note": f"TTFT of a {nearest}-token prompt + {o - 1} batch-1 decode steps at "
                                      f"{args.context} tokens of context"}
                _say(args, f"{v.name} workload {p}->{o} at concurrency 1: {o / total:.1f} output tok/s")
        result["total_s"] = time.perf_counter() - t_start
        results.append(result)
    return results


def _profile(args, result: dict, key: str, call, steps: int, exe, variant: str) -> None:
    """result["profile"][key] = profile_call(call, ...) (or the error: a profile is a diagnostic, the figures stand
    without it), and with --hlo-dir the program's optimized HLO beside it."""
    try:
        result.setdefault("profile", {})[key] = profile_call(call, steps, args.profile_top)
    except Exception as e:  # noqa: BLE001
        result.setdefault("profile", {})[key] = {"error": f"{type(e).__name__}: {e}"[:500]}
    if args.hlo_dir:
        os.makedirs(args.hlo_dir, exist_ok=True)
        name = f"{args.preset}_{args.experts}_{variant}_{key}.hlo.txt".replace("+", "_")
        with open(os.path.join(args.hlo_dir, name), "w") as f:
            f.write(exe.as_text())


def profile_call(call, steps: int, top: int = 60) -> dict:
    """Run call() once under jax.profiler.trace and sum the device's events by name: where a step's time goes.

    Returns {"lines_ms": busy ms per step of each trace line, "span_ms", "events",
    "top": [["line | name", total ms per step, count per step], ...]}."""
    import glob
    import gzip
    import tempfile

    import jax

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            call()
        paths = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
        with gzip.open(paths[0]) as f:
            data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device = {pid for pid, name in procs.items() if "host" not in name.lower()} or set(procs)  # CPU: the host's
    # Keyed by line and name: a device's trace has a line per stream and summary lines ("XLA Ops", "XLA Modules")
    # that cover the same time again.
    totals: dict[str, list[float]] = {}
    lines: dict[str, float] = {}
    first, last = float("inf"), 0.0
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in device:
            continue
        line = threads.get((e["pid"], e["tid"]), str(e["tid"]))
        lines[line] = lines.get(line, 0.0) + e["dur"]
        t = totals.setdefault(f"{line} | {e['name']}", [0.0, 0])
        t[0] += e["dur"]
        t[1] += 1
        first, last = min(first, e["ts"]), max(last, e["ts"] + e["dur"])
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])
    return {"processes": sorted(procs.values()), "events": sum(c for _, c in totals.values()),
            "lines_ms": {k: round(v / 1e3 / steps, 4) for k, v in lines.items()},
            "span_ms": (last - first) / 1e3 / steps if totals else 0.0,
            "top": [[name, round(t / 1e3 / steps, 4), c / steps] for name, (t, c) in ranked[:top]]}


def _cost_bytes(exe) -> float | None:
    try:
        cost = exe.cost_analysis()
        if isinstance(cost, list):
            cost = cost[0]
        return float(cost["bytes accessed"])
    except Exception:  # noqa: BLE001 (not every backend reports it)
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.reduced and "pallas" in args.attention:
        os.environ.setdefault("GEMMA4_JAX_PALLAS_INTERPRET", "1")
    results = run(args)
    if args.json:
        with open(args.json, "a") as f:
            for result in results:
                f.write(json.dumps(result) + "\n")
    else:
        print(json.dumps(results, indent=1))
    return 0 if not any(r.get("errors") for r in results) else 3


if __name__ == "__main__":
    sys.exit(main())
