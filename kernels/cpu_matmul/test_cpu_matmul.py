"""The CPU weight product (cpu_matmul.cc) against its reference (reference.py), and its place in the model.

Shapes cover each few-row register block (1 row over 256 columns, 2 over 128, 4 over 64; with AVX512-BF16,
bfloat16 pairs at 4 rows, odd K included, and one bfloat16 row as (x, 0) / (0, x) pairs, or against (N, K) rows
as pairs when K is a multiple of 32), the 16-column and plain-loop edges, (N, K) weights with K a multiple of 16
and not; and the packed panels of bfloat16 pairs above 4 rows (both layouts: blocks of 6 rows and their 1-5 row
tails, task row chunks of 96, ragged 64-column panels, (N, K) transposes with K / 2 not a multiple of 16). float32
and bfloat16 (bfloat16: the same bits as the reference but for rare last-bit ties of a differently ordered sum).
Then `weight_einsum` on CPU: which products go through the custom call, more rows of float32 (and a mesh) through
XLA.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax import layers
from gemma4_jax.kernels.cpu_matmul import cpu_matmul, kernel, load, matmul_reference

pytestmark = pytest.mark.skipif(load() is not None, reason=f"CPU matmul kernel unavailable: {load()}")


def _case(rng, m, k, n, transposed, dtype):
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((n, k) if transposed else (k, n)) * k**-0.5, dtype)
    return x, w


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("m,k,n,transposed", [
    (1, 512, 2048, False), (1, 64, 592, False), (2, 512, 384, False), (3, 96, 200, False), (4, 512, 64, False),
    (7, 40, 37, False), (2, 41, 136, False), (4, 33, 64, False), (8, 512, 320, False), (5, 64, 128, False),
    (1, 96, 520, False), (1, 512, 1030, True), (1, 48, 24, True), (2, 64, 33, True), (3, 40, 9, True),
    (5, 128, 260, True),
    # packed bfloat16 panels (float32 above 4 rows: the few-row blocks)
    (6, 64, 64, False), (9, 512, 300, False), (13, 30, 17, False), (64, 512, 1024, False), (97, 96, 130, False),
    (200, 40, 65, False), (7, 2, 5, False), (9, 33, 70, False),
    (6, 64, 64, True), (9, 512, 300, True), (13, 40, 17, True), (64, 512, 1000, True), (97, 34, 130, True),
    (200, 64, 65, True),
    # several tasks' worth of rows (cpu_matmul.cc task_rows: 384 rows at these K), the last one partial
    (800, 64, 70, False), (800, 64, 70, True),
])
def test_matches_reference(m, k, n, transposed, dtype):
    rng = np.random.default_rng(m * 1000 + n)
    x, w = _case(rng, m, k, n, transposed, dtype)
    got = jax.jit(lambda x, w: cpu_matmul(x, w, transposed=transposed))(x, w)
    want = matmul_reference(x, w, transposed=transposed)
    assert got.shape == (m, n) and got.dtype == dtype
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if dtype == jnp.float32:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_allclose(got, want, rtol=8e-3, atol=8e-3)
        assert np.mean(got == want) > 0.99


def test_refuses_what_it_does_not_take():
    rng = np.random.default_rng(0)
    x, w = _case(rng, 2, 16, 8, False, jnp.float32)
    with pytest.raises(ValueError, match="does not fit"):
        cpu_matmul(x, w, transposed=True)
    with pytest.raises(ValueError, match="one dtype"):
        cpu_matmul(x.astype(jnp.bfloat16), w)
    with pytest.raises(ValueError, match="2-D"):
        cpu_matmul(x[None], w)


def test_non_finite_values_propagate():
    """NaN and infinities in activations or weights reach the outputs as in the reference (packed panels and
    few-row blocks)."""
    rng = np.random.default_rng(7)
    for m, transposed in ((3, False), (12, False), (12, True)):
        x, w = _case(rng, m, 64, 80, transposed, jnp.bfloat16)
        x = x.at[1, 5].set(jnp.nan).at[2, 9].set(jnp.inf)
        w = w.at[(7, 3) if transposed else (3, 7)].set(-jnp.inf)
        got = np.asarray(jax.jit(functools.partial(cpu_matmul, transposed=transposed))(x, w), np.float32)
        want = np.asarray(matmul_reference(x, w, transposed=transposed), np.float32)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
        finite = np.isfinite(want)
        np.testing.assert_allclose(got[finite], want[finite], rtol=8e-3, atol=8e-3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("softcap", [None, 30.0, 0.5])
def test_float32_logits_and_softcap_epilogue(transposed, softcap, dtype):
    """The LM head's epilogue: the product as float32 (bfloat16: rounded, then widened), tanh(y / cap) * cap,
    within a few ulp of XLA's tanh (the argmax of every row the same); logits of all sizes, the soft-cap's saturation
    included, non-finite values as the reference's."""
    rng = np.random.default_rng(3)
    x, w = _case(rng, 13, 64, 300, transposed, dtype)
    x = x * 40  # logits of +-100s: tanh's polynomial and exponential ranges, and saturation for the small cap
    x = x.at[4, 3].set(jnp.nan).at[7, 1].set(jnp.inf)
    fn = functools.partial(cpu_matmul, transposed=transposed, float32_out=True, softcap=softcap)
    got = np.asarray(jax.jit(fn)(x, w))
    want = np.asarray(matmul_reference(x, w, transposed=transposed, float32_out=True, softcap=softcap))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = np.isfinite(want)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    scale = softcap or 1.0
    atol = (2e-6 if dtype == jnp.bfloat16 else 2e-4) * scale  # float32: sums in another order
    np.testing.assert_allclose(got[finite], want[finite], rtol=2e-6, atol=atol)
    if softcap is None and dtype == jnp.bfloat16:
        np.testing.assert_array_equal(got, want)  # only the widening: exact
    rows = np.all(finite, axis=1)
    np.testing.assert_array_equal(np.argmax(got[rows], axis=1), np.argmax(want[rows], axis=1))


