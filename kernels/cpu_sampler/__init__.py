"""The sampler's row reductions on CPU: an XLA FFI custom call (cpu_sampler.cc), built on first use
(kernels/cpu_build.py), that returns per row of (B, V) float32 logits the max, the first argmax and the summed
exponentials from one read of the row. reference.py is what it must equal (and what serving/sampling.py builds its
XLA path from); test_cpu_sampler.py compares the two. serving/sampling.py `sample` takes its greedy tokens and token
logprobs from it on a one-device CPU.
"""

from gemma4_jax.kernels.cpu_sampler.kernel import load, logits_stats
from gemma4_jax.kernels.cpu_sampler.reference import (
    LogitsStats,
    first_max_index,
    logits_stats_reference,
    reduce_max_or_nan,
    sum_exp,
)

__all__ = ["LogitsStats", "first_max_index", "load", "logits_stats", "logits_stats_reference", "reduce_max_or_nan",
           "sum_exp"]
