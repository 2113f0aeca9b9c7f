"""Async scheduling against synchronous steps: output tokens/s of two engines on the same weights, alternating.

Both engines are built on one `from_config` model of a bench preset (random weights), warmed by one run each,
then run `--rounds` times in turn over fresh prompts (so the prefix cache never hits), greedy, with `--batch`
slots; a batch of 1 runs `--batch1-prompts` prompts one after the other (the peers' batch-1 workload). Prints
each round's out tok/s, the load average and whether the two produced the same tokens (they must).

Usage: python benchmarks/async_scheduling.py [--preset bench-100m] [--dtype bfloat16] [--batch 64] [--rounds 3]
       [--input-len 128] [--output-len 64] [--json results.json]      (figures: docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="bench-100m")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=64, help="engine slots (max_num_seqs)")
    p.add_argument("--batch1-prompts", type=int, default=8, help="prompts of a --batch 1 run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if min(args.batch, args.rounds, args.input_len, args.output_len, args.batch1_prompts) < 1:
        p.error("--batch, --rounds, --input-len, --output-len and --batch1-prompts must be positive")
    return args


def main(argv=None) -> dict:
    args = _parse_args(argv)
    import gemma4_jax
    from gemma4_jax import SamplingParams
    from gemma4_jax.bench.presets import bench_config
    from gemma4_jax.serving.engine import Engine, EngineConfig

    model = gemma4_jax.from_config(bench_config(args.preset), dtype=args.dtype, seed=0)
    vocab = model.config.text.vocab_size
    rs = np.random.RandomState(0)
    num_prompts = args.batch if args.batch > 1 else args.batch1_prompts
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    config = dict(max_num_seqs=args.batch, max_model_len=args.input_len + args.output_len,
                  max_num_batched_tokens=args.max_num_batched_tokens)
    engines = {mode: Engine(model, config=EngineConfig(**config, async_scheduling=mode == "async"))
               for mode in ("sync", "async")}

    def run(engine, prompts):
        for prompt in prompts:
            engine.add_request(prompt, params)
        t0, done = time.perf_counter(), {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.token_ids
                    engine.release(out.request_id)
        seconds = time.perf_counter() - t0
        return num_prompts * args.output_len / seconds, [done[k] for k in sorted(done, key=lambda r: int(r[4:]))]

    def fresh():
        return [[2] + list(rs.randint(16, vocab, size=args.input_len - 1)) for _ in range(num_prompts)]

    for engine in engines.values():
        run(engine, fresh())  # compiles
    rates = {mode: [] for mode in engines}
    same = True
    for _ in range(args.rounds):
        prompts = fresh()
        tokens = {}
        for mode, engine in engines.items():
            rate, tokens[mode] = run(engine, prompts)
            rates[mode].append(round(rate, 1))
        same &= tokens["sync"] == tokens["async"]
    result = {"preset": args.preset, "dtype": args.dtype, "batch": args.batch, "out_tok_s": rates,
              "same_tokens": same, "load_avg_1m": os.getloadavg()[0],
              "chained_steps": engines["async"].stats["chained_steps"]}
    print(f"{args.preset} {args.dtype} batch {args.batch}: synchronous {rates['sync']} / async {rates['async']} "
          f"out tok/s; same tokens: {same}; load {result['load_avg_1m']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
