"""Batched, per-request token sampling for the serving engine.

Every row of a decode batch is a different request with its own parameters. The user-facing `SamplingParams`
(vLLM names and defaults) are turned into a `SamplingBatch` of per-row arrays, so one compiled `sample` serves
any mix of parameters: changing a temperature or a seed never recompiles. The batch size is a padded bucket; the
padding rows are greedy and their tokens are ignored by the caller.

Processing order (as vLLM): penalties -> temperature -> top-k -> top-p -> min-p -> inverse-CDF sampling. Greedy rows
take the exact argmax of the penalised logits. Returned logprobs are those of the raw model logits (vLLM's default
`raw_logprobs`), not of the processed distribution. On a one-device CPU, a step without penalties or masks takes the
row max, the argmax and the log normaliser from one C++ custom call (kernels/cpu_sampler) instead of XLA's passes.

Randomness is per request: a request owns a PRNG key (`request_key`, from its seed or from a host RNG) and step `i`
of its generation uses `fold_in(key, i)`. A seeded request therefore yields the same tokens whatever its batch
mates, its row index or the bucket size.

Token history for the penalties lives outside the model as two (B, V) arrays per batch: `output_counts` (how many
times each token was generated) and `prompt_mask` (which tokens the prompt holds); `update_counts` advances the
first inside the jitted step.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from gemma4_jax.kernels import cpu_sampler
from gemma4_jax.kernels.cpu_sampler.reference import first_max_index, reduce_max_or_nan, sum_exp
from gemma4_jax.serving.structured import StructuredOutputs

MAX_LOGPROBS = 20
# vLLM's threshold: below it a temperature is treated as greedy, which also keeps `logits / temperature` finite.
GREEDY_TEMPERATURE_EPS = 1e-5
# Raw key data layout is tied to the PRNG implementation; pinning it keeps `rng_keys` (B, 2) uint32 whatever
# `jax_default_prng_impl` says.
_PRNG_IMPL = "threefry2x32"
_UINT32_MASK = 0xFFFFFFFF
# Keys of unseeded requests; seeded from OS entropy, so two servers never share a stream.
_HOST_RNG = np.random.default_rng()


# --------------------------------------------------------------------------------------------------------------
# Declarations
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling parameters, with vLLM's names and defaults.

    `temperature == 0` (in fact any value below `GREEDY_TEMPERATURE_EPS`) is greedy. `top_k` 0 or -1 is off.
    `logprobs` is how many top logprobs to return per generated token (0: only the sampled token's). `stop` is
    normalised to a tuple of strings and `stop_token_ids` to a tuple of ints, so instances stay hashable. Invalid
    values raise `ValueError` naming the field and the value.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    n: int = 1
    skip_special_tokens: bool = True
    # MoE models: return, per generated token, the top-k expert ids the router chose in every MoE layer
    # (RequestOutput.routed_experts, (num_generated, L_moe, k)), as vLLM's and SGLang's "return routed experts".
    return_routed_experts: bool = False
    # A constraint on the output (JSON schema, JSON object, regex, choice, grammar): structured.py. A dict of its
    # fields is accepted (vLLM's `structured_outputs`).
    structured_outputs: StructuredOutputs | dict | None = None

    def __post_init__(self):
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, list | tuple):
            stop = tuple(stop)
        object.__setattr__(self, "stop", stop)
        stop_token_ids = self.stop_token_ids
        if stop_token_ids is None:
            stop_token_ids = ()
        elif isinstance(stop_token_ids, list | tuple):
            stop_token_ids = tuple(stop_token_ids)
        object.__setattr__(self, "stop_token_ids", stop_token_ids)
        object.__setattr__(self, "structured_outputs", StructuredOutputs.from_value(self.structured_outputs))
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` ("<field> must be ..., got <value>") on the first invalid field."""
        # Upper bounds keep every value representable in the float32/int32 arrays of the jitted sampler.
        _check_real("temperature", self.temperature, lambda t: 0 <= t <= 1e4, "a number in [0, 1e4]")
        _check_real("top_p", self.top_p, lambda p: 0 < p <= 1, "in (0, 1]")
        _check_int("top_k", self.top_k, "an int in [-1, 2**31 - 1] (0 or -1: off)", minimum=-1, maximum=2**31 - 1)
        _check_real("min_p", self.min_p, lambda p: 0 <= p <= 1, "in [0, 1]")
        _check_real("repetition_penalty", self.repetition_penalty, lambda p: 0 < p <= 1e4, "a number in (0, 1e4]")
        _check_real("presence_penalty", self.presence_penalty, lambda p: -2 <= p <= 2, "in [-2, 2]")
        _check_real("frequency_penalty", self.frequency_penalty, lambda p: -2 <= p <= 2, "in [-2, 2]")
        _check_int("max_tokens", self.max_tokens, "an int in [1, 2**31 - 1]", minimum=1, maximum=2**31 - 1)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, f"None or an int in [0, {MAX_LOGPROBS}]", 0, MAX_LOGPROBS)
        _check_int("n", self.n, "an int >= 1", minimum=1)
        if self.seed is not None:
            _check_int("seed", self.seed, "None or an int in [-2**63, 2**64)", minimum=-(2**63), maximum=2**64 - 1)
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be None, a non-empty str or a list of non-empty str, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, tuple) or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be None or a list of ints >= 0, got {self.stop_token_ids!r}")
        for name in ("ignore_eos", "skip_special_tokens", "return_routed_experts"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(name: str, value, expected: str, minimum: int | None = None, maximum: int | None = None) -> None:
    if not _is_int(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _check_real(name: str, value, in_range: Callable[[float], bool], expected: str) -> None:
    if (
        not isinstance(value, numbers.Real)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not in_range(value)
    ):
        raise ValueError(f"{name} must be {expected}, got {value!r}")


@struct.dataclass
class SamplingBatch:
    """Per-row sampling parameters of one padded decode batch: the dynamic half of the sampler's jit boundary.

    All fields are (B,) except `rng_keys`, which is (B, 2) uint32 raw threefry key data (`request_key`).
    `top_k` 0 means off; padding rows are greedy with neutral penalties.
    """

    temperature: jax.Array  # (B,) float32
    top_p: jax.Array  # (B,) float32
    top_k: jax.Array  # (B,) int32
    min_p: jax.Array  # (B,) float32
    repetition_penalty: jax.Array  # (B,) float32
    presence_penalty: jax.Array  # (B,) float32
    frequency_penalty: jax.Array  # (B,) float32
    rng_keys: jax.Array  # (B, 2) uint32
    # Structured outputs: (B, ceil(V / 32)) int32 bitmask of the tokens each row may take (bit t % 32 of word
    # t // 32; all ones for unconstrained rows), or None when no row of the step is constrained. A verify step's
    # is (B, T, ceil(V / 32)): one mask per position, the grammar's after that position's drafts (`verify`).
    token_mask: jax.Array | None = None

    @classmethod
    def from_params(
        cls, params_list: Sequence[SamplingParams], keys: Sequence[np.ndarray] | np.ndarray, batch_size: int,
        token_mask: np.ndarray | None = None,
    ) -> SamplingBatch:
        """Stack per-request params and keys ((R, 2) uint32, one per request) into a batch padded to `batch_size`.
        token_mask: (batch_size, W) int32 allowed-token bitmask (structured.Grammars.fill), (batch_size, T, W) for
        a verify step (structured.Grammars.fill_drafts), or None.

        Returns host (numpy) arrays: they travel to the device with the rest of the step's inputs in one transfer.
        """
        num_requests = len(params_list)
        if num_requests > batch_size:
            raise ValueError(f"{num_requests} requests do not fit in a batch of {batch_size}")
        keys = np.asarray(keys, dtype=np.uint32).reshape(-1, 2) if num_requests else np.zeros((0, 2), np.uint32)
        if keys.shape[0] != num_requests:
            raise ValueError(f"got {keys.shape[0]} rng keys for {num_requests} requests")

        def column(values, neutral, dtype):
            out = np.full((batch_size,), neutral, dtype)
            out[:num_requests] = values
            return out

        rng_keys = np.zeros((batch_size, 2), np.uint32)
        rng_keys[:num_requests] = keys
        return cls(
            temperature=column([p.temperature for p in params_list], 0.0, np.float32),
            top_p=column([p.top_p for p in params_list], 1.0, np.float32),
            top_k=column([max(p.top_k, 0) for p in params_list], 0, np.int32),
            min_p=column([p.min_p for p in params_list], 0.0, np.float32),
            repetition_penalty=column([p.repetition_penalty for p in params_list], 1.0, np.float32),
            presence_penalty=column([p.presence_penalty for p in params_list], 0.0, np.float32),
            frequency_penalty=column([p.frequency_penalty for p in params_list], 0.0, np.float32),
            rng_keys=rng_keys,
            token_mask=token_mask,
        )


class SampleResult(NamedTuple):
    """Output of `sample` for a batch of B rows, returning `num_logprobs` top logprobs per row."""

    tokens: jax.Array  # (B,) int32
    logprobs: jax.Array  # (B,) float32, log_softmax(raw logits)[token]
    top_logprobs: jax.Array  # (B, num_logprobs) float32, descending
    top_ids: jax.Array  # (B, num_logprobs) int32
    # Router top-k ids of the sampled row's input token, one (B, L_s, k) int32 array per pipeline stage (one
    # stage: a 1-tuple); None when the step does not collect them (dense model, or turned off).
    routed: tuple | None = None


# --------------------------------------------------------------------------------------------------------------
# Keys and token history
# --------------------------------------------------------------------------------------------------------------


def request_key(seed: int | None) -> np.ndarray:
    """Raw key data (2,) uint32 of a request's PRNG key.

    With a seed: the data of `jax.random.key(seed)` as JAX computes it with 64-bit seeds ([seed >> 32, seed & mask]).
    It is computed on the host (no device round trip per request) and equals JAX's for 0 <= seed < 2**32; wider or
    negative seeds keep all 64 bits where JAX without x64 would truncate them to 32 and make them collide.
    Without a seed: 64 fresh bits from a host RNG.
    """
    if seed is None:
        return _HOST_RNG.integers(0, 2**32, size=(2,), dtype=np.uint32)
    seed = int(seed) % 2**64
    return np.array([(seed >> 32) & _UINT32_MASK, seed & _UINT32_MASK], dtype=np.uint32)


def counts_from_tokens(tokens: jax.Array, lengths: jax.Array, vocab_size: int) -> jax.Array:
    """Per-row token counts (B, V) int32 of `tokens` (B, L) int, of which only the first `lengths` (B,) count."""
    batch, max_len = tokens.shape
    valid = jnp.arange(max_len)[None, :] < jnp.asarray(lengths)[:, None]  # (B, L)
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], (batch, max_len))
    # Padding positions may hold any id; clip so the scatter stays in range, they add 0 anyway.
    ids = jnp.clip(jnp.asarray(tokens), 0, vocab_size - 1)
    return jnp.zeros((batch, vocab_size), jnp.int32).at[rows, ids].add(valid.astype(jnp.int32))


