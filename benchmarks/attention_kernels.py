"""Attention backends side by side on one layer: the Pallas kernel (`pallas`) against the XLA reference (`xla`),
on the K/V views the engine hands them (a paged pool for full layers; for sliding layers the sliding pool through a
windowed page table), at Gemma 4
layer shapes with random pools. Compile time and steady-state time separately; beside each time, the K/V bytes
the step must read and the achieved bandwidth, against a measured device copy (the roofline of a decode step).

Full mode (a GPU): 31B full layer (H 512, 32 query heads over 4 KV heads) and sliding layer (H 256, 16 KV heads,
ring of 1024) decode at batch 1, 8, 64 with 2k-8k contexts, T=4 verify rows, and 512-token prefill chunks.
--reduced: tiny shapes, the kernel in interpret mode, so that the script runs end to end on a CPU (its times
mean nothing there).

Usage: python benchmarks/attention_kernels.py [--reduced] [--out results.json] [--repeats 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax.attention_backends import XlaAttention
from gemma4_jax.kv_view import PagedKV
from gemma4_jax.pallas_attention import PallasAttention


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "full" (paged pool) or "sliding" (ring)
    batch: int
    t: int  # query tokens per row
    context: int  # cached tokens per row before the step (rows get 50-100% of it: ragged)
    q_heads: int
    kv_heads: int
    head_dim: int
    window: int | None = None  # sliding layers: the ring holds `window` slots
    page_size: int = 16


def full_cases() -> list[Case]:
    cases = []
    for b in (1, 8, 64):
        cases.append(Case(f"decode full b{b} ctx8k", "full", b, 1, 8192, 32, 4, 512))
        cases.append(Case(f"decode sliding b{b} ctx8k", "sliding", b, 1, 8192, 32, 16, 256, window=1024))
    cases.append(Case("verify T4 full b8 ctx4k", "full", 8, 4, 4096, 32, 4, 512))
    cases.append(Case("prefill chunk 512 full b1 ctx4k", "full", 1, 512, 4096, 32, 4, 512))
    cases.append(Case("prefill chunk 512 sliding b1 ctx4k", "sliding", 1, 512, 4096, 32, 16, 256, window=1024))
    return cases


def reduced_cases() -> list[Case]:
    return [
        Case("decode full b2 ctx40", "full", 2, 1, 40, 4, 1, 32, page_size=4),
        Case("decode sliding b2 ctx40", "sliding", 2, 1, 40, 4, 2, 16, window=16),
        Case("prefill chunk 8 sliding b1 ctx20", "sliding", 1, 8, 20, 4, 2, 16, window=16),
    ]


def build(case: Case, dtype, seed: int = 0):
    """(q (B, T, N, H), view, q_positions (B, T), K/V bytes the step must read)."""
    rng = np.random.default_rng(seed)
    b, t, kv, h = case.batch, case.t, case.kv_heads, case.head_dim
    context = (case.context * rng.uniform(0.5, 1.0, b)).astype(np.int32)
    lengths = context + t
    q_pos = jnp.asarray(context[:, None] + np.arange(t)[None, :], jnp.int32)
    q = jax.random.normal(jax.random.key(seed), (b, t, case.q_heads, h), dtype)
    itemsize = jnp.dtype(dtype).itemsize
    if case.kind == "full":
        pages_per_row = -(-int(lengths.max()) // case.page_size)
        num_pages = b * pages_per_row + 1
        table = rng.permutation(np.arange(1, num_pages)).reshape(b, pages_per_row).astype(np.int32)
        shape = (num_pages, case.page_size, kv, h)
        k = jax.random.normal(jax.random.key(seed + 1), shape, dtype)
        v = jax.random.normal(jax.random.key(seed + 2), shape, dtype)
        view = PagedKV(k, v, jnp.asarray(table), jnp.asarray(lengths, jnp.int32), dtype=jnp.dtype(dtype))
        keys = int(lengths.sum())
    else:
        # The engine's sliding pool (kv_cache.py): pages like the full pool, read through a windowed table that
        # starts at the first page the window can reach (PagedKV.start); this step's tokens are already in it.
        first = np.maximum(context - (case.window - 1), 0) // case.page_size
        last = (lengths - 1) // case.page_size
        width = int((last - first).max()) + 1
        num_pages = b * width + 1
        table = np.zeros((b, width), np.int32)  # the trash page past a row's last page
        ids = rng.permutation(np.arange(1, num_pages))
        for i in range(b):
            n = int(last[i] - first[i]) + 1
            table[i, :n] = ids[i * width : i * width + n]
        shape = (num_pages, case.page_size, kv, h)
        k = jax.random.normal(jax.random.key(seed + 1), shape, dtype)
        v = jax.random.normal(jax.random.key(seed + 2), shape, dtype)
        start = jnp.asarray(first * case.page_size, jnp.int32)
        view = PagedKV(k, v, jnp.asarray(table), jnp.asarray(lengths, jnp.int32), dtype=jnp.dtype(dtype), start=start)
        keys = int(np.minimum(lengths, case.window + t - 1).sum())
    return q, view, q_pos, 2 * keys * kv * h * itemsize


def copy_bandwidth(mib: int) -> float:
    """GB/s of a device copy (read + write) of a `mib`-MiB array: the step's roofline counts reads only."""
    x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    copy(x).block_until_ready()
    best = min(_timed(lambda: copy(x)) for _ in range(5))
    return 2 * x.nbytes / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


