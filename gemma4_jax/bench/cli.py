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

With `--url` the command loads a running `gemma4-jax serve` instead (`serving_load.py`, `vllm bench serve` style).
This file holds the command's arguments and the run itself; presets.py, offline.py, hf_baseline.py and report.py do
the parts.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from gemma4_jax.bench.hf_baseline import agreement, bench_hf, load_hf_model, make_hf_checkpoint
from gemma4_jax.bench.offline import XlaCompiles, bench_ours
from gemma4_jax.bench.peers import add_peer_arguments, cmd_peers
from gemma4_jax.bench.presets import BENCH_PRESETS, bench_config, bench_preset_dict, random_prompts
from gemma4_jax.bench.report import format_report, json_safe

# Presets with the family's real sizes: their random weights come from random_weights.random_model.
REAL_SIZE = ("e2b", "e4b", "26b-a4b", "31b")


def _commit() -> str | None:
    """Short hash of the checked-out commit, recorded with the results (None outside a git checkout)."""
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
    g.add_argument(
        "--experts",
        choices=("bf16", "nvfp4", "fp8"),
        default="bf16",
        help="MoE presets (26b-a4b): store the random experts packed in NVFP4 or FP8, as an experts-only quantized "
        "checkpoint does (default: in --dtype)",
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
        help="also time HF transformers generate on the same (HF-made random) checkpoint, in the same dtype as ours",
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
            help="decode steps per engine call when no prefill is pending (default: the engine's; with --peers: "
            "the steps of the extra 'ours_steps' row, default 4, 1 leaves it out)",
        )
    except argparse.ArgumentError:
        pass  # the shared engine options already provide it
    sp = p.add_argument_group("speculative decoding (docs/speculative.md): the report adds its acceptance figures")
    sp.add_argument("--speculative-config", default=None, metavar="JSON",
                    help='vLLM\'s form, e.g. \'{"method": "ngram", "num_speculative_tokens": 3}\'')
    sp.add_argument("--draft-model", default=None, metavar="DIR", help="MTP assistant checkpoint (method mtp)")
    sp.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K", help="drafts per step")
    add_peer_arguments(p)
    p.set_defaults(func=cmd_bench)
    return p


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by parsed `bench` arguments; returns the results dict (also the JSON)."""
    import jax

    import gemma4_jax

    XlaCompiles.install()
    from gemma4_jax.model import resolve_dtype

    dtype = np.dtype(resolve_dtype(args.dtype or "auto")).name  # "auto": model.resolve_dtype
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if args.model is not None and args.preset is not None:
        raise ValueError("give --model or --preset, not both")
    if args.experts != "bf16" and (args.model is not None or args.hf_baseline):
        raise ValueError("--experts packs a preset's random experts; a --model or --hf-baseline checkpoint keeps its "
                         "own experts")
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
        elif args.experts != "bf16" or (args.preset or "").lower() in REAL_SIZE:
            # Real-size presets: random weights by one small generator per shape (random_weights.py), not
            # from_config's single init program (minutes to compile at this size); NVFP4/FP8 experts packed.
            from gemma4_jax.random_weights import random_model

            model = random_model(bench_config(args.preset or "bench-100m"), dtype=dtype, experts=args.experts,
                                 seed=args.seed)
            hf_path = None
        else:
            model = gemma4_jax.from_config(bench_config(args.preset or "bench-100m"), dtype=dtype, seed=args.seed)
            hf_path = None
        cfg = model.config.text
        max_model_len = args.max_model_len or args.input_len + args.output_len
        engine_options = dict(
            max_model_len=max_model_len,
            max_num_batched_tokens=args.max_num_batched_tokens,
            attention_backend=args.attention_backend,
            enable_prefix_caching=args.enable_prefix_caching,
            async_scheduling=getattr(args, "async_scheduling", None),
        )
        if getattr(args, "num_scheduler_steps", None) is not None:
            engine_options["num_scheduler_steps"] = args.num_scheduler_steps
        if args.speculative_config or args.draft_model or args.num_speculative_tokens:
            spec = json.loads(args.speculative_config) if args.speculative_config else {}
            for key, value in (("model", args.draft_model), ("num_speculative_tokens", args.num_speculative_tokens)):
                if value is not None:
                    spec[key] = value
            from gemma4_jax.serving.speculative import SpeculativeConfig

            SpeculativeConfig.resolve(spec)  # refused here with the key's name, before anything runs
            engine_options["speculative_config"] = spec  # the dict: recorded in the JSON results as given
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
            hf = load_hf_model(hf_path, dtype)  # the same dtype as ours: a bf16 run is never compared with f32
            hf_dtype = str(next(hf.parameters()).dtype).removeprefix("torch.")
            if hf_dtype != dtype:
                print(f"WARNING: the HF baseline runs in {hf_dtype} and ours in {dtype}: the ratios and the greedy "
                      "agreement compare different precisions", file=sys.stderr, flush=True)
            n_hf = min(args.hf_num_prompts or args.num_prompts, args.num_prompts)
            results["config"]["hf"] = {
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "dtype": hf_dtype,
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
            # Same checkpoint, same dtype, greedy: the sequences agree but for near-ties (hf_baseline.agreement).
            results["greedy_agreement"] = {
                f"ours@{c} vs hf@{b}": agreement(our_tokens[c], hf_tokens[b]) for c in our_tokens for b in hf_tokens
            }
        results["self_agreement"] = {
            f"ours@{c} vs ours@{concurrencies[0]}": agreement(our_tokens[c], our_tokens[concurrencies[0]])
            for c in concurrencies[1:]
        }
    finally:
        if tmp is not None:
            tmp.cleanup()
    return results


def cmd_bench_serve(args: argparse.Namespace) -> int:
    """Serving mode: random token-id prompts against a live server; TTFT/TPOT/ITL percentiles, throughput."""
    import asyncio

    import httpx

    from gemma4_jax.bench import serving_load

    url = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        models = httpx.get(f"{url}/v1/models", headers=headers, timeout=10).json()["data"]
        model = args.served_model_name or models[0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise ValueError(f"cannot reach a gemma4-jax server at {url}: {e}") from None
    # Token ids below 256 exist in every Gemma vocabulary (and in the demo model's 512).
    results = asyncio.run(
        serving_load.run(
            url,
            model,
            args.num_prompts,
            args.input_len,
            args.output_len,
            vocab_size=256,
            request_rate=args.request_rate,
            max_concurrency=args.max_concurrency,
            seed=args.seed,
            api_key=args.api_key,
        )
    )
    print(serving_load.format_report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(json_safe(results), f, indent=2)
    return 0 if results["failed"] == 0 else 1


def cmd_bench(args: argparse.Namespace) -> int:
    """`gemma4-jax bench`: the offline run (tables, optional JSON), or serving mode when `--url` is given."""
    if args.peers:
        return cmd_peers(args)
    if args.url:
        return cmd_bench_serve(args)
    results = run_bench(args)
    print(format_report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(json_safe(results), f, indent=2, allow_nan=False)
    bad = [r["concurrency"] for r in results["ours"] if r["compiles_timed"] or r["xla_compiles_timed"]]
    if bad:
        print(
            f"warning: the timed run recompiled at concurrency {bad}: steady-state figures include compile time",
            file=sys.stderr,
        )
    return 0