def test_epilogue_needs_the_packed_panels():
    rng = np.random.default_rng(0)
    x, w = _case(rng, 4, 64, 32, False, jnp.bfloat16)
    with pytest.raises(ValueError, match="more than 4 rows"):
        cpu_matmul(x, w, softcap=30.0)
    with pytest.raises(ValueError, match="more than 4 rows"):
        cpu_matmul(x.astype(jnp.float32), w.astype(jnp.float32), float32_out=True)
    with pytest.raises(ValueError, match="positive"):
        cpu_matmul(x, w, softcap=-1.0)


def test_logits_einsum_fuses_the_head_on_cpu():
    """`layers.logits_einsum` (the decoder's head): bfloat16 of many rows as one custom call with the epilogue (no
    tanh left to XLA), the same logits as the unfused path; float32 and few rows keep XLA's tanh."""
    rng = np.random.default_rng(5)
    table = jnp.asarray(rng.standard_normal((300, 64)) * 0.5, jnp.bfloat16)
    head = lambda x: layers.logits_einsum("...D,VD->...V", x, table, 30.0)
    for rows, dtype, fused in ((9, jnp.bfloat16, True), (3, jnp.bfloat16, False), (40, jnp.float32, True),
                               (3, jnp.float32, False), (9, jnp.float32, False), (129, jnp.float32, False)):
        x = jnp.asarray(rng.standard_normal((rows, 1, 64)) * 4, dtype)
        text = jax.jit(head).lower(x).as_text()
        assert ("stablehlo.tanh" not in text) == fused, (rows, dtype)
        assert ("gemma4_cpu_matmul" in text) == (fused or rows <= 4), (rows, dtype)
        got = np.asarray(jax.jit(head)(x))
        y = jnp.einsum("tsD,VD->tsV", x, table.astype(dtype), preferred_element_type=jnp.float32).astype(dtype)
        want = np.asarray(jnp.tanh(y.astype(jnp.float32) / 30.0) * 30.0)
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-4 if dtype == jnp.float32 else 6e-5)


def test_activation_table_is_what_xla_computes():
    """The gated product's table: jax.nn.gelu(approximate=True) of every bfloat16 value (NaNs and infinities
    included) equals the fused bfloat16 graph XLA runs on a runtime argument, bit for bit, with one pad entry."""
    from gemma4_jax.kernels.cpu_matmul.kernel import activation_table

    table = activation_table("gelu_tanh")
    assert table.shape == (65537,) and table.dtype == np.uint16 and table[-1] == table[0]
    graph = jax.jit(lambda bits: jax.lax.bitcast_convert_type(
        jax.nn.gelu(jax.lax.bitcast_convert_type(bits, jnp.bfloat16), approximate=True), jnp.uint16))
    np.testing.assert_array_equal(table[:-1], np.asarray(graph(jnp.arange(65536, dtype=jnp.uint16))))


@pytest.mark.parametrize("m,k,n,transposed", [(64, 512, 2048, False), (9, 64, 100, False), (5, 32, 70, False),
                                              (97, 96, 130, False), (13, 40, 17, True),
                                              (400, 96, 130, False)])
