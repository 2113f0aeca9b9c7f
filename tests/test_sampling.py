"""Tests of the batched per-request sampler (serving/sampling.py): parameter validation, greedy exactness,
seeded reproducibility independent of batch mates, sampled distributions, penalties, logprobs and jit caching."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax.serving.sampling import (
    SampleResult,
    SamplingBatch,
    SamplingParams,
    apply_penalties,
    counts_from_tokens,
    first_argmax,
    inverse_cdf,
    prompt_mask_from_tokens,
    request_key,
    sample,
    token_log_softmax,
    truncate_logits,
    update_counts,
)

sample_jit = jax.jit(sample, static_argnames=("num_logprobs",))


def make_batch(params_list, batch_size=None):
    batch_size = batch_size or len(params_list)
    keys = [request_key(p.seed) for p in params_list]
    return SamplingBatch.from_params(params_list, keys, batch_size)


def zero_steps(batch_size):
    return jnp.zeros((batch_size,), jnp.int32)


# ---------------------------------------------------------------------------------------------------------------
# SamplingParams
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", "hot"),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("top_k", 2.5),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.1),
        ("frequency_penalty", 3.0),
        ("frequency_penalty", -2.5),
        ("max_tokens", 0),
        ("max_tokens", 1.5),
        ("logprobs", -1),
        ("logprobs", 21),
        ("n", 0),
        ("seed", 1.5),
        ("seed", "42"),
        ("seed", True),
        ("stop", 5),
        ("stop", ["ok", 3]),
        ("stop", [""]),
        ("stop_token_ids", [1, -2]),
        ("stop_token_ids", 7),
        ("ignore_eos", "yes"),
        ("skip_special_tokens", 1),
    ],
)
def test_params_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be .*, got ") as error:
        SamplingParams(**{field: value})
    # stop / stop_token_ids lists are reported in their normalised (tuple) form.
    shown = repr(tuple(value)) if isinstance(value, list) else repr(value)
    assert str(error.value).endswith(f"got {shown}")


def test_params_valid_values_and_normalisation():
    SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, min_p=1.0, logprobs=20, seed=-5, presence_penalty=-2.0)
    params = SamplingParams(stop="###", stop_token_ids=[1, 106])
    assert params.stop == ("###",) and params.stop_token_ids == (1, 106)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams().stop == () and SamplingParams().stop_token_ids == ()
    assert hash(params) == hash(SamplingParams(stop=("###",), stop_token_ids=(1, 106)))
    with pytest.raises(ValueError, match="top_p"):
        dataclasses.replace(params, top_p=2.0)


def test_from_params_pads_with_greedy_neutral_rows():
    params = [SamplingParams(temperature=0.7, top_k=-1, top_p=0.9, seed=3), SamplingParams(top_k=40, min_p=0.1)]
    batch = make_batch(params, batch_size=4)
    np.testing.assert_array_equal(batch.temperature, np.array([0.7, 1.0, 0.0, 0.0], np.float32))
    np.testing.assert_array_equal(batch.top_k, [0, 40, 0, 0])
    np.testing.assert_array_equal(batch.top_p, np.array([0.9, 1.0, 1.0, 1.0], np.float32))
    np.testing.assert_array_equal(batch.repetition_penalty, [1.0] * 4)
    np.testing.assert_array_equal(batch.rng_keys[0], request_key(3))
    np.testing.assert_array_equal(batch.rng_keys[2:], 0)
    assert batch.rng_keys.shape == (4, 2) and batch.rng_keys.dtype == np.uint32
    assert batch.top_k.dtype == np.int32 and batch.temperature.dtype == np.float32
    with pytest.raises(ValueError, match="do not fit"):
        make_batch(params, batch_size=1)
    with pytest.raises(ValueError, match="rng keys"):
        SamplingBatch.from_params(params, [request_key(0)], 4)


# ---------------------------------------------------------------------------------------------------------------
# Keys and token history
# ---------------------------------------------------------------------------------------------------------------


def test_request_key_matches_jax_and_keeps_64_bits():
    for seed in (0, 1, 42, 2**31 - 1, 2**31, 2**32 - 1):
        expected = np.asarray(jax.random.key_data(jax.random.key(seed, impl="threefry2x32")))
        np.testing.assert_array_equal(request_key(seed), expected)
    assert request_key(5).dtype == np.uint32 and request_key(5).shape == (2,)
    # JAX without x64 truncates these to 0; distinct seeds must keep distinct streams.
    assert not np.array_equal(request_key(2**40), request_key(0))
    assert not np.array_equal(request_key(None), request_key(None))


def test_counts_and_prompt_mask():
    tokens = jnp.array([[1, 3, 3, 9], [2, 2, 0, 0]], jnp.int32)  # second row: 2 real tokens, padded with 0
    lengths = jnp.array([4, 2])
    counts = counts_from_tokens(tokens, lengths, vocab_size=5)
    np.testing.assert_array_equal(counts, [[0, 1, 0, 2, 1], [0, 0, 2, 0, 0]])
    np.testing.assert_array_equal(prompt_mask_from_tokens(tokens, lengths, 5), counts > 0)

    update = jax.jit(update_counts)
    counts = update(counts, jnp.array([3, 4], jnp.int32), jnp.array([True, False]))
    np.testing.assert_array_equal(counts, [[0, 1, 0, 3, 1], [0, 0, 2, 0, 0]])
    counts = update_counts(counts, jnp.array([0, 4], jnp.int32))
    np.testing.assert_array_equal(counts, [[1, 1, 0, 3, 1], [0, 0, 2, 0, 1]])


# ---------------------------------------------------------------------------------------------------------------
# Greedy and reproducibility
# ---------------------------------------------------------------------------------------------------------------


def test_greedy_is_argmax_and_independent_of_batch_mates():
    vocab = 97
    logits = jax.random.normal(jax.random.key(0), (6, vocab), jnp.float32) * 3
    greedy_rows = [0, 3]
    params_a = [SamplingParams(temperature=0.0)] * 6
    params_a[1] = SamplingParams(temperature=1.3, seed=1)
    params_a[2] = SamplingParams(temperature=0.5, top_k=3, top_p=0.5)
    params_a[4] = SamplingParams(min_p=0.2, seed=7)
    params_b = [SamplingParams(temperature=0.0, top_p=0.3)] * 6  # truncation must not matter for greedy rows
    for i in (1, 2, 4, 5):
        params_b[i] = SamplingParams(temperature=2.0, top_k=50, seed=100 + i)
    other_logits = logits.at[jnp.array([1, 2, 4, 5])].set(jax.random.normal(jax.random.key(1), (4, vocab)))

    expected = np.argmax(np.asarray(logits), axis=-1)
    all_greedy = sample_jit(logits, make_batch([SamplingParams(temperature=0.0)] * 6), zero_steps(6))
    np.testing.assert_array_equal(all_greedy.tokens, expected)
    tokens_a = sample_jit(logits, make_batch(params_a), zero_steps(6)).tokens
    tokens_b = sample_jit(other_logits, make_batch(params_b), jnp.arange(6, dtype=jnp.int32)).tokens
    np.testing.assert_array_equal(np.asarray(tokens_a)[greedy_rows], expected[greedy_rows])
    np.testing.assert_array_equal(np.asarray(tokens_b)[greedy_rows], expected[greedy_rows])


def test_greedy_uses_penalised_logits():
    logits = jnp.array([[3.0, 2.9, 0.0, -1.0]])
    counts = jnp.array([[1, 0, 0, 0]], jnp.int32)
    batch = make_batch([SamplingParams(temperature=0.0, repetition_penalty=1.5)])
    assert int(sample_jit(logits, batch, zero_steps(1)).tokens[0]) == 0
    assert int(sample_jit(logits, batch, zero_steps(1), counts, None).tokens[0]) == 1


def _generate(seed_params, row, batch_size, mates, steps, logits_for_step):
    """Tokens of the request `seed_params` at `row` of a batch of `batch_size`, other rows from `mates`."""
    params = [mates[i % len(mates)] for i in range(batch_size)]
    params[row] = seed_params
    batch = make_batch(params)
    tokens = []
    for step in range(steps):
        noise = jax.random.normal(jax.random.key(1000 + step), (batch_size, 64)) * 2
        logits = noise.at[row].set(logits_for_step(step))  # mates see unrelated logits
        steps = (step + 3 * jnp.arange(batch_size, dtype=jnp.int32)).at[row].set(step)  # mates at other steps
        result = sample_jit(logits, batch, steps)
        tokens.append(int(result.tokens[row]))
    return tokens


def test_seeded_sampling_is_reproducible_across_batch_compositions():
    def logits_for_step(step):
        return jax.random.normal(jax.random.key(step), (64,)) * 0.5  # flat: many plausible tokens

    request = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    mates_a = [SamplingParams(temperature=0.0), SamplingParams(seed=5, top_k=4)]
    mates_b = [SamplingParams(temperature=1.7, min_p=0.05), SamplingParams(), SamplingParams(temperature=0.3)]
    first = _generate(request, 1, 4, mates_a, 8, logits_for_step)
    again = _generate(request, 1, 4, mates_a, 8, logits_for_step)
    moved = _generate(request, 6, 8, mates_b, 8, logits_for_step)
    alone = _generate(request, 0, 1, mates_b, 8, logits_for_step)
    assert first == again == moved == alone
    assert len(set(first)) > 1, "the step index must change the noise"

    other_seed = _generate(dataclasses.replace(request, seed=4321), 1, 4, mates_a, 8, logits_for_step)
    assert other_seed != first


# ---------------------------------------------------------------------------------------------------------------
# Sampled distributions
# ---------------------------------------------------------------------------------------------------------------

NUM_SAMPLES = 20_000
PROBS = np.array([0.4, 0.3, 0.15, 0.1, 0.05], np.float64)


def _frequencies(params: SamplingParams, probs: np.ndarray = PROBS) -> np.ndarray:
    """Empirical token frequencies of NUM_SAMPLES draws: one row per draw, same key, steps 0..N-1."""
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (NUM_SAMPLES, len(probs)))
    batch = make_batch([dataclasses.replace(params, seed=2024)] * NUM_SAMPLES)
    tokens = sample_jit(logits, batch, jnp.arange(NUM_SAMPLES, dtype=jnp.int32)).tokens
    return np.bincount(np.asarray(tokens), minlength=len(probs)) / NUM_SAMPLES


def _assert_matches(frequencies: np.ndarray, expected: np.ndarray) -> None:
    # Each frequency is a mean of N Bernoulli(p) draws: standard error sqrt(p(1-p)/N) <= 0.0035 at N = 20k. Five
    # standard errors per token give a false-alarm rate < 1e-5 over the whole vocab (and the keys are fixed, so
    # the test is deterministic). Tokens that must never appear are checked exactly.
    expected = expected / expected.sum()
    bound = 5 * np.sqrt(expected * (1 - expected) / NUM_SAMPLES)
    assert np.all(frequencies[expected == 0] == 0), (frequencies, expected)
    assert np.all(np.abs(frequencies - expected) <= bound), (frequencies, expected, bound)


def test_distribution_matches_softmax():
    _assert_matches(_frequencies(SamplingParams(temperature=1.0)), PROBS)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_distribution_matches_tempered_softmax(temperature):
    _assert_matches(_frequencies(SamplingParams(temperature=temperature)), PROBS ** (1 / temperature))


def test_inverse_cdf_matches_the_flat_cumulative_sum_and_skips_zero_probability_tokens():
    """The two-level draw (blocks of 128, then inside the block) picks the first token whose cumulative probability
    reaches u x total, as one cumulative sum over the row does (up to float rounding at a boundary), never a token
    of zero probability (70% of the vocabulary masked here, a ragged last block), and u = 1 picks the last
    non-zero token."""
    rng = np.random.default_rng(0)
    b, v = 16, 1000
    logits = rng.standard_normal((b, v)).astype(np.float32) * 3
    logits[:, rng.random(v) < 0.7] = -np.inf
    probs = jax.nn.softmax(jnp.asarray(logits), -1)
    draw = jax.jit(inverse_cdf)
    agree = 0
    for _ in range(50):
        u = 1.0 - jnp.asarray(rng.random(b), jnp.float32)
        got = np.asarray(draw(probs, u))
        cdf = np.cumsum(np.asarray(probs, np.float64), -1)
        want = np.minimum((cdf < np.asarray(u)[:, None] * cdf[:, -1:]).sum(-1), v - 1)
        agree += (got == want).sum()
        assert (np.asarray(probs)[np.arange(b), got] > 0).all()
    assert agree >= 0.995 * 50 * b, agree
    last = np.asarray(draw(probs, jnp.ones((b,), jnp.float32)))
    np.testing.assert_array_equal(last, [np.flatnonzero(np.asarray(probs)[i])[-1] for i in range(b)])


def test_top_k_keeps_the_k_largest_renormalised():
    _assert_matches(_frequencies(SamplingParams(top_k=2)), np.array([0.4, 0.3, 0, 0, 0]))
    _assert_matches(_frequencies(SamplingParams(top_k=3, temperature=0.5)), np.array([0.16, 0.09, 0.0225, 0, 0]))


def test_top_p_keeps_the_smallest_nucleus():
    # Mass before each token: 0, 0.4, 0.7, 0.85, 0.95 -> top_p 0.65 keeps 2 tokens, 0.8 keeps 3.
    _assert_matches(_frequencies(SamplingParams(top_p=0.65)), np.array([0.4, 0.3, 0, 0, 0]))
    _assert_matches(_frequencies(SamplingParams(top_p=0.8)), np.array([0.4, 0.3, 0.15, 0, 0]))
    # Top-p acts on the top-k-renormalised distribution: top-3 is (0.47, 0.35, 0.18), mass before 0, 0.47, 0.82.
    _assert_matches(_frequencies(SamplingParams(top_k=3, top_p=0.8)), np.array([0.4, 0.3, 0, 0, 0]))


def test_min_p_drops_tokens_below_fraction_of_max():
    # Threshold min_p * 0.4: 0.3 * 0.4 = 0.12 keeps probabilities >= 0.12, i.e. 0.4, 0.3, 0.15.
    _assert_matches(_frequencies(SamplingParams(min_p=0.3)), np.array([0.4, 0.3, 0.15, 0, 0]))
    _assert_matches(_frequencies(SamplingParams(min_p=0.6)), np.array([0.4, 0.3, 0, 0, 0]))


def test_truncate_logits_top_p_matches_reference_nucleus():
    vocab, rows = 40, 8
    logits = jax.random.normal(jax.random.key(3), (rows, vocab)) * 2
    top_p = jnp.array([0.05, 0.2, 0.33, 0.5, 0.71, 0.9, 0.99, 1.0], jnp.float32)
    kept = np.isfinite(np.asarray(truncate_logits(logits, jnp.zeros(rows, jnp.int32), top_p, jnp.zeros(rows))))
    exp = np.exp(np.asarray(logits, np.float64))
    probs = exp / exp.sum(axis=-1, keepdims=True)
    for row in range(rows):
        order = np.argsort(-probs[row])
        cumulative = np.cumsum(probs[row][order])
        # Smallest prefix whose mass reaches top_p.
        if top_p[row] >= 1:
            size = vocab
        else:
            assert np.all(np.abs(cumulative - float(top_p[row])) > 1e-5), "ambiguous test case"
            size = int(np.searchsorted(cumulative, float(top_p[row])) + 1)
        assert set(np.flatnonzero(kept[row])) == set(order[:size]), row


# ---------------------------------------------------------------------------------------------------------------
# Penalties
# ---------------------------------------------------------------------------------------------------------------

PENALTY_LOGITS = jnp.array([[2.0, -1.0, 0.5, 3.0, -2.0]])
PROMPT_MASK = jnp.array([[False, True, False, False, False]])  # token 1 in the prompt
OUTPUT_COUNTS = jnp.array([[2, 0, 1, 0, 0]], jnp.int32)  # token 0 generated twice, token 2 once


def _penalise(repetition=1.0, presence=0.0, frequency=0.0, counts=OUTPUT_COUNTS, prompt=PROMPT_MASK):
    def row(value):
        return jnp.array([value], jnp.float32)

    return np.asarray(apply_penalties(PENALTY_LOGITS, counts, prompt, row(repetition), row(presence), row(frequency)))


def test_repetition_penalty():
    # Seen tokens 0, 1 (prompt), 2: positive logits divided, negative multiplied; unseen 3, 4 untouched.
    np.testing.assert_allclose(_penalise(repetition=2.0), [[1.0, -2.0, 0.25, 3.0, -2.0]], rtol=1e-6)
    np.testing.assert_allclose(_penalise(repetition=2.0, prompt=None), [[1.0, -1.0, 0.25, 3.0, -2.0]], rtol=1e-6)


def test_presence_and_frequency_penalties_use_output_only():
    np.testing.assert_allclose(_penalise(presence=0.5), [[1.5, -1.0, 0.0, 3.0, -2.0]], rtol=1e-6)
    np.testing.assert_allclose(_penalise(frequency=0.1), [[1.8, -1.0, 0.4, 3.0, -2.0]], rtol=1e-6)
    np.testing.assert_allclose(_penalise(presence=-1.0), [[3.0, -1.0, 1.5, 3.0, -2.0]], rtol=1e-6)


def test_penalties_combined_and_neutral():
    combined = _penalise(repetition=2.0, presence=0.5, frequency=0.1)
    np.testing.assert_allclose(combined, [[0.3, -2.0, -0.35, 3.0, -2.0]], rtol=1e-6)
    np.testing.assert_array_equal(_penalise(), PENALTY_LOGITS)
    np.testing.assert_array_equal(_penalise(repetition=2.0, counts=None, prompt=None), PENALTY_LOGITS)


def test_penalties_are_per_row():
    logits = jnp.tile(PENALTY_LOGITS, (2, 1))
    out = apply_penalties(
        logits,
        jnp.tile(OUTPUT_COUNTS, (2, 1)),
        jnp.tile(PROMPT_MASK, (2, 1)),
        jnp.array([2.0, 1.0]),
        jnp.array([0.0, 0.5]),
        jnp.array([0.0, 0.0]),
    )
    np.testing.assert_allclose(out, [[1.0, -2.0, 0.25, 3.0, -2.0], [1.5, -1.0, 0.0, 3.0, -2.0]], rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Logprobs and jit
# ---------------------------------------------------------------------------------------------------------------


def test_logprobs_are_of_raw_logits():
    vocab = 50
    logits = jax.random.normal(jax.random.key(9), (4, vocab)) * 2
    params = [
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(temperature=0.6, top_k=5, repetition_penalty=1.3, seed=1, logprobs=0),
        SamplingParams(top_p=0.5, presence_penalty=1.0, seed=2, logprobs=2),
        SamplingParams(temperature=1.5, min_p=0.1, frequency_penalty=0.7, seed=3),
    ]
    counts = counts_from_tokens(jnp.array([[1, 2, 3]] * 4), jnp.array([3] * 4), vocab)
    result = sample_jit(logits, make_batch(params), zero_steps(4), counts, counts > 0, num_logprobs=5)
    assert isinstance(result, SampleResult)
    raw = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    tokens = np.asarray(result.tokens)
    np.testing.assert_allclose(result.logprobs, raw[np.arange(4), tokens], rtol=1e-6, atol=1e-6)
    assert result.top_logprobs.shape == (4, 5) and result.top_ids.shape == (4, 5)
    assert result.tokens.dtype == jnp.int32 and result.top_ids.dtype == jnp.int32
    top = np.asarray(result.top_logprobs)
    assert np.all(np.diff(top, axis=-1) <= 0)
    np.testing.assert_allclose(top, -np.sort(-raw, axis=-1)[:, :5], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(raw, np.asarray(result.top_ids), axis=-1), top, rtol=1e-6)

    none = sample_jit(logits, make_batch(params), zero_steps(4), num_logprobs=0)
    assert none.top_logprobs.shape == (4, 0) and none.top_ids.shape == (4, 0)
    # Without top logprobs the sampled token's logprob comes from token_log_softmax (no (B, V) log_softmax).
    np.testing.assert_allclose(none.logprobs, raw[np.arange(4), np.asarray(none.tokens)], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="num_logprobs"):
        sample(logits, make_batch(params), zero_steps(4), num_logprobs=21)


def test_bfloat16_logits_are_accepted():
    logits = jax.random.normal(jax.random.key(4), (2, 32)).astype(jnp.bfloat16)
    batch = make_batch([SamplingParams(temperature=0.0), SamplingParams(seed=1, top_k=3)])
    result = sample_jit(logits, batch, zero_steps(2), num_logprobs=1)
    assert result.logprobs.dtype == jnp.float32
    assert int(result.tokens[0]) == int(jnp.argmax(logits[0].astype(jnp.float32)))


def test_new_parameter_values_do_not_recompile():
    traces = []

    @functools.partial(jax.jit, static_argnames=("num_logprobs",))
    def step(logits, batch, steps, output_counts, prompt_mask, num_logprobs):
        traces.append(1)  # runs only while tracing
        return sample(logits, batch, steps, output_counts, prompt_mask, num_logprobs)

    vocab, batch_size = 32, 4
    logits = jax.random.normal(jax.random.key(5), (batch_size, vocab))
    counts = jnp.zeros((batch_size, vocab), jnp.int32)
    prompt = jnp.zeros((batch_size, vocab), bool)
    parameter_sets = [
        [SamplingParams(temperature=0.0)],
        [SamplingParams(seed=1), SamplingParams(temperature=0.3, top_k=5)],
        [SamplingParams(top_p=0.2, min_p=0.5, repetition_penalty=1.2, presence_penalty=-1.0, seed=9)] * 4,
        [SamplingParams(temperature=0.0), SamplingParams(frequency_penalty=2.0, top_k=-1)],
    ]
    for i, params in enumerate(parameter_sets):
        steps = jnp.full((batch_size,), i, jnp.int32)
        step(logits, make_batch(params, batch_size), steps, counts, prompt, num_logprobs=3)
        counts = update_counts(counts, jnp.zeros((batch_size,), jnp.int32))
    assert len(traces) == 1
    assert step._cache_size() == 1


@pytest.fixture(params=["jnp.max", "reduce_max_or_nan"])
def row_max_kind(request, monkeypatch):
    """The sampler's row max both ways: jnp.max (several devices, accelerators) and, on a one-device CPU, its own
    NaN-propagating reduction (these tests run with 8 simulated devices: pretend there is one)."""
    if request.param == "reduce_max_or_nan":
        if jax.default_backend() != "cpu":
            pytest.skip("the CPU's reduction")
        monkeypatch.setattr(jax, "device_count", lambda *a: 1)
    return request.param


def test_reduce_max_or_nan_is_max():
    from gemma4_jax.serving.sampling import reduce_max_or_nan

    x = jax.random.normal(jax.random.key(4), (7, 300), jnp.float32)
    x = x.at[0, 0].set(jnp.nan).at[1, 299].set(jnp.nan).at[2, 150].set(jnp.nan)  # first, last, middle
    x = x.at[3].set(-jnp.inf).at[4, 7].set(jnp.inf).at[5].set(0.0).at[5, 9].set(-0.0)
    got = jax.jit(reduce_max_or_nan)(x)
    assert got.shape == (7, 1)
    np.testing.assert_array_equal(got, jnp.max(x, axis=-1, keepdims=True))
    assert np.isnan(np.asarray(got[:3])).all()


def test_first_argmax_is_argmax_with_ties_infinities_and_nans(row_max_kind):
    """The sampler's greedy pick (two plain reductions instead of argmax's paired one, which XLA:CPU runs as
    scalar code) returns what jnp.argmax returns: the first maximum, the first NaN of a row that has one."""
    x = jax.random.normal(jax.random.key(3), (8, 1000), jnp.float32)
    x = x.at[0, [5, 700]].set(9.0)  # a tie: the first one
    x = x.at[1, [30, 31]].set(jnp.inf)
    x = x.at[2, [400, 12]].set(jnp.nan)  # NaN wins, the first one
    x = x.at[3].set(-jnp.inf)  # all -inf: index 0
    x = x.at[4, 999].set(50.0)  # the last index
    x = x.at[5].set(0.0)
    got = jax.jit(first_argmax)(x)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, jnp.argmax(x, axis=-1))
    np.testing.assert_array_equal(got[:6], [5, 30, 12, 0, 999, 0])


def test_token_log_softmax_is_log_softmax_at_the_token(row_max_kind):
    logits = jax.random.normal(jax.random.key(5), (5, 300), jnp.float32) * 4
    tokens = jnp.asarray([0, 299, 17, 150, 3], jnp.int32)
    want = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    np.testing.assert_array_equal(jax.jit(token_log_softmax)(logits, tokens), want)


def _sample_both_ways(monkeypatch, logits, batch, output_counts=None, prompt_mask=None, num_logprobs=0):
    """`sample` in jit on a pretended one-device CPU with the CPU custom call for its row reductions (kernel) and
    without it (XLA's passes), each traced afresh; returns (kernel, xla) results and whether each program calls the
    kernel."""
    from gemma4_jax.serving import sampling

    monkeypatch.setattr(jax, "device_count", lambda *a: 1)
    steps = zero_steps(logits.shape[0])
    results, calls = [], []
    for use_kernel in (True, False):
        if not use_kernel:
            monkeypatch.setattr(sampling, "cpu_logits_stats_available", lambda: False)
        step = jax.jit(lambda *args: sample(*args, num_logprobs=num_logprobs))  # a new function: a new trace
        args = (logits, batch, steps, output_counts, prompt_mask)
        calls.append("gemma4_cpu_logits_stats" in step.lower(*args).as_text())
        results.append(step(*args))
    return results, calls


def _kernel_or_skip():
    from gemma4_jax.kernels import cpu_sampler

    if jax.default_backend() != "cpu" or cpu_sampler.load() is not None:
        pytest.skip(f"the CPU sampler kernel: {cpu_sampler.load()}")


@pytest.mark.parametrize("rows", ["greedy", "sampled", "mixed"])
@pytest.mark.parametrize("num_logprobs", [0, 3])
def test_cpu_row_reductions_give_the_same_tokens_and_logprobs(monkeypatch, rows, num_logprobs):
    """On a one-device CPU, unprocessed logits take their greedy argmax and token logprob from the CPU custom call
    (kernels/cpu_sampler): the same tokens as XLA's passes, bit for bit, and logprobs within 1e-6, over rows with
    ties, a NaN, all -inf, +inf and -inf entries (V not a multiple of 16)."""
    _kernel_or_skip()
    b, v = 12, 1000
    logits = jax.random.normal(jax.random.key(7), (b, v), jnp.float32) * 3
    logits = logits.at[0, [17, 900]].set(20.0)  # a tie: the first
    logits = logits.at[1, [500, 40]].set(jnp.nan)  # NaN: the first one, logprob NaN
    logits = logits.at[2].set(-jnp.inf)  # all -inf: token 0, logprob NaN
    logits = logits.at[3, [3, 998]].set(jnp.inf)  # +inf: its first index, logprob NaN
    logits = logits.at[4, ::3].set(-jnp.inf)  # -inf entries beside finite ones
    logits = logits.at[5, 999].set(30.0)  # the last index
    temperatures = {"greedy": [0.0] * b, "sampled": [1.0] * b, "mixed": [0.0, 1.0] * (b // 2)}[rows]
    params = [SamplingParams(temperature=t, seed=100 + i) for i, t in enumerate(temperatures)]
    (kernel, xla), calls = _sample_both_ways(monkeypatch, logits, make_batch(params), num_logprobs=num_logprobs)
    assert calls == [True, False]
    np.testing.assert_array_equal(kernel.tokens, xla.tokens)
    np.testing.assert_array_equal(np.isnan(kernel.logprobs), np.isnan(xla.logprobs))
    np.testing.assert_allclose(kernel.logprobs, xla.logprobs, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(kernel.top_ids, xla.top_ids)
    np.testing.assert_array_equal(kernel.top_logprobs, xla.top_logprobs)
    greedy = np.asarray(temperatures) == 0.0
    np.testing.assert_array_equal(np.asarray(kernel.tokens)[greedy], np.asarray(jnp.argmax(logits, -1))[greedy])
    if rows == "greedy":
        np.testing.assert_array_equal(np.asarray(kernel.tokens)[:6], [17, 40, 0, 3, np.argmax(logits[4]), 999])
    finite = np.isfinite(np.asarray(kernel.logprobs))
    want = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, -1)), np.asarray(kernel.tokens)[:, None], -1)
    np.testing.assert_allclose(np.asarray(kernel.logprobs)[finite], want[finite, 0], rtol=1e-6, atol=1e-6)


def test_cpu_row_reductions_only_for_unprocessed_logits(monkeypatch):
    """Penalties or a token mask change the logits the greedy pick sees: those steps keep XLA's path (and the same
    tokens as before); unprocessed logits on several devices too (they may be sharded)."""
    _kernel_or_skip()
    from gemma4_jax.serving.sampling import cpu_logits_stats_available

    b, v = 4, 64
    logits = jax.random.normal(jax.random.key(8), (b, v), jnp.float32)
    batch = make_batch([SamplingParams(temperature=0.0, repetition_penalty=1.5)] * b)
    counts = counts_from_tokens(jnp.argmax(logits, -1)[:, None], jnp.ones((b,), jnp.int32), v)
    (kernel, xla), calls = _sample_both_ways(monkeypatch, logits, batch, output_counts=counts)
    assert calls == [False, False]
    np.testing.assert_array_equal(kernel.tokens, xla.tokens)
    masked = dataclasses.replace(make_batch([SamplingParams(temperature=0.0)] * b),
                                 token_mask=jnp.full((b, v // 32), 0x0F0F0F0F, jnp.int32))
    _, calls = _sample_both_ways(monkeypatch, logits, masked)
    assert calls == [False, False]
    monkeypatch.setattr(jax, "device_count", lambda *a: 2)
    assert not cpu_logits_stats_available()
