"""The CPU sampler reductions (cpu_sampler.cc) against their reference (reference.py): random rows at the bench
vocabulary and at widths that leave 1-63 elements past the last 64-wide block (and V < 16), one row and 64, ties
(the first index wins), NaN (the first one: max NaN, its index, sum NaN), rows of -inf (max -inf, index 0, sum NaN as
-inf - -inf), +inf (its first index, sum NaN), -inf entries beside finite ones (they add 0) and the maximum in every
position of a 64-wide block. The max and the argmax bit for bit, the sum within 1e-6 relative (and within 2e-7 of a
float64 sum).

Timing (by hand, not a test; docs/kernels.md has the figures):
    x = jax.random.normal(jax.random.key(0), (64, 32768)) * 4
    jax.jit(logits_stats)(x) against jax.jit(logits_stats_reference)(x), median of ~50 calls each, interleaved.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax.kernels.cpu_sampler import LogitsStats, load, logits_stats, logits_stats_reference

pytestmark = pytest.mark.skipif(load() is not None, reason=f"CPU sampler kernel unavailable: {load()}")

kernel = jax.jit(logits_stats)
reference = jax.jit(logits_stats_reference)


def _assert_matches(x):
    got, want = kernel(x), reference(x)
    assert isinstance(got, LogitsStats)
    b = x.shape[0]
    assert got.row_max.shape == (b, 1) and got.row_max.dtype == jnp.float32
    assert got.argmax.shape == (b,) and got.argmax.dtype == jnp.int32
    assert got.sum_exp.shape == (b,) and got.sum_exp.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got.argmax), np.asarray(want.argmax))
    # Bit for bit (NaN payloads included: the row's own NaN)
    np.testing.assert_array_equal(np.asarray(got.row_max).view(np.uint32), np.asarray(want.row_max).view(np.uint32))
    got_sum, want_sum = np.asarray(got.sum_exp), np.asarray(want.sum_exp)
    np.testing.assert_array_equal(np.isnan(got_sum), np.isnan(want_sum))
    np.testing.assert_allclose(got_sum, want_sum, rtol=1e-6)
    return got


@pytest.mark.parametrize("b,v", [(64, 32768), (1, 32768), (3, 1), (2, 5), (4, 16), (5, 17), (7, 63), (2, 64),
                                 (3, 65), (6, 1000), (2, 32769), (1, 262144)])
@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_random_rows(b, v, scale):
    x = jax.random.normal(jax.random.key(b * 7 + v), (b, v), jnp.float32) * scale
    got = _assert_matches(x)
    x64 = np.asarray(x, np.float64)
    exact = np.exp(x64 - x64.max(axis=-1, keepdims=True)).sum(axis=-1)
    np.testing.assert_allclose(np.asarray(got.sum_exp), exact, rtol=2e-7)


def test_the_max_in_every_position():
    """Row r holds its max at index r (two 64-wide blocks and a 16-wide tail, 0 to 143), then ties at r and 3 r + 1."""
    v = 144
    x = jax.random.normal(jax.random.key(1), (v, v), jnp.float32)
    rows = jnp.arange(v)
    got = _assert_matches(x.at[rows, rows].set(10.0))
    np.testing.assert_array_equal(got.argmax, np.arange(v))
    tied = x.at[rows, rows].set(10.0).at[rows[: v // 3], 3 * rows[: v // 3] + 1].set(10.0)
    got = _assert_matches(tied)
    np.testing.assert_array_equal(got.argmax, np.arange(v))


def test_ties_nans_and_infinities():
    v = 1000
    x = jax.random.normal(jax.random.key(2), (12, v), jnp.float32)
    x = x.at[0, [5, 700]].set(9.0)  # a tie: the first one
    x = x.at[1, [699, 70, 64, 999]].set(9.0)  # ties in different lanes and blocks: the smallest index
    x = x.at[2, [400, 12]].set(jnp.nan)  # the first NaN
    x = x.at[3, 999].set(jnp.nan).at[3, 5].set(jnp.inf)  # a NaN in the tail wins over an earlier +inf
    x = x.at[4].set(-jnp.inf)  # all -inf
    x = x.at[5, [30, 31]].set(jnp.inf)  # +inf: its first index, sum NaN
    x = x.at[6, ::2].set(-jnp.inf)  # -inf entries add 0
    x = x.at[7].set(0.0).at[7, 3].set(-0.0)  # all zero: index 0, sum V
    x = x.at[8].set(-jnp.inf).at[8, 998].set(-1e30)  # one finite entry in a row of -inf
    x = x.at[9].set(3.0)  # all equal
    x = x.at[10, 999].set(50.0)  # the last index
    x = x.at[11].set(jnp.nan)  # all NaN
    got = LogitsStats(*map(np.asarray, _assert_matches(x)))
    np.testing.assert_array_equal(got.argmax, [5, 64, 12, 999, 0, 30, int(np.argmax(x[6])), 0, 998, 0, 999, 0])
    np.testing.assert_array_equal(got.argmax, jnp.argmax(x, axis=-1))
    assert np.isnan(got.row_max[[2, 3, 11], 0]).all() and np.isnan(got.sum_exp[[2, 3, 4, 5, 11]]).all()
    assert got.row_max[4, 0] == -np.inf and got.row_max[5, 0] == np.inf
    assert got.sum_exp[7] == v and got.sum_exp[8] == 1.0 and got.sum_exp[9] == v


def test_nan_and_inf_in_every_block_position():
    """A NaN (or +inf) at index r of row r, over the main blocks and the tail: always that index."""
    v = 150
    x = jax.random.normal(jax.random.key(3), (v, v), jnp.float32)
    rows = jnp.arange(v)
    got = _assert_matches(x.at[rows, rows].set(jnp.nan).at[rows, (rows + 7) % v].set(jnp.nan))
    np.testing.assert_array_equal(got.argmax, np.minimum(np.arange(v), (np.arange(v) + 7) % v))
    got = _assert_matches(x.at[rows, rows].set(jnp.inf))
    np.testing.assert_array_equal(got.argmax, np.arange(v))


def test_refuses_what_it_does_not_take():
    with pytest.raises(ValueError, match="float32"):
        logits_stats(jnp.zeros((2, 8), jnp.bfloat16))
    with pytest.raises(ValueError, match="\\(B, V\\)"):
        logits_stats(jnp.zeros((2, 3, 8), jnp.float32))
    with pytest.raises(ValueError, match="1 <= V"):
        logits_stats(jnp.zeros((2, 0), jnp.float32))