def test_gated_product_equals_the_separate_ops(m, k, n, transposed):
    """gelu_tanh(gate) * (x @ W) from the epilogue: the same bits as the model's separate ops (the product rounded
    to bfloat16, then XLA's elementwise graph), gates spread over the GELU's whole range, NaN and inf included."""
    rng = np.random.default_rng(m + n)
    x, w = _case(rng, m, k, n, transposed, jnp.bfloat16)
    gate = rng.standard_normal((m, n)) * 4
    gate.flat[:4] = [np.nan, np.inf, -np.inf, -30.0]
    gate = jnp.asarray(gate, jnp.bfloat16)
    got = jax.jit(lambda x, w, g: cpu_matmul(x, w, transposed=transposed, gate=g))(x, w, gate)
    want = jax.jit(lambda x, w, g: matmul_reference(x, w, transposed=transposed, gate=g))(x, w, gate)
    assert got.dtype == jnp.bfloat16 and got.shape == (m, n)
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    assert np.mean(same) > 0.99 and np.isnan(got.flat[0])  # ties of a differently ordered sum, as above
    np.testing.assert_allclose(got, want, rtol=8e-3, atol=8e-3)


def test_gated_product_refuses_what_it_does_not_take():
    rng = np.random.default_rng(1)
    x, w = _case(rng, 8, 16, 24, False, jnp.bfloat16)
    gate = jnp.zeros((8, 24), jnp.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 only"):
        cpu_matmul(x.astype(jnp.float32), w.astype(jnp.float32), gate=gate.astype(jnp.float32))
    with pytest.raises(ValueError, match="gate must be"):
        cpu_matmul(x, w, gate=gate[:, :8])
    with pytest.raises(ValueError, match="more than 4 rows"):
        cpu_matmul(x[:4], w, gate=gate[:4])
    with pytest.raises(ValueError, match="gate_activation"):
        cpu_matmul(x, w, gate=gate, gate_activation="relu")
    with pytest.raises(ValueError, match="neither"):
        cpu_matmul(x, w, gate=gate, float32_out=True)


def test_mlp_puts_the_gate_in_the_up_projection_on_cpu():
    """The MLP (bfloat16, more than 4 rows) runs act(gate) * up as one gated call and no tanh in XLA; at 1-4 rows
    both products and the activation are one gate/up call (bfloat16) or the products one call (float32, XLA's
    activation); float32 from 5 rows keeps XLA's activation on separate products. Same output as the separate ops."""
    from flax import nnx

    from gemma4_jax.mlp import MLP

    for rows, dtype, target, tanh in ((16, jnp.bfloat16, "gemma4_cpu_matmul_gated", False),
                                      (3, jnp.bfloat16, "gemma4_cpu_matmul_gate_up", False),
                                      (3, jnp.float32, "gemma4_cpu_matmul_multi", True),
                                      (16, jnp.float32, None, True)):
        mlp = MLP(64, 96, "gelu_pytorch_tanh", dtype=dtype, rngs=nnx.Rngs(3))
        x = jnp.asarray(np.random.default_rng(rows).standard_normal((rows, 1, 64)), dtype)
        graph, state = nnx.split(mlp)
        run = jax.jit(lambda state, x, graph=graph: nnx.merge(graph, state)(x))
        text = run.lower(state, x).as_text()
        for name in ("gemma4_cpu_matmul_gated", "gemma4_cpu_matmul_gate_up", "gemma4_cpu_matmul_multi"):
            assert (name in text) == (name == target), (rows, dtype, name)
        assert ("stablehlo.tanh" in text) == tanh, (rows, dtype)
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        want = mlp.down_proj(jax.nn.gelu(gate, approximate=True) * up)
        got, want = np.asarray(run(state, x), np.float32), np.asarray(want, np.float32)
        if dtype == jnp.bfloat16:  # (float32: the eager ops sum in another order than the compiled program)
            np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _custom_calls(fn, *args) -> int:
    return jax.jit(fn).lower(*args).as_text().count("gemma4_cpu_matmul")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_weight_einsum_routes_products_to_the_kernel(dtype):
    """Linear kernels ((in..., out...) weights, several in/out axes) and the tied LM head ((V, D) weight) through the
    custom call with the reference's numbers where `cpu_matmul_takes` says so: bfloat16 at any row count (K even;
    odd K up to the few-row limits), float32 up to 4 rows and from 32 to 128; other float32 products through XLA."""
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((64, 4, 16)) * 0.1, dtype)  # (D,) -> (N, H), as q_proj
    table = jnp.asarray(rng.standard_normal((300, 64)) * 0.1, dtype)  # the tied embedding (V, D)
    o = jnp.asarray(rng.standard_normal((4, 16, 64)) * 0.1, dtype)  # (N, H) -> (D,), as o_proj
    w_odd = jnp.asarray(rng.standard_normal((33, 48)) * 0.1, dtype)  # an odd K
    proj = lambda x: layers.weight_einsum("...a,abc->...bc", x, w)
    head = lambda x: layers.weight_einsum("...D,VD->...V", x, table)
    out = lambda x: layers.weight_einsum("...ab,abc->...c", x, o, n_in=2)
    odd = lambda x: layers.weight_einsum("...a,ab->...b", x, w_odd)
    bf16 = jnp.dtype(dtype) == jnp.bfloat16
    for rows in (1, 4, 5, 8, 9, 32, 64, 129):
        x = jnp.asarray(rng.standard_normal((rows, 1, 64)), dtype)
        xh = jnp.asarray(rng.standard_normal((rows, 1, 4, 16)), dtype)
        xo = jnp.asarray(rng.standard_normal((rows, 1, 33)), dtype)
        calls = [_custom_calls(f, a) for f, a in ((proj, x), (head, x), (out, xh), (odd, xo))]
        f32 = rows <= 4 or 32 <= rows <= 128  # float32: few-row blocks, packed panels at 32-128 (odd K too)
        assert calls == [bf16 or f32, bf16 or f32, bf16 or f32, rows <= 4 or (bf16 and rows <= 8) or
                         (not bf16 and f32)], rows
        for f, a, want in ((proj, x, jnp.einsum("tsa,abc->tsbc", x, w, preferred_element_type=jnp.float32)),
                           (head, x, jnp.einsum("tsD,VD->tsV", x, table, preferred_element_type=jnp.float32)),
                           (out, xh, jnp.einsum("tsab,abc->tsc", xh, o, preferred_element_type=jnp.float32)),
                           (odd, xo, jnp.einsum("tsa,ab->tsb", xo, w_odd, preferred_element_type=jnp.float32))):
            got = jax.jit(f)(a)
            assert got.dtype == dtype and got.shape == want.shape
            np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want.astype(dtype), np.float32),
                                       rtol=1e-2 if dtype == jnp.bfloat16 else 1e-5, atol=1e-5)


