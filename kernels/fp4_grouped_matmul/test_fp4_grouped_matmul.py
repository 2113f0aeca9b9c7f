"""Tests of the NVFP4 grouped matmul (kernel.py and reference.py beside this file).

Three layers: the jnp dequantization and the reference matmul against an independent numpy float64 oracle (nibbles
decoded with a table built here from the E2M1 bit layout); the Pallas kernel in interpret mode against the
reference over ragged / empty / partial-tile group layouts; the kernel's Triton lowering for CUDA (which runs
without a GPU) so that the GPU path is at least lowered in CI.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import export

from gemma4_jax.kernels.fp4_grouped_matmul import (
    E2M1_VALUES,
    default_tiles,
    dequantize_nvfp4,
    fp4_grouped_matmul,
    fp4_grouped_matmul_pallas,
    fp4_grouped_matmul_reference,
    max_row_tiles,
    unpack_e2m1,
)
from gemma4_jax.kernels.fp4_grouped_matmul.kernel import _decode_e2m1, _decode_e4m3, _tile_map

# ---------------------------------------------------------------------------------------------------------------
# numpy oracle (independent of the module under test)
# ---------------------------------------------------------------------------------------------------------------


def e2m1_table() -> np.ndarray:
    """float64 value of each 4-bit code from the bit layout: s | e1 e0 | m, bias 1, subnormal when e == 0."""
    table = np.zeros(16)
    for code in range(16):
        sign, exponent, mantissa = code >> 3, (code >> 1) & 3, code & 1
        magnitude = mantissa * 0.5 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (exponent - 1)
        table[code] = -magnitude if sign else magnitude
    return table


def oracle_dequantize(w, block_scale, row_scale) -> np.ndarray:
    """float64 [..., N, K] from packed bytes: low nibble = even input."""
    codes = np.empty((*w.shape[:-1], 2 * w.shape[-1]), np.int64)
    codes[..., 0::2] = w & 0x0F
    codes[..., 1::2] = w >> 4
    scales = np.repeat(np.asarray(block_scale).astype(np.float64), 16, axis=-1)
    return e2m1_table()[codes] * scales * np.asarray(row_scale, np.float64)[..., None]


def oracle_matmul(x, w, block_scale, row_scale, group_sizes) -> np.ndarray:
    x = np.asarray(x).astype(np.float64)
    weights = oracle_dequantize(w, block_scale, row_scale)  # [G, N, K]
    out = np.zeros((x.shape[0], w.shape[1]))
    start = 0
    for group, size in enumerate(group_sizes):
        out[start : start + size] = x[start : start + size] @ weights[group].T
        start += size
    return out


def random_scale_bits(rng, shape, low=0x20, high=0x50) -> np.ndarray:
    """float8_e4m3fn block scales from random bit patterns (default: positive, about 2^-4 .. 2^3, as real ones)."""
    bits = rng.integers(low, high, shape, dtype=np.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0x38  # no NaN
    return bits.view(ml_dtypes.float8_e4m3fn)


def make_operands(rng, m, k, n, num_groups, x_dtype=np.float32):
    x = rng.standard_normal((m, k)).astype(np.float32)
    if x_dtype == jnp.bfloat16:
        x = x.astype(ml_dtypes.bfloat16)
    w = rng.integers(0, 256, (num_groups, n, k // 2), dtype=np.uint8)
    block_scale = random_scale_bits(rng, (num_groups, n, k // 16))
    # different scales per row, as a fused gate/up expert carries one weight_scale_2 per half
    row_scale = rng.uniform(0.25, 2.0, (num_groups, n)).astype(np.float32)
    return x, w, block_scale, row_scale


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


# ---------------------------------------------------------------------------------------------------------------
# E2M1 / E4M3 decoding and dequantization
# ---------------------------------------------------------------------------------------------------------------


def test_e2m1_values_match_bit_layout():
    assert E2M1_VALUES.dtype == np.float32
    np.testing.assert_array_equal(E2M1_VALUES[:8], [0, 0.5, 1, 1.5, 2, 3, 4, 6])
    np.testing.assert_array_equal(E2M1_VALUES, e2m1_table())
    assert np.signbit(E2M1_VALUES[8])  # code 8 is -0.0
    assert not E2M1_VALUES.flags.writeable


def test_unpack_low_nibble_first_on_hand_built_bytes():
    # 0x71: low nibble 1 (0.5), high nibble 7 (6.0); 0x9A: low 0xA (-1.0), high 9 (-0.5); 0x0F: low -6, high 0
    packed = np.array([[0x71, 0x9A], [0x0F, 0x00]], np.uint8)
    np.testing.assert_array_equal(np.asarray(unpack_e2m1(packed)), [[0.5, 6.0, -1.0, -0.5], [-6.0, 0.0, 0.0, 0.0]])


def test_unpack_all_bytes_against_oracle():
    every_byte = np.arange(256, dtype=np.uint8).reshape(4, 64)
    got = np.asarray(unpack_e2m1(every_byte))
    want = oracle_dequantize(every_byte, np.ones((4, 8), np.float32), np.ones(4))
    assert got.shape == (4, 128) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_in_kernel_decoders_match_ml_dtypes_for_every_code():
    codes = jnp.arange(16, dtype=jnp.int32)
    np.testing.assert_array_equal(np.asarray(_decode_e2m1(codes)), e2m1_table())
    bits = np.arange(256, dtype=np.uint8)
    want = bits.view(ml_dtypes.float8_e4m3fn).astype(np.float32)  # incl. subnormals, -0, both NaNs
    np.testing.assert_array_equal(np.asarray(_decode_e4m3(jnp.asarray(bits, jnp.int32))), want)


def test_dequantize_random_e4m3_scales_exact():
    rng = np.random.default_rng(1)
    w = rng.integers(0, 256, (2, 3, 5, 24), dtype=np.uint8)  # [..., N, K//2] with two leading axes, K=48
    block_scale = random_scale_bits(rng, (2, 3, 5, 3), low=0, high=256)  # every sign / subnormal / normal
    row_scale = rng.uniform(0.1, 3.0, (2, 3, 5)).astype(np.float32)
    got = np.asarray(dequantize_nvfp4(w, block_scale, row_scale))
    assert got.shape == (2, 3, 5, 48) and got.dtype == np.float32
    # e2m1 * e4m3 is exact in float32, so the only rounding is the one multiply by row_scale: bit-exact.
    np.testing.assert_array_equal(got, oracle_dequantize(w, block_scale, row_scale).astype(np.float32))
    per_tensor = np.asarray(dequantize_nvfp4(w, block_scale, np.float32(0.75)))
    np.testing.assert_array_equal(per_tensor, oracle_dequantize(w, block_scale, np.full((2, 3, 5), 0.75)))


# ---------------------------------------------------------------------------------------------------------------
# Tile map
# ---------------------------------------------------------------------------------------------------------------


def test_tile_map_covers_every_row_once_within_its_group():
    rng = np.random.default_rng(2)
    block_m = 4
    tile_map = jax.jit(_tile_map, static_argnums=(1, 2, 3))
    # worst cases (every group one row into its last tile) must meet the bound exactly; random layouts stay under it
    worst_cases = [(26, 6, [5, 5, 5, 5, 5, 1], True), (9, 20, [1] * 9 + [0] * 11, True)]
    random_cases = [(m, g, None, False) for m, g in [(1, 1), (29, 6), (9, 20)] * 15]  # few shapes: few compiles
    for m, num_groups, sizes, tight in worst_cases + random_cases:
        if sizes is None:
            sizes = rng.multinomial(int(rng.integers(0, m + 1)), np.ones(num_groups) / num_groups)
            sizes[rng.random(num_groups) < 0.3] = 0  # extra empty groups
        sizes = np.asarray(sizes, np.int32)
        bound = max_row_tiles(m, num_groups, block_m)
        exact = int(sum(-(-s // block_m) for s in sizes))
        assert exact == bound if tight else exact <= bound, (sizes, m, exact, bound)
        group, start, count = map(np.asarray, tile_map(jnp.asarray(sizes), m, block_m, bound))
        owner = np.full(m, -1)
        for g, s, c in zip(group, start, count):
            assert 0 <= c <= block_m
            assert np.all(owner[s : s + c] == -1), "two tiles write one row"
            owner[s : s + c] = g
        want = np.concatenate([np.full(s, g) for g, s in enumerate(sizes)] + [np.full(m - sizes.sum(), -1)])
        np.testing.assert_array_equal(owner, want)


def test_default_tiles_are_triton_shapes():
    for m, k, n, g in [(1, 16, 8, 1), (64, 2816, 1408, 128), (4096, 704, 2816, 128), (37, 80, 40, 4)]:
        block_m, block_n, block_k = default_tiles(m, k, n, g)
        for block, minimum in ((block_m, 16), (block_n, 16), (block_k, 32)):
            assert block >= minimum and block & (block - 1) == 0


# ---------------------------------------------------------------------------------------------------------------
# Reference vs float64 oracle
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("x_dtype", [np.float32, jnp.bfloat16])
@pytest.mark.parametrize("group_sizes", [[4, 0, 9, 2], [0, 6, 7, 0], [21, 0, 0, 0], [0, 0, 0, 0]])
def test_reference_matches_float64_oracle(group_sizes, x_dtype):
    rng = np.random.default_rng(3)
    x, w, block_scale, row_scale = make_operands(rng, 21, 48, 24, 4, x_dtype)
    group_sizes = np.array(group_sizes, np.int32)
    got = fp4_grouped_matmul_reference(x, w, block_scale, row_scale, group_sizes, out_dtype=jnp.float32)
    want = oracle_matmul(x, w, block_scale, row_scale, group_sizes)
    assert got.shape == (21, 24) and got.dtype == jnp.float32
    assert rel_err(got, want) <= 1e-6
    np.testing.assert_array_equal(np.asarray(got)[group_sizes.sum() :], 0.0)  # rows past the groups


def test_reference_default_out_dtype_is_x_dtype():
    rng = np.random.default_rng(4)
    x, w, block_scale, row_scale = make_operands(rng, 8, 32, 16, 2, jnp.bfloat16)
    out = fp4_grouped_matmul_reference(x, w, block_scale, row_scale, np.array([3, 5], np.int32))
    assert out.dtype == jnp.bfloat16
    want = oracle_matmul(x, w, block_scale, row_scale, [3, 5])
    assert rel_err(out, want) <= 1e-2  # bf16 output rounding


# ---------------------------------------------------------------------------------------------------------------
# Pallas kernel (interpret mode) vs reference
# ---------------------------------------------------------------------------------------------------------------

# One operand shape per dtype (M=37 rows, K=80 = 2.5 K tiles of 32, N=40 = 2.5 N tiles of 16, G=4): group sizes
# are runtime values, so all layouts below share one compiled kernel.
GROUP_LAYOUTS = [
    [5, 0, 17, 3],  # ragged, an empty group inside, 12 rows past the sum
    [0, 12, 9, 0],  # empty first and last groups
    [37, 0, 0, 0],  # a single group with every row, 3 row tiles with a partial last one
    [16, 16, 0, 5],  # groups that end exactly on tile boundaries
    [1, 1, 1, 1],  # one row per group (decode)
    [0, 0, 0, 0],  # nothing: all zeros
]


@pytest.mark.parametrize("x_dtype", [np.float32, jnp.bfloat16])
def test_kernel_matches_reference_across_group_layouts(x_dtype):
    rng = np.random.default_rng(5)
    x, w, block_scale, row_scale = make_operands(rng, 37, 80, 40, 4, x_dtype)
    for layout in GROUP_LAYOUTS:
        group_sizes = np.array(layout, np.int32)
        args = (x, w, block_scale, row_scale, group_sizes)
        got = fp4_grouped_matmul_pallas(
            *args, out_dtype=jnp.float32, block_m=16, block_n=16, block_k=32, interpret=True
        )
        want = fp4_grouped_matmul_reference(*args, out_dtype=jnp.float32)
        assert got.shape == (37, 40) and got.dtype == jnp.float32
        # bf16 x: weights are exact in bf16 and accumulation is float32, so both stay near float32 agreement.
        assert rel_err(got, want) <= 1e-5, layout
        np.testing.assert_array_equal(np.asarray(got)[group_sizes.sum() :], 0.0)


def test_kernel_k48_default_out_dtype_bf16():
    rng = np.random.default_rng(6)
    x, w, block_scale, row_scale = make_operands(rng, 19, 48, 32, 3, jnp.bfloat16)
    group_sizes = np.array([7, 0, 10], np.int32)
    got = fp4_grouped_matmul_pallas(
        x, w, block_scale, row_scale, group_sizes, block_m=16, block_n=16, block_k=32, interpret=True
    )
    assert got.dtype == jnp.bfloat16
    want = oracle_matmul(x, w, block_scale, row_scale, group_sizes)
    assert rel_err(got, want) <= 1e-2  # bf16 output rounding
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32))[17:], 0.0)


def test_dispatch():
    rng = np.random.default_rng(7)
    x, w, block_scale, row_scale = make_operands(rng, 10, 32, 16, 2)
    group_sizes = np.array([6, 3], np.int32)
    args = (x, w, block_scale, row_scale, group_sizes)
    want = oracle_matmul(*args)
    reference = fp4_grouped_matmul(*args, backend="reference")
    assert rel_err(reference, want) <= 1e-6
    assert jax.default_backend() == "cpu"
    np.testing.assert_array_equal(np.asarray(fp4_grouped_matmul(*args)), np.asarray(reference))  # auto -> reference
    kernel = fp4_grouped_matmul(*args, backend="pallas", interpret=True)  # default tiles
    assert rel_err(kernel, want) <= 1e-6
    traced = jax.jit(lambda *a: fp4_grouped_matmul(*a, backend="pallas", interpret=True))(*args)  # inside a jit
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(kernel))
    with pytest.raises(ValueError, match="needs a GPU"):
        fp4_grouped_matmul(*args, backend="pallas")
    with pytest.raises(ValueError, match="backend must be one of"):
        fp4_grouped_matmul(*args, backend="triton")


def test_kernel_lowers_to_triton_for_cuda():
    """The GPU path, short of running it: Pallas -> Triton IR for CUDA at the real 26B-A4B gate/up shape."""
    m, k, n, g = 64, 2816, 1408, 128
    specs = (
        jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
        jax.ShapeDtypeStruct((g, n, k // 2), jnp.uint8),
        jax.ShapeDtypeStruct((g, n, k // 16), jnp.float8_e4m3fn),
        jax.ShapeDtypeStruct((g, n), jnp.float32),
        jax.ShapeDtypeStruct((g,), jnp.int32),
    )
    exported = export.export(
        jax.jit(fp4_grouped_matmul_pallas),
        platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*specs)
    text = exported.mlir_module()
    assert "__gpu$xla.gpu.triton" in text and 'name = "fp4_grouped_matmul"' in text
    assert "tensor<128x1408x1408xui8>" in text  # the experts stay packed on the device


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------


def _valid(m=8, k=32, n=16, g=2):
    rng = np.random.default_rng(8)
    x, w, block_scale, row_scale = make_operands(rng, m, k, n, g)
    return dict(x=x, w=w, block_scale=block_scale, row_scale=row_scale, group_sizes=np.array([4, 4], np.int32))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(x=a["x"][:, :24], w=a["w"][..., :12]), r"K=24 .* multiple of 16"),
        (lambda a: a.update(x=a["x"][None]), r"x must be \[M, K\]"),
        (lambda a: a.update(x=a["x"].astype(np.int32)), "x dtype"),
        (lambda a: a.update(w=a["w"].astype(np.int8)), "packed uint8"),
        (lambda a: a.update(w=a["w"][..., :8]), r"holds K=16 .* has K=32"),
        (lambda a: a.update(block_scale=a["block_scale"].astype(np.float32)), "float8_e4m3fn"),
        (lambda a: a.update(block_scale=a["block_scale"][..., :1]), r"block_scale shape \(2, 16, 1\)"),
        (lambda a: a.update(row_scale=a["row_scale"][0]), r"row_scale must be float32 \[G, N\]"),
        (lambda a: a.update(row_scale=a["row_scale"].astype(np.float16)), "row_scale must be float32"),
        (lambda a: a.update(group_sizes=np.array([8], np.int32)), r"group_sizes must be an integer \[G\]"),
        (lambda a: a.update(group_sizes=np.array([4.0, 4.0])), "group_sizes must be an integer"),
    ],
)
def test_validation_errors(change, message):
    operands = _valid()
    change(operands)
    for fn in (fp4_grouped_matmul_reference, fp4_grouped_matmul_pallas):
        with pytest.raises(ValueError, match=message):
            fn(**operands)


def test_bad_tiles_and_dequantize_errors():
    operands = _valid()
    with pytest.raises(ValueError, match="block_m=24 must be a power of two"):
        fp4_grouped_matmul_pallas(**operands, block_m=24, interpret=True)
    with pytest.raises(ValueError, match="block_k=16 must be a power of two >= 32"):
        fp4_grouped_matmul_pallas(**operands, block_k=16, interpret=True)
    w, block_scale, row_scale = operands["w"], operands["block_scale"], operands["row_scale"]
    with pytest.raises(ValueError, match="not a multiple of the block size"):
        dequantize_nvfp4(w[..., :4], block_scale, row_scale)
    with pytest.raises(ValueError, match="does not match weight"):
        dequantize_nvfp4(w, block_scale[..., :1], row_scale)
    with pytest.raises(ValueError, match="does not broadcast"):
        dequantize_nvfp4(w, block_scale, row_scale[:, :3])
    with pytest.raises(ValueError, match="unpack_e2m1 expects packed uint8"):
        unpack_e2m1(np.zeros(4, np.int8))


# ---------------------------------------------------------------------------------------------------------------
# On a GPU: the compiled kernel at 26B-A4B's expert shapes (skipped elsewhere; select with -k gpu)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (the compiled Triton kernel)")
@pytest.mark.parametrize("rows", [8, 512, 8192])
def test_gpu_kernel_matches_reference_at_26b_shapes(rows):
    """gate_up (N = 2 x 704, K = 2816) over 128 experts, rows routed unevenly (some experts empty), bf16."""
    rng = np.random.default_rng(rows)
    num_groups, k, n = 128, 2816, 1408
    x, w, block_scale, row_scale = make_operands(rng, rows, k, n, num_groups, x_dtype=jnp.bfloat16)
    counts = rng.multinomial(rows, rng.dirichlet(np.full(num_groups, 0.3)))
    group_sizes = jnp.asarray(counts, jnp.int32)
    args = (jnp.asarray(x), jnp.asarray(w), jnp.asarray(block_scale), jnp.asarray(row_scale), group_sizes)
    want = fp4_grouped_matmul_reference(*args, out_dtype=jnp.float32)
    got = fp4_grouped_matmul(*args, out_dtype=jnp.float32, backend="pallas")
    assert rel_err(got, want) < 2e-2
