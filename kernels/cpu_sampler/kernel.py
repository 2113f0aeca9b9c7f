"""The CPU sampler reductions: registering cpu_sampler.cc with XLA (kernels/cpu_build.py: built on first use with the
machine's C++ compiler) and calling it."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from gemma4_jax.kernels import cpu_build
from gemma4_jax.kernels.cpu_sampler.reference import LogitsStats

SOURCE = Path(__file__).with_name("cpu_sampler.cc")
TARGET = "gemma4_cpu_logits_stats"
# The kernel's lanes count indices in int32 up to V + 63.
MAX_VOCAB = 2**31 - 65


def load() -> str | None:
    """Build and register the custom call once per process: None when ready, else why it is not."""
    return cpu_build.load(SOURCE, "Gemma4CpuLogitsStats", TARGET)


def logits_stats(logits: jax.Array) -> LogitsStats:
    """(B, V) float32 logits -> LogitsStats(row_max (B, 1) float32, argmax (B,) int32, sum_exp (B,) float32), per row
    the max (NaN where the row holds one), the first index holding it (the first NaN's where there is one) and
    sum(exp(logits - max)): `logits_stats_reference` (reference.py), in one call that reads each row once and once
    more from cache. Raises ValueError for shapes or dtypes it does not take, RuntimeError when the kernel could not
    be built."""
    if logits.ndim != 2 or logits.dtype != jnp.float32 or not 1 <= logits.shape[1] <= MAX_VOCAB:
        raise ValueError(f"logits_stats takes (B, V) float32 logits with 1 <= V <= {MAX_VOCAB}, got {logits.dtype} "
                         f"{logits.shape}")
    reason = load()
    if reason is not None:
        raise RuntimeError(reason)
    b = logits.shape[0]
    call = jax.ffi.ffi_call(TARGET, (jax.ShapeDtypeStruct((b, 1), jnp.float32), jax.ShapeDtypeStruct((b,), jnp.int32),
                                     jax.ShapeDtypeStruct((b,), jnp.float32)))
    return LogitsStats(*call(logits))
