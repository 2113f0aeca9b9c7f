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
    model = nnx.merge(graphdef, state)
    store = PagedKVStore(cache, batch, layout)
    x, ple = model.embed(batch.tokens)
    h = model.decode_layers(x, batch.positions, ple, kv_store=store)
    rows = jnp.arange(h.shape[0])
    logits = model.head(h[rows, batch.last_index])  # (B, V): only the wanted position reaches the LM head
    output_counts = prompt_mask = None
    if counts is not None:
        output_counts, prompt_mask = counts["output"][batch.slots], counts["prompt"][batch.slots]
    result = sample(logits, sampling, steps, output_counts, prompt_mask, num_logprobs=num_logprobs)
    if counts is not None:
        counts = dict(counts)
        counts["output"] = counts["output"].at[batch.slots, result.tokens].add(sample_rows.astype(jnp.int32))
    return result, store.cache, counts


@functools.partial(jax.jit, donate_argnames=("counts",))
def reset_slot_counts(counts, slot, prompt_tokens, prompt_len, output_tokens, output_len):
    """Rebuild one slot's penalty state from its history. prompt_tokens (Lp,), output_tokens (Lo,), padded."""
    vocab = counts["output"].shape[1]
    p_valid = jnp.arange(prompt_tokens.shape[0]) < prompt_len
    o_valid = jnp.arange(output_tokens.shape[0]) < output_len
    prompt_row = jnp.zeros((vocab,), bool).at[prompt_tokens].max(p_valid)
    output_row = jnp.zeros((vocab,), jnp.int32).at[output_tokens].add(o_valid.astype(jnp.int32))
    return {"output": counts["output"].at[slot].set(output_row), "prompt": counts["prompt"].at[slot].set(prompt_row)}
