"""Few-row products of several weights in one call (cpu_matmul_fused.cc) against the separate products, and their
place in the model.

`cpu_matmul_multi` must give each product the bits `cpu_matmul` gives it alone (1-4 rows, float32 and bfloat16;
widths of whole 256-column tasks, 128- and 64-column one-row blocks, 16-column and plain-loop edges, a product
narrower than one vector), and the reference's numbers; `cpu_matmul_gate_up` the bits of gelu_tanh(gate) * up
computed by XLA from the separate products. Then the model: a step's attention projections and MLP become one call
each at 1-4 rows and only there (not from 5 rows, not under a mesh, not for packed checkpoints' QuantLinear), with
the same outputs as the separate calls.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma4_jax import layers
from gemma4_jax.kernels.cpu_matmul import (
    cpu_matmul,
    cpu_matmul_gate_up,
    cpu_matmul_multi,
    gate_up_reference,
    load,
    multi_reference,
)

pytestmark = pytest.mark.skipif(load() is not None, reason=f"CPU matmul kernel unavailable: {load()}")


def _weights(rng, k, widths, dtype):
    return [jnp.asarray(rng.standard_normal((k, n)) * k**-0.5, dtype) for n in widths]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("m,k,widths", [
    (1, 512, (512, 128, 128)),          # a sliding layer's q/k/v
    (1, 512, (512, 256)),               # q and k of keys-as-values
    (2, 96, (600, 64, 40, 8)),          # 256-column tasks, a 64-wide block, a 16-column edge, a plain loop
    (3, 33, (200, 136)),                # an odd K
    (4, 64, (2048, 2048)),              # gate and up
    (1, 64, (592,)),                    # one weight
])
def test_multi_is_each_product_alone(m, k, widths, dtype):
    rng = np.random.default_rng(m * 100 + k)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    ws = _weights(rng, k, widths, dtype)
    got = jax.jit(cpu_matmul_multi)(x, ws)
    assert len(got) == len(ws)
    for w, y, ref in zip(ws, got, multi_reference(x, ws)):
        alone = jax.jit(cpu_matmul)(x, w)
        assert y.shape == (m, w.shape[1]) and y.dtype == dtype
        np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(alone, np.float32))
        want = np.asarray(ref, np.float32)
        tol = 1e-5 if dtype == jnp.float32 else 8e-3
        np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("m,k,n", [(1, 512, 2048), (2, 64, 600), (4, 96, 40), (3, 33, 264)])
def test_gate_up_is_the_separate_ops(m, k, n):
    rng = np.random.default_rng(m + k + n)
    x = jnp.asarray(rng.standard_normal((m, k)) * 2, jnp.bfloat16)
    w_gate, w_up = _weights(rng, k, (n, n), jnp.bfloat16)
    got = jax.jit(cpu_matmul_gate_up)(x, w_gate, w_up)
    want = jax.jit(lambda x: jax.nn.gelu(cpu_matmul(x, w_gate), approximate=True) * cpu_matmul(x, w_up))(x)
    assert got.shape == (m, n) and got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    ref = np.asarray(gate_up_reference(x, w_gate, w_up), np.float32)
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=3e-2, atol=3e-2)
    assert np.mean(np.asarray(got, np.float32) == ref) > 0.95


def test_gate_up_keeps_non_finite_values():
    x = jnp.ones((1, 32), jnp.bfloat16)
    w_gate = jnp.zeros((32, 48), jnp.bfloat16).at[0, 0].set(jnp.inf).at[0, 1].set(-jnp.inf).at[0, 2].set(jnp.nan)
    w_up = jnp.ones((32, 48), jnp.bfloat16)
    got = np.asarray(jax.jit(cpu_matmul_gate_up)(x, w_gate, w_up), np.float32)[0]
    want = np.asarray(jax.nn.gelu(cpu_matmul(x, w_gate), approximate=True) * cpu_matmul(x, w_up), np.float32)[0]
    np.testing.assert_array_equal(got, want)
    assert got[0] == np.inf and np.isnan(got[2])  # (and gelu(-inf) is XLA's NaN: -inf * 0)


def test_refusals_name_the_problem():
    x = jnp.ones((2, 64), jnp.bfloat16)
    w = jnp.ones((64, 32), jnp.bfloat16)
    with pytest.raises(ValueError, match="1 to 4 rows"):
        cpu_matmul_multi(jnp.ones((5, 64), jnp.bfloat16), [w])
    with pytest.raises(ValueError, match="at least one weight"):
        cpu_matmul_multi(x, [])
    with pytest.raises(ValueError, match=r"\(K, N\) = \(64, N\)"):
        cpu_matmul_multi(x, [w, jnp.ones((32, 64), jnp.bfloat16)])
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        cpu_matmul_multi(x.astype(jnp.float16), [w.astype(jnp.float16)])
    with pytest.raises(ValueError, match="bfloat16 only"):
        cpu_matmul_gate_up(x.astype(jnp.float32), w.astype(jnp.float32), w.astype(jnp.float32))
    with pytest.raises(ValueError, match="one shape"):
        cpu_matmul_gate_up(x, w, jnp.ones((64, 16), jnp.bfloat16))
    with pytest.raises(ValueError, match="activation must be one of"):
        cpu_matmul_gate_up(x, w, w, activation="relu")


def _decoder_layer(dtype, kv_shared: bool, k_eq_v: bool = False):
    import dataclasses

    import gemma4_jax
    from gemma4_jax.decoder import DecoderLayer

    text = gemma4_jax.preset("tiny").text
    spec = dataclasses.replace(text.layers[0], k_eq_v=k_eq_v,
                               kv_sharing="reuse" if kv_shared else None)
    return text, spec, DecoderLayer(text, spec, dtype=dtype, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kv_shared,k_eq_v", [(False, False), (False, True), (True, False)])
def test_attention_projections_are_one_call_at_few_rows(dtype, kv_shared, k_eq_v):
    """q/k/v (or q/k, or q alone) from one multi call at 1-4 rows, separate calls from 5; the same values."""
    text, spec, layer = _decoder_layer(dtype, kv_shared, k_eq_v)
    attn = layer.self_attn
    graph, state = nnx.split(attn)

    def project(state, x, positions, fuse):
        layers.FUSE_FEW_ROW_PRODUCTS = fuse
        try:
            return nnx.merge(graph, state).project(x, positions)
        finally:
            layers.FUSE_FEW_ROW_PRODUCTS = True

    for rows in (1, 4, 5):
        rng = np.random.default_rng(rows)
        x = jnp.asarray(rng.standard_normal((rows, 1, text.hidden_size)), dtype)
        positions = jnp.arange(rows, dtype=jnp.int32)[:, None] + 3
        fused = jax.jit(lambda s, x, p: project(s, x, p, True))
        text_hlo = fused.lower(state, x, positions).as_text()
        assert ("gemma4_cpu_matmul_multi" in text_hlo) == (rows <= 4), rows
        got = fused(state, x, positions)
        want = jax.jit(lambda s, x, p: project(s, x, p, False))(state, x, positions)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
        assert (got[1] is None) == kv_shared


def test_no_fusion_under_a_mesh_or_for_packed_weights():
    devices = jax.devices()
    text, spec, layer = _decoder_layer(jnp.bfloat16, False)
    x = jnp.ones((1, 1, text.hidden_size), jnp.bfloat16)
    linears = [layer.self_attn.q_proj, layer.self_attn.k_proj]
    assert layers.fused_linears(linears, x) is not None
    if len(devices) >= 2:
        with jax.set_mesh(jax.make_mesh((2,), ("tp",), devices=devices[:2])):
            assert layers.fused_linears(linears, x) is None
    packed = layers.QuantLinear((text.hidden_size,), (32,), ("embed",), ("mlp",), "fp8")
    assert layers.fused_linears([linears[0], packed], x) is None
    assert layers.fused_linears(linears, jnp.ones((5, 1, text.hidden_size), jnp.bfloat16)) is None
    mlp = layer.mlp
    assert layers.fused_gate_up(mlp.gate_proj, mlp.up_proj, x, "gelu_pytorch_tanh") is not None
    assert layers.fused_gate_up(mlp.gate_proj, mlp.up_proj, x, "gelu") is None  # not the table's activation
