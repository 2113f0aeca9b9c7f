"""The NVFP4 grouped expert kernel against the XLA path at 26B-A4B's expert shapes, with a small tile sweep (issue 12).

For each row count (decode at batch 1 and 64 with top-8 routing, a prefill chunk) and each projection (gate_up:
N = 1408, K = 2816; down: N = 2816, K = 704) over 128 experts with uneven routing: the kernel at its default tiles
and at each candidate (block_m, block_n, block_k, num_warps, num_stages), and the XLA path the engine runs without
the kernel (`quant.grouped_matmul(backend="xla")`: unpack to bf16, `ragged_dot`). Every program is compiled in
parallel threads first; then each is timed (median of `--repeats` after a warm call) and checked against the
reference. Bytes moved per call (packed weights of the experts that have rows, activations in and out) over the
measured copy bandwidth give the roofline column.

--reduced: tiny shapes, interpret mode, two candidates (a CPU check that the script runs).

Usage: python benchmarks/fp4_experts.py [--reduced] [--copy-gbps 4300] [--json out.jsonl]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import sys
import time

import numpy as np

CANDIDATES = [  # (block_m, block_n, block_k, num_warps, num_stages)
    (16, 64, 64, 4, 3),
    (16, 32, 128, 4, 3),  # decode: more programs, fewer serial K steps (the second H200 run: 3.2 ms at batch 1)
    (16, 16, 256, 2, 3),
    (16, 128, 128, 4, 3),
    (16, 64, 256, 4, 3),
    (32, 128, 128, 4, 3),
    (64, 128, 64, 4, 3),
    (64, 128, 128, 8, 3),
    (128, 128, 64, 8, 3),
]


def operands(rng, rows, k, n, groups, dtype):
    import jax.numpy as jnp
    import ml_dtypes

    x = rng.standard_normal((rows, k)).astype(ml_dtypes.bfloat16)
    w = rng.integers(0, 256, (groups, n, k // 2), dtype=np.uint8)
    bits = rng.integers(0x20, 0x50, (groups, n, k // 16), dtype=np.uint8)
    block_scale = bits.view(ml_dtypes.float8_e4m3fn)
    row_scale = rng.uniform(0.25, 2.0, (groups, n)).astype(np.float32)
    counts = rng.multinomial(rows, rng.dirichlet(np.full(groups, 0.3)))
    return (jnp.asarray(x, dtype), jnp.asarray(w), jnp.asarray(block_scale), jnp.asarray(row_scale),
            jnp.asarray(counts, jnp.int32)), counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reduced", action="store_true")
    ap.add_argument("--copy-gbps", type=float, default=None)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=None, help="append the results as one JSON line")
    args = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp

    from gemma4_jax import quant
    from gemma4_jax.kernels.fp4_grouped_matmul import (
        default_tiles,
        fp4_grouped_matmul_pallas,
        fp4_grouped_matmul_reference,
    )

    interpret = args.reduced or jax.default_backend() != "gpu"
    if args.reduced:
        groups, shapes, rows_list, cands = 8, {"gate_up": (64, 32), "down": (32, 64)}, [8, 40], CANDIDATES[:2]
    else:
        groups, shapes, rows_list, cands = 128, {"gate_up": (1408, 2816), "down": (2816, 704)}, [8, 512, 8192], \
            CANDIDATES
    rng = np.random.default_rng(0)
    programs, data = {}, {}
    for rows in rows_list:
        for proj, (n, k) in shapes.items():
            ops, counts = operands(rng, rows, k, n, groups, jnp.bfloat16)
            data[(rows, proj)] = (ops, counts)
            group_ids = jnp.asarray(np.repeat(np.arange(groups), counts), jnp.int32)
            x, w, bs, rs, gs = ops
            programs[(rows, proj, "xla")] = jax.jit(
                lambda x, w, bs, rs, gs, ids: quant.grouped_matmul(quant.NVFP4, x, w, bs, rs, gs, ids, "xla")
            ).lower(x, w, bs, rs, gs, group_ids)
            tiles = [("default", None)] + [(f"{c[0]}x{c[1]}x{c[2]}/w{c[3]}s{c[4]}", c) for c in cands]
            for label, c in tiles:
                kw = {} if c is None else dict(block_m=c[0], block_n=c[1], block_k=c[2], num_warps=c[3],
                                               num_stages=c[4])
                programs[(rows, proj, label)] = jax.jit(
                    lambda x, w, bs, rs, gs, kw=kw: fp4_grouped_matmul_pallas(
                        x, w, bs, rs, gs, out_dtype=jnp.bfloat16, interpret=interpret, **kw)
                ).lower(x, w, bs, rs, gs)

    def compile_one(key):
        try:
            return key, programs[key].compile(), None
        except Exception as e:  # noqa: BLE001 (a tile the compiler rejects is reported, the others run)
            return key, None, f"{type(e).__name__}: {str(e)[:300]}"

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        compiled = list(pool.map(compile_one, list(programs)))
    compile_s = time.perf_counter() - t0
    results = []
    for (rows, proj, label), exe, err in compiled:
        ops, counts = data[(rows, proj)]
        n, k = shapes[proj]
        entry = {"rows": rows, "proj": proj, "n": n, "k": k, "variant": label}
        if label == "default":
            entry["tiles"] = default_tiles(rows, k, n, groups)
        if err:
            entry["error"] = err
            results.append(entry)
            continue
        call_args = ops if label != "xla" else (*ops, jnp.asarray(np.repeat(np.arange(groups), counts), jnp.int32))
        out = exe(*call_args)
        want = fp4_grouped_matmul_reference(*ops, out_dtype=jnp.float32)
        got = np.asarray(out, np.float32)[: int(counts.sum())]
        ref = np.asarray(want)[: int(counts.sum())]
        entry["rel_err"] = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
        times = []
        for _ in range(2 if args.reduced else args.repeats):
            t = time.perf_counter()
            jax.block_until_ready(exe(*call_args))
            times.append(time.perf_counter() - t)
        entry["us"] = float(np.median(times)) * 1e6
        used = int((counts > 0).sum())
        nbytes = used * n * (k // 2 + k // 16 + 4) + rows * (k + n) * 2
        entry["bytes"] = nbytes
        if args.copy_gbps:
            entry["x_roofline"] = entry["us"] / (nbytes / (args.copy_gbps * 1e9) * 1e6)
        results.append(entry)
    best = {}
    for e in results:
        if "us" in e and e["variant"] != "xla":
            key = (e["rows"], e["proj"])
            if key not in best or e["us"] < best[key]["us"]:
                best[key] = e
    print(f"fp4 experts: {len(programs)} programs compiled in {compile_s:.1f} s")
    print("| rows | proj | xla us | kernel default us | best tiles | best us | best x roofline | rel err |")
    print("|---|---|---|---|---|---|---|---|")
    for (rows, proj), b in sorted(best.items()):
        xla = next((e for e in results if e["rows"] == rows and e["proj"] == proj and e["variant"] == "xla"), {})
        dflt = next((e for e in results if e["rows"] == rows and e["proj"] == proj and e["variant"] == "default"), {})
        print(f"| {rows} | {proj} | {xla.get('us', float('nan')):.1f} | {dflt.get('us', float('nan')):.1f} | "
              f"{b['variant']} | {b['us']:.1f} | {b.get('x_roofline', float('nan')):.2f} | {b['rel_err']:.1e} |")
    errors = [e for e in results if "error" in e]
    if errors:
        print(f"{len(errors)} variants failed to compile, e.g. {errors[0]['variant']}: {errors[0]['error'][:200]}")
    bad = [e for e in results if e.get("rel_err", 0) > 2e-2]
    if bad:
        print(f"WRONG RESULTS: {[(e['rows'], e['proj'], e['variant'], e['rel_err']) for e in bad]}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"fp4_experts": results, "compile_s": compile_s}) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
