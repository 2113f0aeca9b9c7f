"""The machine's limits and a checkpoint's costs, for the roofline columns of `gemma4-jax bench --peers`.

Two measured rates of the machine, taken in a fresh process (`python -m gemma4_jax.bench.roofline N MIB` prints
them as JSON) so the benchmark's orchestrator holds no JAX or torch thread pools:
- GEMM rate (GFLOP/s): square N x N matmuls in numpy (float32), torch (float32, bfloat16) and JAX (float32,
  bfloat16), whichever are installed; the roofline uses the best rate of the run's dtype;
- read bandwidth (GB/s): a GEMV over a MIB-MiB float32 matrix in numpy and JAX (a batch-1 decode step is exactly
  that: every weight read once, two FLOPs per weight).

Costs come from the checkpoint's safetensors header (names, shapes, dtypes), so they count the weights every
system really loads:
- FLOPs of the whole workload, counting only the work the output needs: 2 FLOPs per weight of every matmul per
  token, the (tied) LM head only for tokens whose logits are used (the last prompt token and the decode tokens),
  the KV-shared layers only for the last prompt token (nothing reads their prompt-position outputs), attention
  scores and values (4 x heads x head_dim x attended keys per layer per token, sliding layers capped at the window).
  The PLE table is a gather, not a matmul;
- bytes read per decode step at batch 1: every weight once (the tied embedding as the LM head), except the PLE
  table (one row per token) and K/V projections the KV-shared layers do not use.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
import time
from typing import Any

# ----------------------------------------------------------------------------------------------------------------
# Costs of a checkpoint

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def checkpoint_costs(hf_dir: str, config: dict[str, Any]) -> dict[str, Any]:
    """Weights of an HF Gemma 4 text checkpoint, split by how a token uses them.

    Returns {"matmul_params_per_layer": {layer: n}, "matmul_params_other": n (e.g. the PLE model projection),
    "lm_head_params": n, "gathered_params": n (embedding and PLE tables), "bytes_per_step": bytes read by one
    batch-1 decode step, "dtype_bytes": bytes per weight of the matmuls, "num_params": all}.
    """
    from safetensors import safe_open

    first_shared = config["num_hidden_layers"] - config.get("num_kv_shared_layers", 0)
    per_layer: dict[int, int] = {}
    other = gathered = lm_head = num_params = 0
    step_bytes = 0
    dtype_bytes = 0
    tied = config.get("tie_word_embeddings", True)
    files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {hf_dir}")
    for file in files:
        with safe_open(file, "np") as f:
            for name in f.keys():
                tensor = f.get_slice(name)
                shape = tensor.get_shape()
                size = 1
                for d in shape:
                    size *= int(d)
                width = {"F32": 4, "BF16": 2, "F16": 2}.get(tensor.get_dtype(), 4)
                num_params += size
                layer = _LAYER.search(name)
                if "embed_tokens_per_layer" in name:  # PLE table: one row per token is read
                    gathered += size
                    continue
                if name.endswith("embed_tokens.weight"):
                    gathered += size
                    if tied:  # read whole as the LM head every step
                        lm_head += size
                        step_bytes += size * width
                    continue
                if name.endswith("lm_head.weight"):
                    lm_head += size
                    step_bytes += size * width
                    continue
                if layer and int(layer.group(1)) >= first_shared and re.search(r"\.(k_proj|v_proj|k_norm)\.", name):
                    continue  # a KV-shared layer reads another layer's cache; its own K/V weights are never used
                step_bytes += size * width
                if len(shape) < 2:
                    continue  # norms and scales: bytes, no matmul
                dtype_bytes = width
                if layer:
                    index = int(layer.group(1))
                    per_layer[index] = per_layer.get(index, 0) + size
                else:
                    other += size
    return {
        "matmul_params_per_layer": per_layer,
        "matmul_params_other": other,
        "lm_head_params": lm_head,
        "gathered_params": gathered,
        "bytes_per_step": step_bytes,
        "dtype_bytes": dtype_bytes,
        "num_params": num_params,
    }


def _attention_flops(config: dict[str, Any], layer: int, position: int) -> int:
    """Score and value FLOPs of one token at `position` (0-based) in `layer`: 2 matmuls x 2 FLOPs per MAC."""
    sliding = config["layer_types"][layer] == "sliding_attention"
    head_dim = config["head_dim"] if sliding else config.get("global_head_dim") or config["head_dim"]
    keys = min(position + 1, config["sliding_window"]) if sliding else position + 1
    return 4 * config["num_attention_heads"] * head_dim * keys


def workload_flops(costs: dict[str, Any], config: dict[str, Any], input_len: int, output_len: int) -> float:
    """FLOPs one prompt of `input_len` tokens needs to produce `output_len` greedy tokens (see the module doc)."""
    layers = config["num_hidden_layers"]
    first_shared = layers - config.get("num_kv_shared_layers", 0)
    per_layer = costs["matmul_params_per_layer"]
    total = 0.0
    # Positions 0 .. input_len-1 are the prompt; input_len .. input_len+output_len-2 are decode steps (the first
    # new token comes from the prompt's last position, the last one is never fed back).
    for position in range(input_len + output_len - 1):
        needs_output = position >= input_len - 1
        total += 2 * costs["matmul_params_other"]
        for layer in range(layers):
            if layer >= first_shared and not needs_output:
                continue
            total += 2 * per_layer.get(layer, 0) + _attention_flops(config, layer, position)
        if needs_output:
            total += 2 * costs["lm_head_params"]
    return total


# ----------------------------------------------------------------------------------------------------------------
# Rates of the machine


def _best_time(fn, min_seconds: float = 0.5, min_reps: int = 3) -> float:
    """Best wall time of `fn()` over at least `min_reps` calls and `min_seconds` (after one untimed call)."""
    fn()
    best = float("inf")
    start = time.perf_counter()
    reps = 0
    while reps < min_reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return best


def measure_machine(gemm_size: int = 2048, bandwidth_mib: int = 256) -> dict[str, Any]:
    """GEMM GFLOP/s per library and dtype and GEMV read GB/s, measured in this process (see the module doc)."""
    import numpy as np

    n = gemm_size
    flops = 2.0 * n**3
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), np.float32)
    b = rng.standard_normal((n, n), np.float32)
    rows = max(1, bandwidth_mib * 2**20 // (4 * 4096))
    w = rng.standard_normal((rows, 4096), np.float32)
    x = rng.standard_normal(4096).astype(np.float32)
    gemm = {"numpy float32": flops / _best_time(lambda: a @ b) / 1e9}
    read = {"numpy gemv float32": w.nbytes / _best_time(lambda: w @ x) / 1e9}
    try:
        import torch

        for dtype in (torch.float32, torch.bfloat16):
            ta, tb = torch.from_numpy(a).to(dtype), torch.from_numpy(b).to(dtype)
            gemm[f"torch {str(dtype).split('.')[-1]}"] = flops / _best_time(lambda ta=ta, tb=tb: ta @ tb) / 1e9
    except ImportError:
        pass
    try:
        import jax
        import jax.numpy as jnp

        dot = jax.jit(jnp.dot)
        for dtype in (jnp.float32, jnp.bfloat16):
            ja, jb = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
            gemm[f"jax {jnp.dtype(dtype).name}"] = (
                flops / _best_time(lambda ja=ja, jb=jb: dot(ja, jb).block_until_ready()) / 1e9
            )
        jw, jx = jnp.asarray(w), jnp.asarray(x)
        read["jax gemv float32"] = w.nbytes / _best_time(lambda: dot(jw, jx).block_until_ready()) / 1e9
    except ImportError:
        pass
    return {"gemm_gflops": gemm, "read_gb_s": read, "gemm_size": n, "bandwidth_mib": bandwidth_mib}


def best_gemm_gflops(machine: dict[str, Any], dtype: str) -> float:
    """The best measured GEMM rate of `dtype` (float32 or bfloat16) across libraries."""
    rates = [v for k, v in machine["gemm_gflops"].items() if k.endswith(dtype)]
    if not rates:
        raise ValueError(f"no GEMM rate measured for {dtype}: {sorted(machine['gemm_gflops'])}")
    return max(rates)


def best_read_gb_s(machine: dict[str, Any]) -> float:
    return max(machine["read_gb_s"].values())


if __name__ == "__main__":
    print(json.dumps(measure_machine(int(sys.argv[1]), int(sys.argv[2]))))
