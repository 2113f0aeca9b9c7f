"""The jitted step: one pure function of (params, KV pools, batch) -> (sampled tokens, updated pools).

Prefill chunks and decode steps are the same function at different static shapes (B rows x T tokens, P pages of
context): the engine pads both to buckets, so steady state never recompiles. The pools (and the penalty counts)
are donated: XLA updates them in place. Sampling runs inside the step so only (B,) tokens leave the device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from gemma4_jax.serving.kv_cache import CacheLayout, PagedKVStore, StepBatch
from gemma4_jax.serving.sampling import SampleResult, SamplingBatch, sample


def _step(graphdef, state, cache, counts, batch, sampling, steps, sample_rows, layout, num_logprobs):
    model = nnx.merge(graphdef, state)
    store = PagedKVStore(cache, batch, layout)
    x, ple = model.embed(batch.tokens)
    h = model.decode_layers(x, batch.positions, ple, kv_store=store, keep_index=batch.last_index)
    logits = model.head(h[:, 0])  # (B, V): only each row's last token reaches the KV-shared layers and the head
    output_counts = prompt_mask = None
    if counts is not None:
        output_counts, prompt_mask = counts["output"][batch.slots], counts["prompt"][batch.slots]
    result = sample(logits, sampling, steps, output_counts, prompt_mask, num_logprobs=num_logprobs)
    if counts is not None:
        counts = dict(counts)
        counts["output"] = counts["output"].at[batch.slots, result.tokens].add(sample_rows.astype(jnp.int32))
    return result, store.cache, counts


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "layout", "num_logprobs"),
    donate_argnames=("cache", "counts"),
)
def model_step(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    cache: dict[str, jax.Array],
    counts: dict[str, jax.Array] | None,
    batch: StepBatch,
    sampling: SamplingBatch,
    steps: jax.Array,
    sample_rows: jax.Array,
    *,
    layout: CacheLayout,
    num_logprobs: int,
) -> tuple[SampleResult, dict[str, jax.Array], dict[str, jax.Array] | None]:
    """Run B rows of T tokens through the model against the pools and sample one token per row.

    steps: (B,) tokens generated so far per row (the sampler's RNG counter); sample_rows: (B,) bool, rows whose
    sampled token is kept (a prefill chunk that does not end its prompt samples nothing useful).
    counts: None, or {"output": (S+1, V) int32, "prompt": (S+1, V) bool} per sequence slot, for penalties.
    """
    return _step(graphdef, state, cache, counts, batch, sampling, steps, sample_rows, layout, num_logprobs)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "layout", "num_logprobs", "num_steps"),
    donate_argnames=("cache", "counts"),
)
def decode_steps(graphdef, state, cache, counts, batch: StepBatch, sampling: SamplingBatch, steps: jax.Array,
                 *, layout: CacheLayout, num_logprobs: int, num_steps: int):
    """`num_steps` decode steps in one call (one host round-trip): each step feeds back the token it sampled.

    batch: a decode batch (T = 1) whose page tables already cover num_steps more tokens. Returns the SampleResult
    fields stacked as (num_steps, B, ...); the host discards tokens after a row's stop condition.
    """
    live = batch.positions[:, 0] >= 0

    def body(carry, _):
        cache, counts, batch, steps = carry
        result, cache, counts = _step(graphdef, state, cache, counts, batch, sampling, steps, live, layout,
                                      num_logprobs)
        batch = batch.replace(
            tokens=result.tokens[:, None].astype(jnp.int32),
            positions=jnp.where(live[:, None], batch.positions + 1, -1),
            context_lens=jnp.where(live, batch.context_lens + 1, 0),
        )
        return (cache, counts, batch, steps + 1), result

    (cache, counts, _, _), results = jax.lax.scan(body, (cache, counts, batch, steps), None, length=num_steps)
    return results, cache, counts


@functools.partial(jax.jit, donate_argnames=("counts",))
def reset_slot_counts(counts, slot, prompt_tokens, prompt_len, output_tokens, output_len):
    """Rebuild one slot's penalty state from its history. prompt_tokens (Lp,), output_tokens (Lo,), padded."""
    vocab = counts["output"].shape[1]
    p_valid = jnp.arange(prompt_tokens.shape[0]) < prompt_len
    o_valid = jnp.arange(output_tokens.shape[0]) < output_len
    prompt_row = jnp.zeros((vocab,), bool).at[prompt_tokens].max(p_valid)
    output_row = jnp.zeros((vocab,), jnp.int32).at[output_tokens].add(o_valid.astype(jnp.int32))
    return {"output": counts["output"].at[slot].set(output_row), "prompt": counts["prompt"].at[slot].set(prompt_row)}
