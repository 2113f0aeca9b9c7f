"""K/V pool storage and writes (serving/kv_cache.py): on CPU a bfloat16 model's pools hold uint16 bit patterns,
written in place (no float32 or bit-cast copy of the pool) with exactly the bits a bfloat16 scatter writes, and
read back as the same bfloat16 values; other dtypes and platforms keep the model's dtype."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma4_jax
from gemma4_jax.kv_view import BF16_BITS, PagedKV
from gemma4_jax.serving import kv_cache
from gemma4_jax.serving.kv_cache import pool_dtype, write_slots


def test_pool_dtype_by_platform():
    assert pool_dtype(jnp.bfloat16, "cpu") == BF16_BITS
    assert pool_dtype(jnp.bfloat16, "gpu") == jnp.bfloat16
    assert pool_dtype(jnp.float32, "cpu") == jnp.float32
    assert pool_dtype(jnp.float16, "cpu") == jnp.float16


def test_uint16_pool_write_is_the_bf16_scatter_bit_for_bit_and_in_place():
    rng = np.random.default_rng(0)
    pool_bf16 = jnp.asarray(rng.standard_normal((9, 4, 2, 8)), jnp.bfloat16)
    pool = jax.lax.bitcast_convert_type(pool_bf16, BF16_BITS)
    pages = jnp.asarray([[1, 1, 3], [5, 8, 8]], jnp.int32)
    offsets = jnp.asarray([[0, 3, 2], [1, 0, 3]], jnp.int32)
    values = jnp.asarray(rng.standard_normal((2, 3, 2, 8)), jnp.float32)
    want = pool_bf16.at[pages, offsets].set(values.astype(jnp.bfloat16))
    got = jax.jit(write_slots)(pool, pages, offsets, values)
    assert got.dtype == BF16_BITS
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want).view(np.uint16))
    text = jax.jit(write_slots, donate_argnums=0).lower(pool, pages, offsets, values).compile().as_text()
    # Neither a float32 nor a bfloat16 copy of the pool (widening it, or bit casts around the scatter), and the
    # donated pool is the output: the scatter writes it in place.
    assert set(re.findall(r"(\w+)\[9,4,2,8\]", text)) == {"u16"}
    assert "input_output_alias={ {}: (0," in text


def test_float32_pool_write_is_the_plain_scatter():
    pool = jnp.zeros((3, 2, 1, 4), jnp.float32)
    got = write_slots(pool, jnp.asarray([[2]]), jnp.asarray([[1]]), jnp.ones((1, 1, 1, 4), jnp.bfloat16))
    assert got.dtype == jnp.float32 and float(got[2, 1].sum()) == 4.0 and float(got.sum()) == 4.0


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_allocated_pools_read_back_what_was_written(dtype):
    """A bfloat16 model's pools are uint16 on CPU; the view's gather returns the written bfloat16 values, and a
    kernel's sources see bfloat16 pools."""
    text = gemma4_jax.preset("tiny").text
    layout = kv_cache.CacheLayout.for_config(text, page_size=4, num_pages=6, max_seqs=2, num_window_pages=6)
    cache = kv_cache.allocate(text, layout, dtype)
    name = next(iter(cache))
    assert cache[name].dtype == (BF16_BITS if dtype == jnp.bfloat16 else dtype)
    pool = cache[name]
    values = jnp.asarray(np.random.default_rng(1).standard_normal((1, 2, *pool.shape[2:])), jnp.float32)
    pool = write_slots(pool, jnp.asarray([[3, 3]]), jnp.asarray([[0, 1]]), values)
    view = PagedKV(pool, pool, jnp.asarray([[3]], jnp.int32), jnp.asarray([2], jnp.int32), dtype=dtype)
    dense = view.dense()
    assert dense.k.dtype == dtype
    np.testing.assert_array_equal(np.asarray(dense.k[0, :2], np.float32),
                                  np.asarray(values[0].astype(dtype), np.float32))
    assert view.sources()[0].k_pages.dtype == dtype
