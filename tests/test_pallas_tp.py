"""The `pallas` attention backend on a mesh whose tensor axis splits the heads: the kernel runs under shard_map, each
device on its own query heads and its slice of the KV pools (XLA would hand a custom call whole, gathered pools),
with the result of one device; where tp does not divide the KV heads it runs on whole heads, still exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gemma4_jax
from gemma4_jax import sharding
from gemma4_jax.attention_backends import XlaAttention
from gemma4_jax.config import preset
from gemma4_jax.kv_view import PagedKV
from gemma4_jax.pallas_attention import PallasAttention


def _paged_case(kv_heads: int, q_heads: int = 8, head_dim: int = 16, batch: int = 3, page: int = 4):
    rng = np.random.default_rng(kv_heads)
    lengths = np.array([5, 17, 30], np.int32)[:batch]
    pages = -(-int(lengths.max()) // page)
    num_pages = batch * pages + 1
    table = rng.permutation(np.arange(1, num_pages)).reshape(batch, pages).astype(np.int32)
    k = rng.standard_normal((num_pages, page, kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((num_pages, page, kv_heads, head_dim)).astype(np.float32)
    q = rng.standard_normal((batch, 1, q_heads, head_dim)).astype(np.float32)
    q_pos = (lengths - 1)[:, None]
    return q, k, v, table, lengths, q_pos


@pytest.mark.parametrize("kv_heads, split", [(2, True), (1, False)])
def test_decode_split_by_head_equals_one_device(kv_heads, split):
    q, k, v, table, lengths, q_pos = _paged_case(kv_heads)
    mesh = sharding.make_mesh(tp=2)
    heads = NamedSharding(mesh, P(None, None, "tp", None) if split else P())
    kernel = PallasAttention(name="pallas-interpret", interpret=True)

    def step(backend, q, k, v):
        view = PagedKV(k, v, jnp.asarray(table), jnp.asarray(lengths), dtype=jnp.float32)
        return backend(q, view, jnp.asarray(q_pos), sliding_window=None, blocks=None)

    with jax.set_mesh(mesh):
        args = [jax.device_put(x, heads) for x in (q, k, v)]
        lowered = jax.jit(lambda *a: step(kernel, *a)).lower(*args)
        got = lowered.compile()(*args)
    want = jax.jit(lambda *a: step(XlaAttention(), *a))(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # shard_map leaves a manual computation in the program (Shardy; GSPMD: full-to-shard conversions).
    text = lowered.as_text()
    assert ("manual_computation" in text or "SPMDFullToShardShape" in text) == split


def test_model_at_tp2_with_the_kernel_equals_one_device_xla():
    """Whole-model logits (prefill tiles over dense views of every layer kind) at tp=2 with the kernel."""
    cfg = preset("tiny", num_key_value_heads=2)
    ids = np.array([[2, *range(20, 45)], [2, *range(50, 75)]])
    want = gemma4_jax.from_config(cfg, dtype="float32", seed=3).logits(ids)
    got = gemma4_jax.from_config(cfg, dtype="float32", seed=3, tp=2, attention_backend="pallas-interpret").logits(ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=5e-4, atol=5e-4)


def test_fp4_experts_split_over_tp_equal_one_device():
    """The FP4 expert kernel with the experts split over tp (shard_map, each device its own experts) equals the
    XLA path; uneven routing with empty experts on both devices' halves."""
    from gemma4_jax import quant

    rng = np.random.default_rng(0)
    groups, k, n = 8, 32, 48
    sizes = np.array([3, 0, 5, 1, 0, 0, 7, 2], np.int32)
    m = int(sizes.sum()) + 3  # padding rows past the sum
    rows = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.integers(0, 256, (groups, n, k // 2), dtype=np.uint8)
    block_scale = (rng.uniform(0.5, 1.5, (groups, n, k // 16)) * 0.1).astype(jnp.float8_e4m3fn)
    row_scale = rng.uniform(0.5, 2.0, (groups, n)).astype(np.float32)
    ids = np.concatenate([np.repeat(np.arange(groups), sizes), np.full(3, groups - 1)]).astype(np.int32)
    want = quant.grouped_matmul(quant.NVFP4, rows, w, block_scale, row_scale, sizes, ids, "xla")
    mesh = sharding.make_mesh(tp=2)
    experts = NamedSharding(mesh, P("tp"))
    with jax.set_mesh(mesh):
        args = (rows, jax.device_put(w, experts), jax.device_put(block_scale, experts),
                jax.device_put(row_scale, experts), sizes, ids)
        fn = jax.jit(lambda *a: quant.grouped_matmul(quant.NVFP4, *a, "fp4_pallas"))
        got = fn(*args)
        text = fn.lower(*args).as_text()
    live = int(sizes.sum())
    np.testing.assert_allclose(np.asarray(got)[:live], np.asarray(want)[:live], rtol=1e-4, atol=1e-4)
    assert "manual_computation" in text or "SPMDFullToShardShape" in text
