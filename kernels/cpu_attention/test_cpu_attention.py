"""The CPU paged-attention custom call (cpu_attention.cc) against the reference (kernels/paged_attention/reference.py).

The cases are the Pallas kernel's (paged pools with shuffled pages, rings, dense keys, built as the engine lays
them out), run through the custom call: decode over ragged lengths including 0 and 1, page and window edges, GQA
ratios 1..8, head dims 64 / 256 / 512 (the AVX-512 paths) and 8 / 24 (the plain loops), T > 1 verify rows, prefill
tiles with causal / window / vision-block masks and chunks against cached context, float32 and bfloat16 (pools as
bfloat16 or as the uint16 bits the CPU engine stores); padding queries and empty contexts give 0, not NaN. Then the
build: a missing compiler or a failing build is a reason, not a crash, and the switch turns the kernel off.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax.cpu_attention import CpuAttention
from gemma4_jax.kernels import cpu_build
from gemma4_jax.kernels.cpu_attention import cpu_paged_attention, kernel, load
from gemma4_jax.kernels.paged_attention import KVSource, dense_source, paged_attention_reference
from gemma4_jax.kernels.paged_attention.test_paged_attention import _normal, paged_case, ring_source

pytestmark = pytest.mark.skipif(load() is not None, reason=f"CPU attention kernel unavailable: {load()}")

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 1.6e-2}  # bfloat16: one rounding of the output (half an ulp at ~4)


def as_bits(src: KVSource) -> KVSource:
    """A bfloat16 source with its pools as the uint16 bits the CPU engine stores (serving/kv_cache.pool_dtype)."""
    bits = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16)  # noqa: E731
    return src._replace(k_pages=bits(src.k_pages), v_pages=bits(src.v_pages))


def check(q, src, q_pos, *, sliding_window=None, q_blocks=None, tile=None):
    """Custom call == reference (in jit, as the model calls it); bfloat16 also with uint16 pools. Returns the
    output as float32."""
    want, _ = paged_attention_reference(q, [src], q_pos, sliding_window=sliding_window, q_blocks=q_blocks)
    sources = [src, as_bits(src)] if q.dtype == jnp.bfloat16 else [src]
    for source in sources:
        got = jax.jit(lambda q, s, p, b: cpu_paged_attention(q, s, p, sliding_window=sliding_window, q_blocks=b,
                                                             tile=tile))(q, source, q_pos, q_blocks)
        assert got.dtype == q.dtype and got.shape == q.shape
        tol = TOL[q.dtype.type]
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)
        if q.dtype == jnp.bfloat16:  # the probabilities rounded as the reference rounds them: the same bits
            # (without that rounding 80-90% of the outputs are; the order of the sums leaves a rare last-bit tie)
            assert np.mean(np.asarray(got, np.float32) == np.asarray(want, np.float32)) > 0.995
    return np.asarray(got, np.float32)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("head_dim,groups", [(512, 8), (256, 2), (64, 4), (24, 3), (8, 1)])
def test_decode_paged_ragged(dtype, head_dim, groups):
    """Contexts 0 (the first token), 1, a page edge, one past it, a long one and a padding row (output 0)."""
    rng = np.random.default_rng(head_dim + groups)
    q, src, q_pos = paged_case(rng, [0, 1, 8, 9, 37, 0], 1, groups, 2, head_dim, 4, dtype, padding_rows=(5,))
    out = check(q, src, q_pos)
    assert np.all(out[5] == 0) and np.isfinite(out).all()


@pytest.mark.parametrize("groups", [1, 2, 3, 5, 6, 7, 8])
def test_decode_gqa_ratios(groups):
    rng = np.random.default_rng(30 + groups)
    q, src, q_pos = paged_case(rng, [3, 0, 12], 2, groups, 2, 64, 4, jnp.float32)
    check(q, src, q_pos)


def test_decode_ring_window_edges():
    """A sliding layer's ring of 6 slots (window 5 + one spare): lengths 1, below the ring, exactly 6, wrapped."""
    rng = np.random.default_rng(2)
    lengths = [1, 4, 6, 14]
    for dtype in (jnp.bfloat16, jnp.float32):
        src = ring_source(rng, lengths, 6, 2, 256, dtype)
        q = _normal(rng, (4, 1, 4, 256), dtype)
        check(q, src, jnp.asarray(np.array(lengths)[:, None] - 1, jnp.int32), sliding_window=5)


def test_verify_rows_paged_and_ring():
    """T = 4 verify tokens per row, causal among themselves, over a paged pool and over a ring with a window."""
    rng = np.random.default_rng(3)
    q, src, q_pos = paged_case(rng, [0, 5, 11, 2], 4, 4, 2, 256, 4, jnp.float32, padding_rows=(3,))
    check(q, src, q_pos)
    lengths = [4, 9, 20]
    ring = ring_source(rng, lengths, 8, 2, 64, jnp.float32)
    q = _normal(rng, (3, 4, 8, 64), jnp.float32)
    check(q, ring, jnp.asarray(np.array(lengths)[:, None] - 4 + np.arange(4)[None, :], jnp.int32), sliding_window=5)


