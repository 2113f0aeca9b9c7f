"""MoE layer throughput, bf16 experts vs NVFP4 experts, and the expert memory of 26B-A4B with NVFP4.

    python benchmarks/moe.py [--tokens 512] [--hidden 512] [--experts 16] [--top-k 4] [--moe-intermediate 256]

Runs one MoE block (router, dispatch, two grouped matmuls, combine) jitted on the default device:
- unquantized:  stacked experts in the activation dtype (bf16 by default), `jax.lax.ragged_dot` (the XLA path)
- nvfp4-xla:    packed NVFP4 experts, one layer's weights unpacked inside the jitted step, then `ragged_dot`
- nvfp4-kernel: packed NVFP4 experts through `fp4_grouped_matmul` with backend "auto": the Pallas kernel on GPU,
                its pure-jnp reference elsewhere (CPU)
Compile time and steady-state time are measured separately; throughput is reported as tokens/s and as a ratio to
bf16 from the same run. The packed weights are random bytes (throughput does not depend on their values).
Then the bytes of expert weights of the 26B-A4B preset with NVFP4 experts, from jax.eval_shape (no memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import gemma4_jax
from gemma4_jax import quant
from gemma4_jax.config import preset
from gemma4_jax.kernels.fp4_grouped_matmul import fp4_grouped_matmul
from gemma4_jax.moe import MoEBlock, QuantExperts


class KernelExperts(QuantExperts):
    """QuantExperts whose grouped matmul is `fp4_grouped_matmul(backend="auto")` (kernel on GPU, reference else)."""

    def _project(self, proj, rows, group_sizes, group_ids):
        return fp4_grouped_matmul(rows, proj.w[...], proj.block_scale[...], proj.row_scale[...], group_sizes,
                                  out_dtype=rows.dtype, backend="auto")


def _random_packed(experts: QuantExperts, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for proj in (experts.gate_up, experts.down):
        proj.w[...] = jnp.asarray(rng.integers(0, 256, proj.w.shape, dtype=np.uint8))
        # block scales around 1, row scales ~ 1/sqrt(K): activations keep a sane size through the layer
        proj.block_scale[...] = jnp.asarray(rng.uniform(0.5, 2.0, proj.block_scale.shape)).astype(jnp.float8_e4m3fn)
        proj.row_scale[...] = jnp.full(proj.row_scale.shape, 0.3 / np.sqrt(2 * proj.w.shape[-1]), jnp.float32)


def build(cfg, variant: str, dtype) -> MoEBlock:
    block = MoEBlock(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    if variant != "unquantized":
        cls = KernelExperts if variant == "nvfp4-kernel" else QuantExperts
        block.experts = cls(cfg, quant.NVFP4)
        _random_packed(block.experts, 1)
    return block


def measure(block: MoEBlock, x: jax.Array, iters: int) -> tuple[float, float]:
    graphdef, state = nnx.split(block)

    @jax.jit
    def step(state, x):
        return nnx.merge(graphdef, state)(x)

    start = time.perf_counter()
    jax.block_until_ready(step(state, x))  # the block returns (out, router ids)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(iters):
        out = step(state, x)
    jax.block_until_ready(out)
    return compile_s, (time.perf_counter() - start) / iters


def expert_bytes_26b() -> dict[str, float]:
    cfg = preset("26b-a4b")
    text = cfg.text
    weights = text.num_hidden_layers * text.num_experts * 3 * text.moe_intermediate_size * text.hidden_size
    out = {"expert_weights": weights}
    for name, plan in (("bf16", None), ("nvfp4", quant.QuantPlan.experts_only(text.num_hidden_layers))):
        _, state = gemma4_jax.abstract_model(cfg, "bfloat16", plan)
        flat = [(".".join(map(str, p)), v) for p, v in nnx.to_flat_state(state)]
        nbytes = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for p, v in flat if ".moe.experts." in p)
        total = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for _, v in flat)
        out[name] = {"expert_bytes": nbytes, "bytes_per_weight": nbytes / weights, "model_bytes": total}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--moe-intermediate", type=int, default=256)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args(argv)

    base = preset("26b-a4b").text
    cfg = dataclasses.replace(base, hidden_size=args.hidden, num_experts=args.experts, top_k_experts=args.top_k,
                              moe_intermediate_size=args.moe_intermediate)
    dtype = jnp.dtype(args.dtype)
    x = jax.random.normal(jax.random.key(0), (1, args.tokens, args.hidden), jnp.float32).astype(dtype)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); MoE layer D={args.hidden} "
          f"E={args.experts} top-{args.top_k} I={args.moe_intermediate}, {args.tokens} tokens, {args.dtype}")
    results = {}
    for variant in ("unquantized", "nvfp4-xla", "nvfp4-kernel"):
        compile_s, step_s = measure(build(cfg, variant, dtype), x, args.iters)
        results[variant] = args.tokens / step_s
        print(f"  {variant:12s} compile {compile_s:6.2f} s  step {step_s * 1e3:8.2f} ms  "
              f"{results[variant]:10.0f} tokens/s  ({results[variant] / results['unquantized']:.2f}x unquantized)")
    mem = expert_bytes_26b()
    print(f"26B-A4B expert weights: {mem['expert_weights'] / 1e9:.2f} G")
    for name in ("bf16", "nvfp4"):
        m = mem[name]
        print(f"  {name:6s} experts {m['expert_bytes'] / 2**30:6.2f} GiB ({m['bytes_per_weight']:.4f} B/weight), "
              f"whole model {m['model_bytes'] / 2**30:6.2f} GiB")


if __name__ == "__main__":
    main()
