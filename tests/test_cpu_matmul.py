"""bfloat16 weight products on CPU (layers.weight_einsum): the same numbers as the plain einsum, without the
float32 copy of the weight that made XLA:CPU's bfloat16 dots 5-10x slower than float32 ones (docs/benchmarks.md,
"bfloat16 on CPU").

The speed itself is measured by the benchmarks; what is tested here is what the speed comes from, in the compiled
program: no float32 buffer of the weight's size, for one row (batch-1 decode) and for many rows.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax.layers import Embed, Linear, model_jit, weight_einsum

D, F = 256, 1024


def _weight_converted(fn, *args) -> bool:
    """Whether the compiled program holds a float32 array of the weight's size (D * F elements)."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    shapes = re.findall(r"f32\[([\d,]+)\]", text)
    return any(np.prod([int(d) for d in s.split(",")]) == D * F for s in shapes)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's dot lowering")
@pytest.mark.parametrize("rows", [(1, 1), (8, 1), (2, 16)])
def test_bf16_products_do_not_convert_the_weight(rows):
    w = jnp.zeros((D, F), jnp.bfloat16)
    x = jnp.zeros((*rows, D), jnp.bfloat16)
    assert _weight_converted(lambda x, w: jnp.einsum("...a,ab->...b", x, w), x, w)  # what XLA does by itself
    assert not _weight_converted(lambda x, w: weight_einsum("...a,ab->...b", x, w), x, w)
    # The tied LM head: the (V, D) table against (..., D) activations.
    assert not _weight_converted(lambda x, e: weight_einsum("...D,VD->...V", x, e), x, w.T)


@pytest.mark.parametrize("rows", [(1, 1), (3, 2)])
def test_bf16_products_equal_the_plain_einsum(rows):
    """Both accumulate in float32 and round once to bfloat16: equal but for the order of the sums."""
    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (*rows, D), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(kw, (D, 4, F // 4), jnp.float32) * D**-0.5).astype(jnp.bfloat16)
    got = weight_einsum("...a,abc->...bc", x, w)
    assert got.dtype == jnp.bfloat16 and got.shape == (*rows, 4, F // 4)
    exact = jnp.einsum("...a,abc->...bc", x.astype(jnp.float32), w.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(exact), rtol=1e-2, atol=1e-2)
    # One rounding of the float32 sum: at most one bfloat16 ulp (2**-8 relative) off the exact product.
    assert np.max(np.abs(np.asarray(got, np.float32) - exact) / (np.abs(exact) + 1e-3)) <= 2**-7


def test_float32_is_the_plain_einsum():
    """float32: XLA's plain einsum where the CPU custom call does not take the product (here 130 rows), and
    the same numbers up to the order of the float32 sums where it does (here 32-128 rows)."""
    kx, kw = jax.random.split(jax.random.PRNGKey(1))
    w = jax.random.normal(kw, (D, F), jnp.float32)
    for rows, exact in ((40, jax.default_backend() != "cpu"), (130, True)):
        x = jax.random.normal(kx, (2, rows // 2, D), jnp.float32)
        got, want = weight_einsum("...a,ab->...b", x, w), jnp.einsum("...a,ab->...b", x, w)
        if exact:
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)  # sums of ~30 in another order


def test_modules_use_it():
    """Linear (multi-axis in and out) and the tied head run through weight_einsum in bfloat16."""
    from flax import nnx

    rngs = nnx.Rngs(0)
    lin = Linear((4, 8), (D,), ("heads", "head_dim"), ("embed",), dtype=jnp.bfloat16, rngs=rngs)
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 1, 4, 8), jnp.float32).astype(jnp.bfloat16)
    y = lin(x)
    assert y.shape == (1, 1, D) and y.dtype == jnp.bfloat16
    ref = jnp.einsum("xyab,abd->xyd", x.astype(jnp.float32), lin.kernel[...].astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), rtol=2e-2, atol=2e-2)
    emb = Embed(64, D, 1.0, dtype=jnp.bfloat16, rngs=rngs)
    logits = emb.attend(y)
    assert logits.shape == (1, 1, 64) and logits.dtype == jnp.bfloat16


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's loop-invariant code motion")
def test_model_programs_keep_a_bf16_embedding_lookup_inside_the_loop():
    """A bfloat16 lookup inside a loop (the multi-step decode): XLA:CPU computes the scaled lookup in float32 and,
    with loop-invariant code motion, hoisted the widening of the whole (V, D) table out of the loop, materialized
    on every call. Programs built by `model_jit` run without that pass (layers.MODEL_COMPILER_OPTIONS)."""
    from flax import nnx

    emb = Embed(F, D, 16.0, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graph, state = nnx.split(emb)
    ids = jnp.asarray([[3, 1000]], jnp.int32)

    def loop(state, ids):
        lookup = nnx.merge(graph, state)
        body = lambda i, acc: acc + lookup(ids + i)  # noqa: E731
        return jax.lax.fori_loop(0, 4, body, jnp.zeros((1, 2, D), jnp.bfloat16))

    def converted(jitted) -> bool:
        # A float32 table produced by a fusion of its own (materialized); a convert inside the lookup's fusion is
        # computed only for the rows it gathers.
        text = jitted.lower(state, ids).compile().as_text()
        shapes = re.findall(r"f32\[([\d,]+)\]\{[\d,]+\} fusion\(", text)
        return any(np.prod([int(d) for d in s.split(",")]) == D * F for s in shapes)

    assert converted(jax.jit(loop))  # what XLA does by default: a float32 table, outside any fusion
    assert not converted(model_jit(loop))
    np.testing.assert_array_equal(model_jit(loop)(state, ids), jax.jit(loop)(state, ids))