def test_empty_context_sees_nothing():
    rng = np.random.default_rng(4)
    q, src, q_pos = paged_case(rng, [0, 3], 1, 2, 1, 16, 4, jnp.float32)
    src = src._replace(positions=jnp.full_like(src.positions, -1))
    assert np.all(np.asarray(cpu_paged_attention(q, src, q_pos)) == 0)


@pytest.mark.parametrize("tile", [16, 5, 1])
def test_prefill_causal_window_and_vision_blocks(tile):
    """A 40-token prompt per row (the second padded after 29), dense keys, query tiles that do and do not divide
    it: causal, a window of 7, then vision blocks (bidirectional inside each image, the window still bounding)."""
    rng = np.random.default_rng(5)
    t = 40
    q_pos = np.tile(np.arange(t), (2, 1))
    q_pos[1, 29:] = -1
    q_pos = jnp.asarray(q_pos, jnp.int32)
    k, v = _normal(rng, (2, t, 1, 32), jnp.float32), _normal(rng, (2, t, 1, 32), jnp.float32)
    q = _normal(rng, (2, t, 2, 32), jnp.float32)
    blocks = np.full((2, t), -1)
    blocks[0, 5:17], blocks[0, 30:36], blocks[1, 2:9] = 0, 1, 0
    blocks = jnp.asarray(blocks, jnp.int32)
    check(q, dense_source(k, v, q_pos), q_pos, tile=tile)
    check(q, dense_source(k, v, q_pos), q_pos, sliding_window=7, tile=tile)
    out = check(q, dense_source(k, v, q_pos, blocks), q_pos, sliding_window=7, q_blocks=blocks, tile=tile)
    assert np.all(out[1, 29:] == 0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_chunked_prefill_against_paged_context(dtype):
    """A 9-token chunk per row after 0, 13 and 16 cached tokens (its keys already in the pool), head dim 512."""
    rng = np.random.default_rng(6)
    q, src, q_pos = paged_case(rng, [0, 13, 16], 9, 2, 1, 512, 8, dtype)
    check(q, src, q_pos, tile=4)


def test_refuses_mixed_dtypes_and_bad_shapes():
    rng = np.random.default_rng(7)
    q, src, q_pos = paged_case(rng, [3, 4], 1, 2, 1, 16, 4, jnp.float32)
    with pytest.raises(ValueError, match="float32 q over float32 pools"):
        cpu_paged_attention(q.astype(jnp.bfloat16), src, q_pos)
    with pytest.raises(ValueError, match="q_positions must be"):
        cpu_paged_attention(q, src, q_pos[:, :0])


def test_build_failures_are_reasons(tmp_path, monkeypatch):
    """No compiler: a RuntimeError naming it; a compiler that fails: the command and its error, nothing left
    behind; the switch off: load says so (the backend then reports itself unavailable with that reason)."""
    monkeypatch.setenv(cpu_build.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("CXX", "")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        cpu_build.build(kernel.SOURCE)
    monkeypatch.setenv("CXX", "/bin/false")
    with pytest.raises(RuntimeError, match="building cpu_attention.cc failed"):
        cpu_build.build(kernel.SOURCE)
    assert not list(tmp_path.glob("*.so"))
    monkeypatch.setenv(cpu_build.SWITCH_ENV, "0")
    assert "switched off" in cpu_build.load.__wrapped__(kernel.SOURCE, "Gemma4CpuPagedAttention", kernel.TARGET)
    assert CpuAttention().unavailable("cpu", "decode", "full") is None  # this process loaded it before


def test_a_second_process_reuses_the_build(tmp_path):
    """The library is cached under a name that hashes the source, jaxlib, the flags and the CPU; a fresh process
    with the same cache finds it (no rebuild); with the switch off, the backend is unavailable and auto falls back."""
    code = ("from gemma4_jax.kernels import cpu_build; from gemma4_jax.kernels.cpu_attention import kernel; "
            "import os; assert kernel.load() is None; p = cpu_build.library_path(kernel.SOURCE); "
            "print(p, os.path.getmtime(p))")
    env = {**os.environ, cpu_build.CACHE_ENV: str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert first == second and str(tmp_path) in first
    code = ("from gemma4_jax.attention_backends import resolve_attention; said = []; "
            "plan = resolve_attention('auto', log_choice=said.append); print(plan.decode_full.name); print(said[0])")
    off = subprocess.run([sys.executable, "-c", code], env={**env, cpu_build.SWITCH_ENV: "0"}, capture_output=True,
                         text=True, check=True).stdout
    assert off.startswith("xla-rows\n") and "switched off by GEMMA4_JAX_CPU_KERNELS=0" in off
