"""The sampler's row reductions, reference side: what the CPU custom call (cpu_sampler.cc) must equal.

Per row of (B, V) float32 logits: the max as `reduce_max_or_nan` gives it (NaN where the row holds one), the smallest
index holding it or holding a NaN (`first_max_index`: jnp.argmax's answer) and sum(exp(x - max)) (`sum_exp`: the
log normaliser of jax.nn.log_softmax before its log). serving/sampling.py builds `first_argmax` and
`token_log_softmax` from these same functions, so the reference is the sampler's XLA path by construction.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class LogitsStats(NamedTuple):
    """Per-row statistics of (B, V) float32 logits."""

    row_max: jax.Array  # (B, 1) float32, NaN where the row holds a NaN
    argmax: jax.Array  # (B,) int32, the first max (the first NaN where the row has one)
    sum_exp: jax.Array  # (B,) float32, sum(exp(logits - row_max)); NaN where row_max is NaN or +-inf


def _max_or_nan(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.where((a >= b) | jnp.isnan(a), a, b)


def reduce_max_or_nan(x: jax.Array) -> jax.Array:
    """jnp.max(x, axis=-1, keepdims=True) as a reduction with a combiner of its own that propagates NaN from either
    side (the same values, ties of +-0 aside, which compare equal)."""
    return jax.lax.reduce(x, jnp.asarray(-jnp.inf, x.dtype), _max_or_nan, (x.ndim - 1,))[..., None]


def first_max_index(x: jax.Array, top: jax.Array) -> jax.Array:
    """(..., V), its row max (..., 1) -> (...,) int32: the smallest index holding the max or a NaN (a row of -inf:
    0)."""
    index = jnp.arange(x.shape[-1], dtype=jnp.int32)
    hit = (x == top) | jnp.isnan(x)
    return jnp.min(jnp.where(hit, index, x.shape[-1]), axis=-1)


def sum_exp(x: jax.Array, top: jax.Array) -> jax.Array:
    """(..., V), its row max (..., 1) -> (...,): sum(exp(x - top)), NaN where top is NaN or +-inf."""
    return jnp.sum(jnp.exp(x - top), axis=-1)


def logits_stats_reference(logits: jax.Array) -> LogitsStats:
    """(B, V) float32 -> LogitsStats: what `logits_stats` must return (the max and the argmax bit for bit, ties of +-0
    aside, the sum within float32 rounding of a differently ordered sum)."""
    top = reduce_max_or_nan(logits)
    return LogitsStats(top, first_max_index(logits, top), sum_exp(logits, top))