INNER = 16  # attention calls per timed program: one dispatch per 16 layers' worth, as inside a model step


def run_case(case: Case, backend, dtype, repeats: int) -> dict:
    """Median time of one attention call, from programs that each run it INNER times in a loop (each call's query
    depends on the previous output, so none is skipped): the host's dispatch of a lone call (~0.1 ms) would
    otherwise swamp a decode layer's microseconds."""
    q, view, q_pos, kv_bytes = build(case, dtype)

    def attend(q):
        return backend(q, view, q_pos, sliding_window=case.window, blocks=None)

    def loop(q):
        def body(_, carry):
            out = attend(carry)
            return carry + (out * 0).astype(carry.dtype)  # a data dependency, no change

        return jax.lax.fori_loop(0, INNER, body, q)

    step = jax.jit(loop)
    compile_s = _timed(lambda: step(q))
    times = [_timed(lambda: step(q)) for _ in range(repeats)]
    out = np.asarray(jax.jit(attend)(q), np.float32)
    return {"compile_s": compile_s, "step_ms": 1e3 * statistics.median(times) / INNER, "kv_bytes": kv_bytes,
            "out": out}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reduced", action="store_true", help="tiny shapes, the kernel in interpret mode (any CPU)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--dtype", default=None, help="default bfloat16 (float32 with --reduced)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    reduced = args.reduced
    if not reduced and jax.default_backend() != "gpu":
        ap.error(f"full mode needs a GPU (default backend: {jax.default_backend()}); pass --reduced")
    dtype = jnp.dtype(args.dtype or ("float32" if reduced else "bfloat16"))
    repeats = min(args.repeats, 2) if reduced else args.repeats
    bandwidth = copy_bandwidth(16 if reduced else 1024)
    kernel = PallasAttention(name="pallas-interpret", interpret=True) if reduced else PallasAttention()
    rows = []
    for case in reduced_cases() if reduced else full_cases():
        row = {"case": case.name, **dataclasses.asdict(case)}
        for label, backend in (("xla", XlaAttention()), ("pallas", kernel)):
            try:
                result = run_case(case, backend, dtype, repeats)
            except Exception as e:  # noqa: BLE001 (a case that fails to compile is reported; the others run)
                result = {"error": f"{type(e).__name__}: {str(e)[:1500]}", "step_ms": float("nan"),
                          "compile_s": float("nan"), "kv_bytes": build(case, dtype)[3]}
                print(f"{case.name}: {label} failed: {result['error'][:400]}", flush=True)
            row[label] = result
            row[f"{label}_gb_s"] = result["kv_bytes"] / (result["step_ms"] / 1e3) / 1e9
        outs = [row[label].pop("out", None) for label in ("xla", "pallas")]
        if all(o is not None for o in outs):  # the kernel computes what xla computes
            row["max_abs_diff"] = float(np.abs(outs[0] - outs[1]).max())
        row["roofline_ms"] = 1e3 * row["xla"]["kv_bytes"] / (bandwidth * 1e9)
        row["speedup"] = row["xla"]["step_ms"] / row["pallas"]["step_ms"]
        rows.append(row)
        print(
            f"{case.name:36s} xla {row['xla']['step_ms']:9.3f} ms  pallas {row['pallas']['step_ms']:9.3f} ms  "
            f"roofline {row['roofline_ms']:8.3f} ms  x{row['speedup']:.2f}  "
            f"max|diff| {row.get('max_abs_diff', -1):.1e}",
            flush=True,
        )
    result = {
        "device": str(jax.devices()[0]),
        "reduced": reduced,
        "dtype": dtype.name,
        "copy_gb_s": bandwidth,
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def markdown(result: dict) -> str:
    """The results as a markdown table (gpu_check.py writes it beside the JSON)."""
    lines = [
        f"Device: {result['device']} ({result['dtype']}; copy bandwidth {result['copy_gb_s']:.0f} GB/s"
        + ("; reduced: interpret mode, times meaningless" if result["reduced"] else "")
        + ")",
        "",
        "| case | xla ms | pallas ms | K/V roofline ms | pallas GB/s | speed-up | max abs diff | compile xla / "
        "pallas s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['case']} | {r['xla']['step_ms']:.3f} | {r['pallas']['step_ms']:.3f} | "
            f"{r['roofline_ms']:.3f} | {r['pallas_gb_s']:.0f} | {r['speedup']:.2f} | {r.get('max_abs_diff', -1):.1e} | "
            f"{r['xla']['compile_s']:.1f} / {r['pallas']['compile_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(main()))
