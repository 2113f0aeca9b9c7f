"""Tests of the paged-attention kernel (kernel.py) and its reference (reference.py), on CPU.

- the reference against the model's attention (`gemma4_jax.attention.reference_attention` over a position mask)
  on the gathered keys;
- the kernel in Pallas interpret mode against the reference: decode over a paged pool and over a ring (ragged
  lengths including 0 and 1, page and window edges, GQA ratios 1..8, head dims 256 and 512, flash-decoding
  splits), T > 1 verify rows, prefill (causal, window, vision blocks, chunks against a cached context, a ring
  plus the chunk's own keys), bf16 and float32;
- the key-block ranges against a brute-force visibility check (every needed block inside, the causal upper
  triangle and out-of-window blocks outside);
- the Triton lowering for CUDA at real Gemma 4 shapes (no GPU needed), and on a GPU the compiled kernel at those
  shapes (`-k gpu`; skipped without one);
- validation errors.
Interpret mode compiles one program per shape, so each case packs many rows into one call.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from gemma4_jax.kernels.paged_attention import (
    KVSource,
    dense_source,
    paged_attention,
    paged_attention_reference,
    tile_ranges,
    visible,
)

TOL = {jnp.float32: 5e-5, jnp.bfloat16: 3e-2}

# ---------------------------------------------------------------------------------------------------------------
# Cases: pools and positions built the way the engine lays them out (serving/kv_cache.py), from plain numpy
# ---------------------------------------------------------------------------------------------------------------


def _normal(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32), dtype)


def paged_case(rng, context, t, groups, kv_heads, head_dim, page_size, dtype, padding_rows=()):
    """Rows with `context[b]` cached tokens plus t new ones (written at positions context..context+t-1) in a
    paged pool with shuffled pages; rows in padding_rows are padding (no keys, query positions -1)."""
    b = len(context)
    lengths = np.array([0 if i in padding_rows else c + t for i, c in enumerate(context)])
    pages_per_row = max(1, -(-int(lengths.max()) // page_size)) + 1  # one spare slot: the table is wider than used
    num_pages = b * pages_per_row + 2  # + the trash page 0 and one never referenced
    table = rng.permutation(np.arange(1, num_pages))[: b * pages_per_row].reshape(b, pages_per_row)
    for i, n in enumerate(lengths):
        table[i, -(-n // page_size) :] = 0  # unused slots point at the trash page
    idx = np.arange(pages_per_row * page_size)[None, :]
    key_pos = np.where(idx < lengths[:, None], idx, -1)
    q_pos = np.array(context)[:, None] + np.arange(t)[None, :]
    q_pos[list(padding_rows)] = -1
    shape = (num_pages, page_size, kv_heads, head_dim)
    src = KVSource(
        _normal(rng, shape, dtype),
        _normal(rng, shape, dtype),
        jnp.asarray(table, jnp.int32),
        jnp.asarray(key_pos, jnp.int32),
    )
    q = _normal(rng, (b, t, kv_heads * groups, head_dim), dtype)
    return q, src, jnp.asarray(q_pos, jnp.int32)


def ring_positions(lengths, ring_len):
    """(B, R): slot j holds the latest position p < length with p % R == j (-1 never written), by brute force."""
    out = np.full((len(lengths), ring_len), -1)
    for i, n in enumerate(lengths):
        for p in range(n):
            out[i, p % ring_len] = p
    return out


def ring_source(rng, lengths, ring_len, kv_heads, head_dim, dtype):
    """A ring pool (B + 1 rows, shuffled slots) holding positions < lengths[b] of each row."""
    b = len(lengths)
    shape = (b + 1, ring_len, kv_heads, head_dim)
    slots = rng.permutation(b + 1)[:b]
    return KVSource(
        _normal(rng, shape, dtype),
        _normal(rng, shape, dtype),
        jnp.asarray(slots[:, None], jnp.int32),
        jnp.asarray(ring_positions(lengths, ring_len), jnp.int32),
    )


def check(q, sources, q_pos, *, dtype=None, **kwargs):
    """Kernel (interpret mode) == reference, outputs and log-sum-exps."""
    window, q_blocks = kwargs.get("sliding_window"), kwargs.get("q_blocks")
    want, want_lse = paged_attention_reference(q, sources, q_pos, sliding_window=window, q_blocks=q_blocks)
    got, got_lse = paged_attention(q, sources, q_pos, interpret=True, **kwargs)
    tol = TOL[dtype or q.dtype.type]
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(got_lse), np.asarray(want_lse), rtol=1e-4, atol=1e-4)
    return np.asarray(want_lse)


# ---------------------------------------------------------------------------------------------------------------
# The reference against the model's attention
# ---------------------------------------------------------------------------------------------------------------


def test_reference_matches_model_attention_on_gathered_keys():
    from gemma4_jax.attention import attention_mask, reference_attention

    rng = np.random.default_rng(0)
    q, src, q_pos = paged_case(rng, [0, 5, 9, 2], 3, 3, 2, 16, 4, jnp.float32, padding_rows=(3,))
    blocks = jnp.asarray(rng.integers(-1, 2, q_pos.shape), jnp.int32)
    key_blocks = jnp.asarray(rng.integers(-1, 2, src.positions.shape), jnp.int32)
    for window, q_blk, key_blk in ((None, None, None), (4, None, None), (6, blocks, key_blocks)):
        source = src._replace(blocks=key_blk)
        out, lse = paged_attention_reference(q, [source], q_pos, sliding_window=window, q_blocks=q_blk)
        b, p = src.page_table.shape
        k = src.k_pages[src.page_table].reshape(b, -1, *src.k_pages.shape[2:])
        v = src.v_pages[src.page_table].reshape(k.shape)
        mask = attention_mask(q_pos, src.positions, window, None if q_blk is None else (q_blk, key_blk))
        want = reference_attention(q, k, v, mask)
        seen = np.asarray(jnp.any(mask, -1))  # rows that see no key: the model averages garbage, we give 0
        np.testing.assert_allclose(np.asarray(out)[seen], np.asarray(want)[seen], rtol=1e-5, atol=1e-5)
        assert np.all(np.asarray(out)[~seen] == 0) and np.all(np.isneginf(np.asarray(lse)[~seen]))
        assert (~seen).any() and seen.any()


# ---------------------------------------------------------------------------------------------------------------
# Decode: paged pool and ring, T >= 1
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_decode_paged_head_dim_512_ragged_with_splits(dtype):
    """Full-attention layer shape (H 512, G 8): contexts 0 (the first token), 1, a page edge, one past it and a
    padding row; the key axis split three ways (flash-decoding)."""
    rng = np.random.default_rng(1)
    q, src, q_pos = paged_case(rng, [0, 1, 8, 9, 0], 1, 8, 1, 512, 4, dtype, padding_rows=(4,))
    lse = check(q, [src], q_pos, num_splits=3)
    assert np.isneginf(lse[4]).all() and np.isfinite(lse[:4]).all()


def test_decode_ring_head_dim_256_window_edges():
    """Sliding layer (H 256, G 2, K 2) reading its ring of R = 6 slots (window 5 + one spare): lengths 1, below
    the ring, exactly R, wrapped twice; the window bounds what a query sees, not the ring."""
    rng = np.random.default_rng(2)
    lengths = [1, 4, 6, 14]
    src = ring_source(rng, lengths, 6, 2, 256, jnp.bfloat16)
    q = _normal(rng, (4, 1, 4, 256), jnp.bfloat16)
    q_pos = jnp.asarray(np.array(lengths)[:, None] - 1, jnp.int32)
    check(q, [src], q_pos, sliding_window=5, num_splits=2)


@pytest.mark.parametrize("groups", [1, 3, 5, 6, 7])
def test_decode_gqa_ratios(groups):
    """GQA ratios not covered elsewhere (2, 4 and 8 are): packed query rows that do not fill a tile evenly."""
    rng = np.random.default_rng(10 + groups)
    q, src, q_pos = paged_case(rng, [3, 0, 12], 2, groups, 2, 16, 4, jnp.float32)
    check(q, [src], q_pos, num_splits=2)


def test_verify_rows_paged_and_ring():
    """Speculative verify: T = 4 new tokens per row, causal among themselves, over a paged pool (G 4) and over an
    updated ring whose spare slots (R = window + T - 1) keep every key a draft needs."""
    rng = np.random.default_rng(3)
    q, src, q_pos = paged_case(rng, [0, 5, 11, 2], 4, 4, 2, 256, 4, jnp.float32, padding_rows=(3,))
    check(q, [src], q_pos, num_splits=2)
    lengths = [4, 9, 20]
    ring = ring_source(rng, lengths, 8, 2, 32, jnp.float32)
    q = _normal(rng, (3, 4, 8, 32), jnp.float32)
    q_pos = jnp.asarray(np.array(lengths)[:, None] - 4 + np.arange(4)[None, :], jnp.int32)
    check(q, [ring], q_pos, sliding_window=5)


def test_empty_context_sees_nothing():
    """Keys all empty (length 0) while the query is real: output 0 and lse -inf, not NaN."""
    rng = np.random.default_rng(4)
    q, src, q_pos = paged_case(rng, [0, 3], 1, 2, 1, 16, 4, jnp.float32)
    src = src._replace(positions=jnp.full_like(src.positions, -1))
    out, lse = paged_attention(q, [src], q_pos, num_splits=2, interpret=True)
    assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))


# ---------------------------------------------------------------------------------------------------------------
# Prefill: causal, window, vision blocks, chunks against cached context
# ---------------------------------------------------------------------------------------------------------------


def test_prefill_causal_window_and_vision_blocks():
    """A 40-token prompt per row (the second padded after 29), dense keys, 16-row query tiles and 16-key blocks:
    causal, then a window of 7, then vision blocks (bidirectional inside each image, window still bounding)."""
    rng = np.random.default_rng(5)
    t, groups = 40, 2
    q_pos = np.tile(np.arange(t), (2, 1))
    q_pos[1, 29:] = -1
    q_pos = jnp.asarray(q_pos, jnp.int32)
    k, v = _normal(rng, (2, t, 1, 32), jnp.float32), _normal(rng, (2, t, 1, 32), jnp.float32)
    q = _normal(rng, (2, t, groups, 32), jnp.float32)
    blocks = np.full((2, t), -1)
    blocks[0, 5:17], blocks[0, 30:36], blocks[1, 2:9] = 0, 1, 0
    blocks = jnp.asarray(blocks, jnp.int32)
    tiles = dict(block_q=16, block_k=16)
    check(q, [dense_source(k, v, q_pos)], q_pos, **tiles)
    check(q, [dense_source(k, v, q_pos)], q_pos, sliding_window=7, **tiles)
    check(q, [dense_source(k, v, q_pos, blocks)], q_pos, sliding_window=7, q_blocks=blocks, **tiles)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_chunked_prefill_against_paged_context(dtype):
    """A 9-token chunk per row after 0, 13 and 16 cached tokens (its keys already written to the pool), H 512."""
    rng = np.random.default_rng(6)
    q, src, q_pos = paged_case(rng, [0, 13, 16], 9, 2, 1, 512, 8, dtype)
    check(q, [src], q_pos, block_q=16, block_k=16)


def test_chunked_prefill_ring_plus_chunk_with_blocks():
    """A sliding layer's prefill chunk: the ring as it was before the chunk (R 8, window 8) plus the chunk's own
    keys, two sources merged by log-sum-exp; an image inside the chunk attends bidirectionally."""
    rng = np.random.default_rng(7)
    context, t, ring_len = [0, 3, 19], 10, 8
    ring = ring_source(rng, context, ring_len, 2, 32, jnp.float32)
    q_pos = np.array(context)[:, None] + np.arange(t)[None, :]
    q_pos[0, 7:] = -1  # a ragged chunk
    q_pos = jnp.asarray(q_pos, jnp.int32)
    blocks = np.full((3, t), -1)
    blocks[2, 2:6] = 4
    blocks = jnp.asarray(blocks, jnp.int32)
    chunk = dense_source(
        _normal(rng, (3, t, 2, 32), jnp.float32), _normal(rng, (3, t, 2, 32), jnp.float32), q_pos, blocks
    )
    ring = ring._replace(blocks=jnp.full(ring.positions.shape, -1, jnp.int32))
    q = _normal(rng, (3, t, 6, 32), jnp.float32)
    check(q, [ring, chunk], q_pos, sliding_window=ring_len, q_blocks=blocks, block_q=16, block_k=16)


# ---------------------------------------------------------------------------------------------------------------
# Key-block ranges
# ---------------------------------------------------------------------------------------------------------------


def test_tile_ranges_cover_every_visible_key_and_skip_the_rest():
    rng = np.random.default_rng(8)
    block_q, block_k, t = 16, 16, 64
    q_pos = np.tile(np.arange(t), (2, 1))
    key_pos = np.concatenate([q_pos, np.full((2, 7), -1)], 1)
    key_pos[1] = rng.permutation(key_pos[1])  # any key order (a ring)
    q_blk = np.full((2, t), -1)
    q_blk[0, 10:40] = 3
    key_blk = np.concatenate([q_blk, np.full((2, 7), -1)], 1)
    num_blocks = -(-key_pos.shape[1] // block_k)
    q_pos, key_pos, q_blk, key_blk = (jnp.asarray(a, jnp.int32) for a in (q_pos, key_pos, q_blk, key_blk))
    for window, blocks in ((None, None), (20, None), (20, (q_blk, key_blk))):
        qb, kb = (None, None) if blocks is None else blocks
        lo, hi = tile_ranges(q_pos, qb, key_pos, kb, block_q=block_q, block_k=block_k, sliding_window=window)
        lo, hi = np.asarray(lo), np.asarray(hi)
        sees = np.asarray(
            visible(
                q_pos[:, :, None],
                key_pos[:, None, :],
                window,
                None if qb is None else qb[:, :, None],
                None if kb is None else kb[:, None, :],
            )
        )
        sees = np.pad(sees, ((0, 0), (0, 0), (0, num_blocks * block_k - sees.shape[2])))
        needed = sees.reshape(2, t // block_q, block_q, num_blocks, block_k).any((2, 4))  # (B, q tiles, blocks)
        for b, tile, j in zip(*np.nonzero(needed), strict=True):
            assert lo[b, tile] <= j < hi[b, tile], (window, b, tile, j)
        if blocks is None:  # row 0 in order: tile i needs key blocks up to i only; the window drops earlier ones
            np.testing.assert_array_equal(hi[0], np.arange(1, t // block_q + 1))
            np.testing.assert_array_equal(lo[0], [0, 0, 0, 1] if window else [0, 0, 0, 0])  # keys > q - 20
        else:  # the image (rows 10..39) reaches forward to key 39, block 2
            assert hi[0, 0] == 3 and hi[0, 1] == 3


# ---------------------------------------------------------------------------------------------------------------
# On a GPU: the compiled kernel (skipped elsewhere; select with -k gpu)
# ---------------------------------------------------------------------------------------------------------------

ON_GPU = jax.default_backend() == "gpu"


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU (the compiled Triton kernel)")
def test_gpu_decode_and_verify_at_gemma4_shapes():
    """31B full layer (H 512, G 8, K 4, 16-token pages): ragged contexts up to 3000, T 1 and T 4."""
    rng = np.random.default_rng(20)
    context = [0, 1, 15, 16, 17, 700, 2047, 3000]
    for t in (1, 4):
        q, src, q_pos = paged_case(rng, context, t, 8, 4, 512, 16, jnp.bfloat16)
        want, want_lse = paged_attention_reference(q, [src], q_pos)
        got, got_lse = paged_attention(q, [src], q_pos)
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=3e-2, atol=3e-2)
        np.testing.assert_allclose(np.asarray(got_lse), np.asarray(want_lse), rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU (the compiled Triton kernel)")
def test_gpu_prefill_chunk_over_ring_and_paged_context():
    """31B sliding layer (H 256, G 2, K 16): a 256-token chunk over its ring (1024) plus itself, window 1024,
    with an image; and a full layer's chunk after 1500 cached tokens."""
    rng = np.random.default_rng(21)
    context, t, ring_len = [0, 900, 2500], 256, 1024
    ring = ring_source(rng, context, ring_len, 16, 256, jnp.bfloat16)
    q_pos = jnp.asarray(np.array(context)[:, None] + np.arange(t)[None, :], jnp.int32)
    blocks = np.full((3, t), -1)
    blocks[1, 10:74] = 0
    blocks = jnp.asarray(blocks, jnp.int32)
    chunk = dense_source(
        _normal(rng, (3, t, 16, 256), jnp.bfloat16), _normal(rng, (3, t, 16, 256), jnp.bfloat16), q_pos, blocks
    )
    ring = ring._replace(blocks=jnp.full(ring.positions.shape, -1, jnp.int32))
    q = _normal(rng, (3, t, 32, 256), jnp.bfloat16)
    want, _ = paged_attention_reference(q, [ring, chunk], q_pos, sliding_window=ring_len, q_blocks=blocks)
    got, _ = paged_attention(q, [ring, chunk], q_pos, sliding_window=ring_len, q_blocks=blocks)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=3e-2, atol=3e-2)
    q, src, q_pos = paged_case(rng, [1500, 0], 256, 8, 4, 512, 16, jnp.bfloat16)
    want, _ = paged_attention_reference(q, [src], q_pos)
    got, _ = paged_attention(q, [src], q_pos)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=3e-2, atol=3e-2)