def prompt_mask_from_tokens(tokens: jax.Array, lengths: jax.Array, vocab_size: int) -> jax.Array:
    """(B, V) bool: which tokens occur in the first `lengths` (B,) entries of each row of `tokens` (B, L)."""
    return counts_from_tokens(tokens, lengths, vocab_size) > 0


def update_counts(output_counts: jax.Array, new_tokens: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Add one generated token per row. output_counts: (B, V) int32; new_tokens: (B,) int; valid: (B,) bool or None.

    Rows with `valid == False` (padding, finished requests) are left unchanged. Jittable; donate `output_counts`.
    """
    increment = jnp.ones(new_tokens.shape, jnp.int32) if valid is None else valid.astype(jnp.int32)
    rows = jnp.arange(output_counts.shape[0])
    return output_counts.at[rows, new_tokens].add(increment)


# --------------------------------------------------------------------------------------------------------------
# Logits processing
# --------------------------------------------------------------------------------------------------------------


def apply_penalties(
    logits: jax.Array,
    output_counts: jax.Array | None,
    prompt_mask: jax.Array | None,
    repetition_penalty: jax.Array,
    presence_penalty: jax.Array,
    frequency_penalty: jax.Array,
) -> jax.Array:
    """Repetition, frequency and presence penalties (vLLM semantics) -> (B, V) float32.

    logits: (B, V); output_counts: (B, V) int32 or None (no output yet); prompt_mask: (B, V) bool or None;
    penalties: (B,). Repetition divides positive / multiplies negative logits of tokens seen in prompt or output;
    frequency subtracts count * penalty and presence subtracts the penalty once, for output tokens only.
    """
    logits = logits.astype(jnp.float32)
    if output_counts is None and prompt_mask is None:
        return logits
    seen = jnp.zeros(logits.shape, bool)
    if prompt_mask is not None:
        seen |= prompt_mask
    if output_counts is not None:
        seen |= output_counts > 0
    rep = repetition_penalty.astype(jnp.float32)[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    if output_counts is not None:
        counts = output_counts.astype(jnp.float32)
        logits -= frequency_penalty.astype(jnp.float32)[:, None] * counts
        logits -= presence_penalty.astype(jnp.float32)[:, None] * (counts > 0)
    return logits


def truncation_threshold(logits: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array) -> jax.Array:
    """Per-row logit threshold (B,) implementing top-k, then top-p, then min-p; tokens below it are dropped.

    logits: (B, V) float32, already temperature-scaled; top_k (B,) int (<= 0 or >= V: off); top_p (B,) in (0, 1];
    min_p (B,) in [0, 1]. Top-p keeps the smallest prefix of the top-k-renormalised, descending distribution whose
    mass reaches `top_p`. Thresholds rather than index masks: tokens tied with the last kept one are kept too, and
    one sort per step serves both top-k and top-p. The argmax always survives.
    """
    vocab = logits.shape[-1]
    top_k = jnp.where((top_k <= 0) | (top_k >= vocab), vocab, top_k).astype(jnp.int32)
    top_p = top_p.astype(jnp.float32)

    def sorted_cut(logits):
        sorted_desc = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)  # (B, V)
        positions = jnp.arange(vocab, dtype=jnp.int32)[None, :]
        kth = jnp.take_along_axis(sorted_desc, top_k[:, None] - 1, axis=-1)[:, 0]
        in_top_k = jnp.where(positions < top_k[:, None], sorted_desc, -jnp.inf)
        probs = jax.nn.softmax(in_top_k, axis=-1)
        # Mass strictly before each position; keeping every position whose preceding mass is < top_p is exactly
        # the smallest nucleus. A float cumsum of non-negative terms is non-decreasing, so counting is safe.
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        num_kept = jnp.clip(jnp.sum(mass_before < top_p[:, None], axis=-1), 1, top_k)
        nucleus = jnp.take_along_axis(in_top_k, num_kept[:, None] - 1, axis=-1)[:, 0]
        # top_p == 1 must keep everything, even where the float cumsum saturates before the tail.
        nucleus = jnp.where(top_p >= 1.0, -jnp.inf, nucleus)
        return jnp.maximum(kth, nucleus)

    # The sort dominates the sampler's cost; skip it when no row asks for top-k or top-p (the default parameters).
    needs_sort = jnp.any((top_k < vocab) | (top_p < 1.0))
    cut = jax.lax.cond(needs_sort, sorted_cut, lambda x: jnp.full(x.shape[:1], -jnp.inf, jnp.float32), logits)
    # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p): independent of normalisation and of the
    # top-k/top-p cut (which never removes the max). log(0) = -inf switches it off.
    min_p_cut = jnp.max(logits, axis=-1) + jnp.log(min_p.astype(jnp.float32))
    return jnp.maximum(cut, min_p_cut)


def truncate_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array) -> jax.Array:
    """Logits (B, V) float32 with the tokens dropped by top-k / top-p / min-p set to -inf.

    Arguments as `truncation_threshold`.
    """
    threshold = truncation_threshold(logits, top_k, top_p, min_p)
    return jnp.where(logits >= threshold[:, None], logits, -jnp.inf)


_CDF_BLOCK = 128


def inverse_cdf(probs: jax.Array, u: jax.Array) -> jax.Array:
    """The first token whose cumulative probability reaches u x total, per row. probs: (B, V) >= 0; u: (B,) in
    (0, 1] -> (B,) int32. A token of zero probability is never returned (the cumulative sum is flat across it).

    In two levels: the block of 128 tokens whose cumulative mass reaches the target, then the token inside it, so
    the only cumulative sums are over (B, V / 128) block masses and one (B, 128) block: XLA:CPU's cumsum over a
    whole (64, 32768) row set costs ~8 ms, this ~0.4 ms. The draw inside the block uses the block's own sums
    (the target's share of the block, in (0, 1]), so rounding between the two levels never moves it out of the block
    or onto a zero-probability token."""
    b, v = probs.shape
    nb = -(-v // _CDF_BLOCK)
    blocks = jnp.pad(probs, ((0, 0), (0, nb * _CDF_BLOCK - v))).reshape(b, nb, _CDF_BLOCK)
    mass = blocks.sum(-1)  # (B, nb)
    cmass = jnp.cumsum(mass, axis=-1)
    target = u * cmass[:, -1]
    blk = jnp.minimum(jnp.sum(cmass < target[:, None], axis=-1), nb - 1)
    inner = jnp.take_along_axis(blocks, blk[:, None, None], axis=1)[:, 0]  # (B, 128)
    own = jnp.take_along_axis(mass, blk[:, None], axis=1)[:, 0]
    before = jnp.take_along_axis(cmass, blk[:, None], axis=1)[:, 0] - own
    share = jnp.clip((target - before) / jnp.where(own > 0, own, 1.0), 1e-30, 1.0)
    inner_cdf = jnp.cumsum(inner, axis=-1)
    pos = jnp.minimum(jnp.sum(inner_cdf < (share * inner_cdf[:, -1])[:, None], axis=-1), _CDF_BLOCK - 1)
    return jnp.minimum(blk * _CDF_BLOCK + pos, v - 1).astype(jnp.int32)


def allowed_tokens(bitmask: jax.Array, vocab_size: int) -> jax.Array:
    """(B, W) int32 bitmask (bit t % 32 of word t // 32) -> (B, V) bool."""
    # Every word's 32 bits by a broadcast shift (XLA:CPU: ~0.5 ms at 64 x 32768; a gather of each token's word
    # took ~20 ms), then the vocabulary's first V of the W x 32 bits.
    bits = (bitmask[..., None] >> jnp.arange(32, dtype=bitmask.dtype)) & 1  # (B, W, 32)
    return bits.reshape(*bitmask.shape[:-1], -1)[..., :vocab_size].astype(bool)


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------


def row_max(x: jax.Array) -> jax.Array:
    """jnp.max(x, axis=-1, keepdims=True) for float x (NaN where a row holds one). On a one-device CPU it is
    `reduce_max_or_nan`, a reduction XLA does not hand to YNNPACK: there a row max over (64, 32768) logits became a
    fusion writing its broadcast back as a (64, 32768) array, ~3 ms per use in a ~40 ms batch-64 decode step
    (docs/benchmarks.md, "Packed products"). With several devices the logits may be sharded, and XLA's SPMD
    partitioner only splits reductions it recognises, so those keep jnp.max."""
    if jax.default_backend() != "cpu" or jax.device_count() > 1:
        return jnp.max(x, axis=-1, keepdims=True)
    return reduce_max_or_nan(x)


def first_argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax(x, axis=-1) as int32 (the first maximum; the first NaN where a row has one), as two plain
    reductions: the row's max, then the smallest index holding it. XLA:CPU runs argmax's paired (value, index)
    reduction as scalar code: over a (64, 32768) logits block 4.3 ms against 1.5 ms for the two reductions (in a
    ~52 ms batch-64 bench-100m bfloat16 decode step, argmax and the (B, V) log_softmax took 5.6 ms of thread time,
    these two and `token_log_softmax` 3.3). `sample` takes the same answer from the CPU custom call where it can
    (`cpu_logits_stats_available`)."""
    return first_max_index(x, row_max(x))  # the max is NaN where the row holds one (max propagates it)


def _token_logprob(logits: jax.Array, tokens: jax.Array, top: jax.Array, total: jax.Array) -> jax.Array:
    """log_softmax(logits)[b, tokens[b]] from the row max top (B, 1) and total (B,) = sum(exp(logits - top)): the
    same operations as jax.nn.log_softmax on the one entry per row (shifted by the row max, minus the log of the
    summed exponentials)."""
    # The shift of the one picked entry (the same subtraction as in the (B, V) shift, which is then never written)
    picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1) - top
    return picked[:, 0] - jnp.log(total)


def token_log_softmax(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log_softmax(logits)[b, tokens[b]] for (B, V) float32 logits, without the (B, V) log_softmax."""
    top = jax.lax.stop_gradient(row_max(logits))
    return _token_logprob(logits, tokens, top, sum_exp(logits, top))


def cpu_logits_stats_available() -> bool:
    """Whether `sample` takes the row max, the greedy argmax and the log normaliser of unprocessed logits from the
    CPU custom call (kernels/cpu_sampler): a one-device CPU (`row_max`'s condition: sharded logits stay with XLA's
    partitioner) where the kernel is built (not with GEMMA4_JAX_CPU_KERNELS=0 or without a C++ compiler).

    Why: XLA:CPU runs `first_argmax` and `token_log_softmax` as several passes over the (B, V) logits (the row max
    twice, one of them a reduce-window, then the smallest index holding it, then the summed exponentials): ~1.8 ms
    of a ~30 ms batch-64 bfloat16 decode step at V = 32768. The custom call reads each row once, and once more from
    cache: jit(sample) on (64, 32768) greedy logits 1.1-1.3 ms against 3.9-7.0 ms, (1, 32768) 0.06-0.12 against
    0.09-0.15 ms (a 2-vCPU EPYC, docs/kernels.md "cpu_sampler")."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1 and cpu_sampler.load() is None


def sample(
    logits: jax.Array,
    batch: SamplingBatch,
    steps: jax.Array,
    output_counts: jax.Array | None = None,
    prompt_mask: jax.Array | None = None,
    num_logprobs: int = 0,
) -> SampleResult:
    """Sample one token per row. Pure and jittable with `num_logprobs` static.

    logits: (B, V) raw model logits (any float dtype; processed in float32); batch: per-row parameters;
    steps: (B,) int32, tokens each request has generated so far (folded into its key);
    output_counts: (B, V) int32 or None; prompt_mask: (B, V) bool or None (None skips that part of the penalties);
    num_logprobs: 0..20, the max `logprobs` over the batch.
    Returns SampleResult(tokens (B,), logprobs (B,), top_logprobs (B, num_logprobs), top_ids (B, num_logprobs)).
    """
    if not 0 <= num_logprobs <= MAX_LOGPROBS:
        raise ValueError(f"num_logprobs must be in [0, {MAX_LOGPROBS}], got {num_logprobs}")
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]

    with jax.named_scope("penalties"):
        penalised = apply_penalties(
            logits,
            output_counts,
            prompt_mask,
            batch.repetition_penalty,
            batch.presence_penalty,
            batch.frequency_penalty,
        )
    if batch.token_mask is not None:  # structured outputs: disallowed tokens can never be chosen
        penalised = jnp.where(allowed_tokens(batch.token_mask, vocab), penalised, -jnp.inf)
    # Unprocessed logits (penalised is logits): their row max, first argmax and summed exponentials from one custom
    # call on a one-device CPU (`cpu_logits_stats_available`); the greedy tokens and the token logprob below are
    # then the same numbers as `first_argmax` and `token_log_softmax` give.
    stats = None
    if output_counts is None and prompt_mask is None and batch.token_mask is None and cpu_logits_stats_available():
        stats = cpu_sampler.logits_stats(logits)
    greedy_tokens = first_argmax(penalised) if stats is None else stats.argmax
    is_greedy = batch.temperature < GREEDY_TEMPERATURE_EPS

    def random_tokens():
        temperature = jnp.where(is_greedy, 1.0, batch.temperature.astype(jnp.float32))
        scaled = penalised / temperature[:, None]
        # Greedy rows' truncation parameters are irrelevant; neutralise them so they cannot trigger the sort.
        top_k = jnp.where(is_greedy, 0, batch.top_k)
        top_p = jnp.where(is_greedy, 1.0, batch.top_p)
        with jax.named_scope("truncation"):
            scaled = truncate_logits(scaled, top_k, top_p, batch.min_p)
        with jax.named_scope("inverse_cdf"):
            keys = jax.random.wrap_key_data(batch.rng_keys, impl=_PRNG_IMPL)
            step_keys = jax.vmap(jax.random.fold_in)(keys, steps)
            # One uniform per row (from the row's key and step only, never its batch mates or row index), in
            # (0, 1], against the row's cumulative distribution (`inverse_cdf`): the first token whose cumulative
            # mass reaches u x total. Exact (up to float rounding of the sums) and V times fewer random numbers than
            # Gumbel-max noise over the vocabulary, which cost ~40 ms per 64-row step on a CPU (V 32768).
            # A token of zero probability (masked, truncated) is never chosen: the cumsum is flat across it.
            u = 1.0 - jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(step_keys)
            sampled = inverse_cdf(jax.nn.softmax(scaled, axis=-1), u)
        return jnp.where(is_greedy, greedy_tokens, sampled)

    tokens = jax.lax.cond(jnp.all(is_greedy), lambda: greedy_tokens, random_tokens)

    with jax.named_scope("logprobs"):
        if num_logprobs > 0:
            raw_logprobs = jax.nn.log_softmax(logits, axis=-1)
            token_logprobs = jnp.take_along_axis(raw_logprobs, tokens[:, None], axis=-1)[:, 0]
            top_logprobs, top_ids = jax.lax.top_k(raw_logprobs, num_logprobs)
        else:
            if stats is not None:
                token_logprobs = _token_logprob(logits, tokens, stats.row_max, stats.sum_exp)
            else:
                # After the tokens, not beside them: on XLA:CPU the row max shared by the greedy argmax and the log
                # normaliser, run as concurrent branches, took ~12 ms over (64, 32768) logits against ~2 ms in
                # order (docs/benchmarks.md). The barrier only orders; the numbers are the same.
                ordered_logits, ordered_tokens = jax.lax.optimization_barrier((logits, tokens))
                token_logprobs = token_log_softmax(ordered_logits, ordered_tokens)
            top_logprobs = jnp.zeros((logits.shape[0], 0), jnp.float32)
            top_ids = jnp.zeros((logits.shape[0], 0), jnp.int32)
    return SampleResult(tokens, token_logprobs, top_logprobs, top_ids.astype(jnp.int32))


# --------------------------------------------------------------------------------------------------------------
# Speculative verification
# --------------------------------------------------------------------------------------------------------------


class VerifyResult(NamedTuple):
    """Output of `verify` for B rows of T = 1 + k positions: `sample` holds SampleResult fields with a T axis
    (tokens (B, T), logprobs (B, T), top_logprobs / top_ids (B, T, n), routed per stage (B, T, L_s, k) or None);
    num_accepted (B,) int32: how many drafts of each row were accepted (a). Row b emits tokens[b, : a + 1]."""

    sample: SampleResult
    num_accepted: jax.Array


def verify(
    logits: jax.Array,
    batch: SamplingBatch,
    steps: jax.Array,
    drafts: jax.Array,
    num_drafts: jax.Array,
    output_counts: jax.Array | None = None,
    prompt_mask: jax.Array | None = None,
    num_logprobs: int = 0,
) -> VerifyResult:
    """Verify drafted tokens against the target's logits at every position of a row. Pure and jittable.

    logits: (B, T, V) target logits, position j predicting the token after [last, d_1 .. d_j];
    drafts: (B, T - 1) int32 drafted tokens d_1 .. d_{T-1} (padding beyond num_drafts (B,) is ignored);
    steps: (B,) tokens generated so far per row; output_counts (B, V) / prompt_mask (B, V): penalty state before
    this step (or None).

    Position j is sampled exactly as plain decoding would sample the token at that position if d_1 .. d_j were
    the tokens generated before it: its penalties count d_1 .. d_j as generated, its grammar mask is the one the
    row's grammar gives after d_1 .. d_j (batch.token_mask (B, T, W); a (B, W) mask applies to every position, so
    it suits only rows without drafts), and its randomness is `fold_in(key, steps + j)`, the key plain decoding
    uses for that token. A draft is accepted while it equals the token sampled at its position; the first
    position that disagrees (or the one after the last draft) contributes its sampled token and ends the row.

    Why this is exact rejection sampling: the drafts of every proposer here are deterministic given the context
    (p_draft one-hot), for which speculative sampling accepts d with probability p_target(d) and, on rejection,
    samples from norm(max(0, p_target - onehot(d))) = p_target restricted to tokens != d. One exact draw x from
    p_target (the sampler's inverse-CDF draw) does both at once: P(x = d) = p_target(d), and given x != d, x
    follows that residual. So every emitted token is the token plain decoding would sample with the same seed and
    context: the target's distribution is kept exactly, seeds reproduce, and greedy rows emit the plain argmax.
    """
    b, t, vocab = logits.shape
    flat = lambda a: jnp.repeat(a, t, axis=0)  # noqa: E731  (B, ...) -> (B * T, ...), position-major per row
    position = jnp.arange(t, dtype=jnp.int32)[None, :]  # (1, T)
    counts = None
    if output_counts is not None:
        is_draft = jnp.arange(t - 1)[None, :] < num_drafts[:, None]  # (B, T - 1)
        onehot = jax.nn.one_hot(drafts, vocab, dtype=jnp.int32) * is_draft[..., None].astype(jnp.int32)
        before = jnp.concatenate([jnp.zeros((b, 1, vocab), jnp.int32), jnp.cumsum(onehot, axis=1)], axis=1)
        counts = (output_counts[:, None, :] + before).reshape(b * t, vocab)  # (B * T, V)
    per_position = batch.token_mask is not None and batch.token_mask.ndim == 3
    rows = jax.tree.map(flat, batch.replace(token_mask=None) if per_position else batch)
    if per_position:  # (B, T, W) -> (B * T, W): position j of row b is row b * T + j, as the flattened logits
        rows = rows.replace(token_mask=batch.token_mask.reshape(b * t, -1))
    result = sample(
        logits.reshape(b * t, vocab),
        rows,
        (steps[:, None] + position).reshape(-1),
        counts,
        None if prompt_mask is None else flat(prompt_mask),
        num_logprobs=num_logprobs,
    )
    result = jax.tree.map(lambda a: a.reshape(b, t, *a.shape[1:]), result)
    agree = (result.tokens[:, :-1] == drafts) & (jnp.arange(t - 1)[None, :] < num_drafts[:, None])
    num_accepted = jnp.sum(jnp.cumprod(agree.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
    return VerifyResult(result, num_accepted)