def test_weight_einsum_keeps_xla_under_a_mesh():
    """A weight sharded over several devices would be gathered whole for a custom call: XLA keeps those."""
    devices = jax.devices()
    if len(devices) < 2:
        pytest.skip("needs several (simulated) devices")
    mesh = jax.make_mesh((2,), ("tp",), devices=devices[:2])
    x = jnp.ones((1, 64), jnp.float32)
    w = jnp.ones((64, 32), jnp.float32)
    with jax.set_mesh(mesh):
        assert _custom_calls(lambda x: layers.weight_einsum("...a,ab->...b", x, w), x) == 0
    assert _custom_calls(lambda x: layers.weight_einsum("...a,ab->...b", x, w), x) == 1


def test_packed_requests_follow_the_cpu(monkeypatch):
    """The packed panels (and so the epilogues: float32 logits, soft-cap, gate) are compiled for AVX-512 (bfloat16:
    AVX512-BF16) only; on a CPU without them the call would refuse such a request at run time, so `takes_packed`
    says no and the LM head stays with XLA. Without AVX-512 no product goes to the kernel."""
    monkeypatch.setattr(kernel.cpu_build, "cpu_flags", lambda: "flags : fpu sse2 avx2 avx512f avx512bw")
    kernel.packed_on_this_cpu.cache_clear()
    try:
        assert not kernel.takes_packed(jnp.bfloat16, 64, 512) and kernel.takes_packed(jnp.float32, 64, 512)
        x, w = jnp.ones((8, 64), jnp.bfloat16), jnp.ones((32, 64), jnp.bfloat16)
        assert layers.cpu_weight_matmul("...D,VD->...V", x, w, 1, logits_softcap=30.0) is None
        assert layers.cpu_matmul_takes(jnp.bfloat16, 1, 64, False)
        # No AVX-512 at all: the calls would run plain loops, slower than XLA, so no product goes to them.
        monkeypatch.setattr(kernel.cpu_build, "cpu_flags", lambda: "flags : fpu sse2 avx2")
        kernel.packed_on_this_cpu.cache_clear()
        kernel.vectors_on_this_cpu.cache_clear()
        assert not kernel.takes_packed(jnp.float32, 64, 512)
        assert not any(layers.cpu_matmul_takes(dtype, rows, 64, False) for dtype in (jnp.float32, jnp.bfloat16)
                       for rows in (1, 4, 64))
        assert _custom_calls(lambda x: layers.weight_einsum("...a,ab->...b", x, w.T), x[:1]) == 0
    finally:
        kernel.packed_on_this_cpu.cache_clear()
        kernel.vectors_on_this_cpu.cache_clear()