# ---------------------------------------------------------------------------------------------------------------
# Triton lowering and validation
# ---------------------------------------------------------------------------------------------------------------


def _lower_for_cuda(fn, *specs) -> str:
    exported = export.export(
        jax.jit(fn),
        platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )
    return exported(*specs).mlir_module()


def test_kernel_lowers_to_triton_for_cuda_at_gemma4_shapes():
    """31B shapes without a GPU: full-layer decode (H 512, 32 query heads over 4 KV heads, 16-token pages, split
    key axis) and a sliding-layer prefill chunk (H 256, 16 KV heads) over its ring plus the chunk."""
    spec = jax.ShapeDtypeStruct
    b, pages, ps, p = 8, 1024, 16, 64

    def decode(q, kp, vp, table, key_pos, q_pos):
        return paged_attention(q, [KVSource(kp, vp, table, key_pos)], q_pos)

    text = _lower_for_cuda(
        decode,
        spec((b, 1, 32, 512), jnp.bfloat16),
        spec((pages, ps, 4, 512), jnp.bfloat16),
        spec((pages, ps, 4, 512), jnp.bfloat16),
        spec((b, p), jnp.int32),
        spec((b, p * ps), jnp.int32),
        spec((b, 1), jnp.int32),
    )
    assert text.count("__gpu$xla.gpu.triton") == 1 and 'name = "paged_attention"' in text
    assert f"tensor<{pages}x{ps}x4x512xbf16>" in text  # the pool goes in whole: no gather outside the kernel

    t, ring = 64, 1024

    def prefill(q, kr, vr, slots, ring_pos, kc, vc, q_pos):
        sources = [KVSource(kr, vr, slots, ring_pos), dense_source(kc, vc, q_pos)]
        return paged_attention(q, sources, q_pos, sliding_window=1024)

    text = _lower_for_cuda(
        prefill,
        spec((b, t, 32, 256), jnp.bfloat16),
        spec((9, ring, 16, 256), jnp.bfloat16),
        spec((9, ring, 16, 256), jnp.bfloat16),
        spec((b, 1), jnp.int32),
        spec((b, ring), jnp.int32),
        spec((b, t, 16, 256), jnp.bfloat16),
        spec((b, t, 16, 256), jnp.bfloat16),
        spec((b, t), jnp.int32),
    )
    assert text.count("__gpu$xla.gpu.triton") == 2


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(q=a["q"][0]), r"q must be \(B, T, N, H\)"),
        (lambda a: a.update(q_pos=a["q_pos"][:1]), r"q_positions must be \(B, T\)"),
        (lambda a: a.update(q=a["q"][..., :3, :]), "do not fit q heads"),
        (lambda a: a.update(src=a["src"]._replace(positions=a["src"].positions[:, 1:])), "positions must be"),
        (lambda a: a.update(src=a["src"]._replace(v_pages=a["src"].v_pages[:1])), "v_pages"),
        (lambda a: a.update(kwargs={"q_blocks": jnp.zeros_like(a["q_pos"])}), "vision blocks must be given"),
        (lambda a: a.update(kwargs={"block_k": 24}), "block_k=24 must be a power of two"),
        (lambda a: a.update(kwargs={"num_splits": 0}), "num_splits must be >= 1"),
        (lambda a: a.update(kwargs={"sliding_window": 0}), "sliding_window must be >= 1"),
    ],
)
def test_validation_errors(change, message):
    rng = np.random.default_rng(9)
    q, src, q_pos = paged_case(rng, [2, 3], 1, 2, 2, 16, 4, jnp.float32)
    args = dict(q=q, src=src, q_pos=q_pos, kwargs={})
    change(args)
    with pytest.raises(ValueError, match=message):
        paged_attention(args["q"], [args["src"]], args["q_pos"], interpret=True, **args["kwargs"])
    with pytest.raises(ValueError, match="at least one key source"):
        paged_attention(q, [], q_pos, interpret=True)
