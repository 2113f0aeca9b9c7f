"""kv_cache.write_slots: a bfloat16 pool written through its uint16 bits on CPU holds exactly what a plain scatter
writes (the same bits), and the compiled write does not widen the pool to float32."""

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax.serving.kv_cache import write_slots


def test_bf16_pool_write_is_the_plain_scatter_bit_for_bit():
    rng = np.random.default_rng(0)
    pool = jnp.asarray(rng.standard_normal((9, 4, 2, 8)), jnp.bfloat16)
    pages = jnp.asarray([[1, 1, 3], [5, 8, 8]], jnp.int32)
    offsets = jnp.asarray([[0, 3, 2], [1, 0, 3]], jnp.int32)
    values = jnp.asarray(rng.standard_normal((2, 3, 2, 8)), jnp.float32)
    want = pool.at[pages, offsets].set(values.astype(jnp.bfloat16))
    got = jax.jit(write_slots)(pool, pages, offsets, values)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16))
    text = jax.jit(write_slots).lower(pool, pages, offsets, values).compile().as_text()
    assert "f32[9,4,2,8]" not in text  # no float32 copy of the pool


def test_float32_pool_write_is_the_plain_scatter():
    pool = jnp.zeros((3, 2, 1, 4), jnp.float32)
    got = write_slots(pool, jnp.asarray([[2]]), jnp.asarray([[1]]), jnp.ones((1, 1, 1, 4), jnp.bfloat16))
    assert got.dtype == jnp.float32 and float(got[2, 1].sum()) == 4.0 and float(got.sum()) == 4.0
