"""Decode throughput under pipeline / tensor parallelism, as ratios to pp=1, tp=1 in the same run.

On CPU the mesh is simulated (`--xla_force_host_platform_device_count=8`: eight "devices" sharing the host's
cores), so the figures say what the parallel layouts cost in dispatch, transfers and collectives, not what they
gain on real accelerators; on a GPU host run it with `--no-simulate` over the real devices.

Usage: python benchmarks/parallel.py [--layouts 1x1,2x1,4x1,1x2,2x2] [--num-prompts 16] [--output-len 32]
       [--json results.json]      (layouts are PPxTP; see docs/sharding.md for the figures)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", default="1x1,2x1,4x1,1x2,2x2", help="comma-separated PPxTP")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--input-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--num-scheduler-steps", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=None, help="pipeline micro-batches (default: pp)")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=12)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--no-simulate", action="store_true", help="use the real devices (GPU host)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def config_dict(hidden: int, layers: int) -> dict:
    """The bench-100m recipe (PLE, KV sharing, double-wide MLP), narrower: 12 layers split evenly on pp=2/4."""
    from gemma4_jax.bench import bench_preset_dict

    d = bench_preset_dict("bench-100m")
    d.update(hidden_size=hidden, intermediate_size=4 * hidden, vocab_size=8192, vocab_size_per_layer_input=8192,
             num_hidden_layers=layers, layer_types=d["layer_types"][:layers])
    return d


def run(args) -> dict:
    import jax
    import numpy as np

    import gemma4_jax
    from gemma4_jax.bench import drive, random_prompts
    from gemma4_jax.config import config_from_dict
    from gemma4_jax.serving.llm import LLM

    cfg = config_from_dict(config_dict(args.hidden_size, args.num_layers), where="parallel bench")
    layouts = [tuple(int(x) for x in item.split("x")) for item in args.layouts.split(",")]
    warm = random_prompts(args.num_prompts, args.input_len, cfg.text.vocab_size, seed=1)
    timed = random_prompts(args.num_prompts, args.input_len, cfg.text.vocab_size, seed=2)
    rows, reference = [], None
    for pp, tp in layouts:
        model = gemma4_jax.from_config(cfg, dtype=args.dtype, seed=0, pp=pp, tp=tp)
        llm = LLM(model, max_num_seqs=args.num_prompts, max_model_len=args.input_len + args.output_len + 16,
                  max_num_batched_tokens=args.num_prompts * args.input_len,
                  num_scheduler_steps=args.num_scheduler_steps, pipeline_microbatches=args.microbatches)
        t0 = time.perf_counter()
        drive(llm.engine, warm, args.output_len)
        warm_s = time.perf_counter() - t0
        r = drive(llm.engine, timed, args.output_len)
        decode_tokens = r["output_tokens"] - len(timed)  # the first token of each comes from its prefill
        decode_s = float(np.sum(r["decode_step_s"]))
        if reference is None:
            reference = r["tokens"]
        row = {
            "pp": pp, "tp": tp, "devices": pp * tp,
            "decode_tok_s": decode_tokens / decode_s,
            "output_tok_s": r["output_tokens"] / r["wall_s"],
            "warmup_s": warm_s,
            "timed_compiles": r["compiles"],
            "bubble": llm.engine.stats.get("pipeline_bubble", 0.0),
            "microbatches": llm.engine.stats.get("pipeline_microbatches", 1),
            "same_tokens_as_first": r["tokens"] == reference,
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        del llm, model
    base = rows[0]["decode_tok_s"]
    for row in rows:
        row["decode_ratio"] = row["decode_tok_s"] / base
    return {"platform": jax.default_backend(), "devices": len(jax.devices()), "config": {
        "hidden_size": args.hidden_size, "num_layers": args.num_layers},
        "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
        "num_scheduler_steps": args.num_scheduler_steps, "load_avg_1m": os.getloadavg()[0], "rows": rows}


def report(res: dict) -> str:
    lines = ["| pp | tp | micro-batches | decode tok/s | vs pp=1,tp=1 | bubble (schedule) | same greedy tokens |",
             "|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['pp']} | {r['tp']} | {r['microbatches']} | {r['decode_tok_s']:.0f} | "
                     f"{r['decode_ratio']:.2f}x | {r['bubble']:.2f} | {'yes' if r['same_tokens_as_first'] else 'NO'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parse_args(argv)
    if not args.no_simulate:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
    res = run(args)
    print(report(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
