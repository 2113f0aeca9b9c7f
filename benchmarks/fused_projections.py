"""A decode step's projections as one CPU call per layer part against one call per weight, interleaved in one process.

On CPU a few-row decode step (batch 1-4) multiplies by each weight in its own custom call, a parallel region that
ends in a barrier; `layers.fused_linears` / `fused_gate_up` make a layer's q/k/v one call and its MLP's gate and up
(with the bfloat16 activation) another (kernels/cpu_matmul/cpu_matmul_fused.cc). This builds the benchmark model
once per dtype (benchmarks/gpu_models.py's `build`: random weights on huge pages, random KV pools), compiles the
decode step both ways (layers.FUSE_FEW_ROW_PRODUCTS read at trace time) and times them alternately, `--calls`
calls of one then of the other per round, so that both see the same stretch of this noisy machine. Prints, per
dtype and batch, the custom calls per step, each way's median step and the per-round ratios, with the load average.

    python benchmarks/fused_projections.py --preset bench-100m --dtypes bfloat16,float32 --batches 1,4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import gpu_models  # noqa: E402  (this folder's benchmark: the model, pools and batches it builds)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench-100m")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--batches", type=gpu_models._ints, default=[1, 4])
    ap.add_argument("--context", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=20, help="calls of each program per round")
    ap.add_argument("--json", default=None, help="append the results as one JSON line to this file")
    return ap.parse_args(argv)


def _lower(runner_lib, model, runner, cache, inputs, attention, fuse: bool):
    import jax

    from gemma4_jax import layers

    saved = layers.FUSE_FEW_ROW_PRODUCTS
    layers.FUSE_FEW_ROW_PRODUCTS = fuse
    jax.clear_caches()
    try:
        batch, sampling, steps = inputs
        state = getattr(model, "flat_state", model.state)
        with jax.set_mesh(runner.mesh):
            lowered = runner_lib.decode_steps.lower(model.static_graph, state, cache, None, batch, sampling, steps,
                                                    layout=runner.layout, attention=attention, num_logprobs=0,
                                                    num_steps=1)
        calls = lowered.as_text().count("stablehlo.custom_call @gemma4_cpu_matmul")
        return lowered.compile(), calls
    finally:
        layers.FUSE_FEW_ROW_PRODUCTS = saved
        jax.clear_caches()


def run_dtype(args, dtype: str) -> list[dict]:
    import jax

    from gemma4_jax.attention_backends import resolve_attention
    from gemma4_jax.serving import runner as runner_lib

    gm_args = gpu_models.parse_args(["--preset", args.preset, "--dtype", dtype, "--batches",
                                     ",".join(map(str, args.batches)), "--context", str(args.context),
                                     "--prefill", "16", "--decode-steps", "1"])
    model, runner, cache, per_row, _ = gpu_models.build(gm_args)
    attention = resolve_attention("auto", log_choice=lambda _: None)
    state = getattr(model, "flat_state", model.state)
    box = {"cache": cache}
    out = []
    for b in args.batches:
        inputs = (gpu_models.decode_batch(b, args.context, per_row, runner.layout, 1, model.config.text.vocab_size, b),
                  gpu_models.greedy(b), np.zeros((b,), np.int32))
        programs = {fuse: _lower(runner_lib, model, runner, box["cache"], inputs, attention, fuse)
                    for fuse in (False, True)}

        def call(exe, inputs=inputs):
            toks, box["cache"], _ = exe(state, box["cache"], None, *inputs)
            jax.block_until_ready(toks.tokens)
            return toks.tokens

        same = np.array_equal(np.asarray(call(programs[False][0])), np.asarray(call(programs[True][0])))
        times = {False: [], True: []}
        ratios = []
        loads = []
        for r in range(args.rounds):
            medians = {}
            for fuse in ((False, True) if r % 2 == 0 else (True, False)):
                exe = programs[fuse][0]
                t = []
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    call(exe)
                    t.append(time.perf_counter() - t0)
                times[fuse] += t
                medians[fuse] = float(np.median(t))
            ratios.append(medians[False] / medians[True])
            loads.append(os.getloadavg()[0])
        entry = {"dtype": dtype, "batch": b, "custom_calls": {"separate": programs[False][1],
                                                              "fused": programs[True][1]},
                 "separate_ms": 1e3 * float(np.median(times[False])), "fused_ms": 1e3 * float(np.median(times[True])),
                 "ratio_by_round": [round(x, 3) for x in ratios], "same_first_tokens": bool(same),
                 "load": [round(min(loads), 2), round(max(loads), 2)]}
        q = np.percentile(ratios, [25, 50, 75])
        print(f"{dtype} batch {b}: custom calls {entry['custom_calls']['separate']} -> "
              f"{entry['custom_calls']['fused']}; step {entry['separate_ms']:.3f} -> {entry['fused_ms']:.3f} ms; "
              f"separate/fused by round: median {q[1]:.3f} (quartiles {q[0]:.3f}-{q[2]:.3f}), "
              f"{sum(x > 1 for x in ratios)}/{len(ratios)} rounds faster fused; same tokens: {same}; "
              f"load {entry['load'][0]}-{entry['load'][1]}", flush=True)
        out.append(entry)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    results = []
    for dtype in args.dtypes.split(","):
        results += run_dtype(args, dtype)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"preset": args.preset, "context": args.context, "results": results}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
