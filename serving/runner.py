"""The jitted step: one pure function of (params, KV pools, batch) -> (sampled tokens, updated pools).

Prefill chunks and decode steps are the same function at different static shapes (B rows x T tokens, P pages of
context): the engine pads both to buckets, so steady state never recompiles. The pools (and the penalty counts)
are donated: XLA updates them in place. Sampling runs inside the step so only (B,) tokens leave the device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma4_jax import sharding
from gemma4_jax.attention_backends import AttentionPlan
from gemma4_jax.forward import MediaTokens, TokenInputs, forward
from gemma4_jax.layers import model_jit
from gemma4_jax.model import FlatState, StaticGraph, merge
from gemma4_jax.serving import kv_cache
from gemma4_jax.serving.kv_cache import CacheLayout, PagedKVStore, StepBatch
from gemma4_jax.serving.sampling import SamplingBatch, VerifyResult, sample, verify
from gemma4_jax.serving.step_builder import DeferredMask


@dataclasses.dataclass(frozen=True)
class StepMedia:
    """Media of a prefill step: soft tokens for the chunk's placeholders (forward.MediaTokens: slots into the
    (B * T) tokens, (M, D)) and vision block ids (B, T) or None (serving/media_chunks.py builds it)."""

    tokens: MediaTokens
    vision_blocks: np.ndarray | None

    @property
    def shape_key(self) -> tuple:
        return (self.tokens.slots.shape[0], self.vision_blocks is not None)


def sample_step(logits, counts, batch, sampling, steps, sample_rows, num_logprobs):
    """Sample one token per row of logits (B, V) and advance the penalty counts. Shared with the pipeline's last
    stage (pipeline.py), which runs it on its own devices."""
    output_counts = prompt_mask = None
    if counts is not None:
        output_counts, prompt_mask = counts["output"][batch.slots], counts["prompt"][batch.slots]
    result = sample(logits, sampling, steps, output_counts, prompt_mask, num_logprobs=num_logprobs)
    if counts is not None:
        counts = dict(counts)
        counts["output"] = counts["output"].at[batch.slots, result.tokens].add(sample_rows.astype(jnp.int32))
    return result, counts


def _forward_last(graph, state, cache, batch, media, vision_blocks, layout, attention, phase, return_routed,
                  return_hidden):
    """The forward of a step against the pools, kept to each row's last token: (logits (B, V), routed (B, L_moe, k)
    or None, hidden (B, D) or None, cache)."""
    model = merge(graph, state)
    store = PagedKVStore(cache, batch, layout)
    inputs = TokenInputs(tokens=batch.tokens, positions=batch.positions, media=media, vision_blocks=vision_blocks)
    out = forward(model, inputs, attention=attention, phase=phase, kv_store=store, keep_index=batch.last_index,
                  return_routed=return_routed, return_hidden=return_hidden)
    # (B, V): only each row's last token reaches the KV-shared layers and the head. The router's choices for it
    # (B, L_moe, k); its final-normed state (B, D): the assistant drafter's next input.
    return (out.logits[:, 0], out.routed[:, 0] if return_routed else None,
            out.hidden[:, 0] if return_hidden else None, store.cache)


def _step(graph, state, cache, counts, batch, sampling, steps, sample_rows, media, vision_blocks, layout,
          attention, phase, num_logprobs, return_routed=False, return_hidden=False):
    logits, routed, hidden, cache = _forward_last(graph, state, cache, batch, media, vision_blocks, layout, attention,
                                                  phase, return_routed, return_hidden)
    result, counts = sample_step(logits, counts, batch, sampling, steps, sample_rows, num_logprobs)
    if return_routed:
        result = result._replace(routed=(routed,))
    if return_hidden:
        return result, cache, counts, hidden
    return result, cache, counts


@functools.partial(
    model_jit,
    static_argnames=("graph", "layout", "attention", "phase", "num_logprobs", "return_routed", "return_hidden"),
    donate_argnames=("cache", "counts"),
)
def model_step(
    graph: StaticGraph,
    state: nnx.State | FlatState,
    cache: dict[str, jax.Array],
    counts: dict[str, jax.Array] | None,
    batch: StepBatch,
    sampling: SamplingBatch,
    steps: jax.Array,
    sample_rows: jax.Array,
    media: MediaTokens | None = None,
    vision_blocks: jax.Array | None = None,
    *,
    layout: CacheLayout,
    attention: AttentionPlan,
    phase: str,
    num_logprobs: int,
    return_routed: bool = False,
    return_hidden: bool = False,
) -> tuple:
    """Run B rows of T tokens through the model against the pools and sample one token per row.

    graph: the model's `StaticGraph` (its GraphDef, hashed once: see model.StaticGraph); state: its parameters,
    best as `model.flat_state` (flattened once: model.FlatState), or an nnx.State.
    steps: (B,) tokens generated so far per row (the sampler's RNG counter); sample_rows: (B,) bool, rows whose
    sampled token is kept (a prefill chunk that does not end its prompt samples nothing useful).
    counts: None, or {"output": (S+1, V) int32, "prompt": (S+1, V) bool} per sequence slot, for penalties.
    media: a prefill chunk's soft tokens (slots into the (B*T) tokens, (M, D)), vision_blocks (B, T): see
    forward.TokenInputs. attention, phase: the engine's resolved plan and this step's phase.
    return_routed: also return the router's top-k expert ids of each row's last token (SampleResult.routed).
    Returns (SampleResult, cache, counts), and with return_hidden a fourth output: the kept token's final-normed
    hidden state (B, D) (the assistant drafter's input; off, the program is the one without it).
    """
    return _step(graph, state, cache, counts, batch, sampling, steps, sample_rows, media, vision_blocks, layout,
                 attention, phase, num_logprobs, return_routed, return_hidden)


@functools.partial(
    model_jit,
    static_argnames=("graph", "layout", "attention", "phase", "return_routed", "return_hidden"),
    donate_argnames=("cache",),
)
def forward_logits(graph: StaticGraph, state, cache: dict[str, jax.Array], batch: StepBatch,
                   media: MediaTokens | None = None, vision_blocks: jax.Array | None = None, *, layout: CacheLayout,
                   attention: AttentionPlan, phase: str, return_routed: bool = False,
                   return_hidden: bool = False) -> tuple:
    """The first half of a split step (`Runner.step` with a `DeferredMask`): the forward of `model_step`, giving
    (logits (B, V), routed (B, L_moe, k) or None, hidden (B, D) or None, cache). The host fills the grammar masks
    while it runs; `sample_logits` is the second half."""
    logits, routed, hidden, cache = _forward_last(graph, state, cache, batch, media, vision_blocks, layout, attention,
                                                  phase, return_routed, return_hidden)
    # Replicated over the mesh (the step's mesh context): the sampler half's program is looked up by its inputs'
    # shardings, which the warm-up lowers it with before this half is compiled (Runner.lowering).
    return jax.lax.with_sharding_constraint(logits, jax.sharding.PartitionSpec()), routed, hidden, cache


@functools.partial(jax.jit, static_argnames=("num_logprobs",), donate_argnames=("counts",))
def sample_logits(logits: jax.Array, counts, batch: StepBatch, sampling: SamplingBatch, steps: jax.Array,
                  sample_rows: jax.Array, *, num_logprobs: int):
    """The second half of a split step: `sample_step` of logits (B, V) with the filled token mask in `sampling`.
    Returns (SampleResult, counts)."""
    return sample_step(logits, counts, batch, sampling, steps, sample_rows, num_logprobs)


@functools.partial(
    model_jit,
    static_argnames=("graph", "layout", "attention", "num_logprobs", "num_steps", "return_routed"),
    donate_argnames=("cache", "counts"),
)
def decode_steps(graph: StaticGraph, state, cache, counts, batch: StepBatch, sampling: SamplingBatch, steps: jax.Array,
                 *, layout: CacheLayout, attention: AttentionPlan, num_logprobs: int, num_steps: int,
                 return_routed: bool = False):
    """`num_steps` decode steps in one call (one host round-trip): each step feeds back the token it sampled.

    batch: a decode batch (T = 1) whose page tables already cover num_steps more tokens. Returns the SampleResult
    fields stacked as (num_steps, B, ...); the host discards tokens after a row's stop condition.
    """
    live = batch.positions[:, 0] >= 0

    def body(carry, _):
        cache, counts, batch, steps = carry
        result, cache, counts = _step(graph, state, cache, counts, batch, sampling, steps, live, None, None,
                                      layout, attention, "decode", num_logprobs, return_routed)
        batch = batch.replace(
            tokens=result.tokens[:, None].astype(jnp.int32),
            positions=jnp.where(live[:, None], batch.positions + 1, -1),
            context_lens=jnp.where(live, batch.context_lens + 1, 0),
        )
        return (cache, counts, batch, steps + 1), result

    (cache, counts, _, _), results = jax.lax.scan(body, (cache, counts, batch, steps), None, length=num_steps)
    return results, cache, counts


def verify_step_logits(logits, counts, batch, sampling, steps, num_logprobs) -> tuple[VerifyResult, dict | None]:
    """Verify each row's drafts from the target's logits at all its positions (B, T, V) and advance the penalty
    counts by the tokens it emits. A verify row holds [last token, d_1 .. d_n] (n = valid positions - 1; padding
    rows have none and emit nothing that is kept). Shared with the pipeline's last stage."""
    valid = batch.positions >= 0  # (B, T)
    num_drafts = jnp.maximum(jnp.sum(valid, axis=1) - 1, 0).astype(jnp.int32)
    output_counts = prompt_mask = None
    if counts is not None:
        output_counts, prompt_mask = counts["output"][batch.slots], counts["prompt"][batch.slots]
    result = verify(logits, sampling, steps, batch.tokens[:, 1:], num_drafts, output_counts, prompt_mask,
                    num_logprobs=num_logprobs)
    if counts is not None:
        t = logits.shape[1]
        emitted = (jnp.arange(t)[None, :] <= result.num_accepted[:, None]) & valid[:, :1]  # (B, T)
        counts = dict(counts)
        rows = jnp.broadcast_to(batch.slots[:, None], emitted.shape)
        counts["output"] = counts["output"].at[rows, result.sample.tokens].add(emitted.astype(jnp.int32))
    return result, counts


@functools.partial(
    model_jit,
    static_argnames=("graph", "layout", "attention", "num_logprobs", "return_routed", "return_hidden"),
    donate_argnames=("cache", "counts"),
)
def verify_step(graph: StaticGraph, state, cache, counts, batch: StepBatch, sampling: SamplingBatch,
                steps: jax.Array, *, layout: CacheLayout, attention: AttentionPlan, num_logprobs: int,
                return_routed: bool = False, return_hidden: bool = False) -> tuple:
    """A speculative verify step: rows of [last token, d_1 .. d_k] (B, T = k + 1) through the one forward
    against the pools, logits at every position, then `verify_step_logits`.

    All T tokens' K/V are written; the engine advances a row's context only past the accepted ones, so the
    rejected ones are dead: their slots, past the context in pages the sequence owns (full and sliding-window
    pools alike), are rewritten by later steps. Runs with the "prefill" attention backends (T > 1 query tokens
    per row).
    Returns (VerifyResult, cache, counts), and with return_hidden a fourth output (B, D): each row's final-normed
    hidden state at index num_accepted (the token whose logits gave the emitted bonus token), the assistant
    drafter's input for the next round."""
    model = merge(graph, state)
    store = PagedKVStore(cache, batch, layout)
    inputs = TokenInputs(tokens=batch.tokens, positions=batch.positions)
    out = forward(model, inputs, attention=attention, phase="prefill", kv_store=store, return_routed=return_routed,
                  return_hidden=return_hidden)
    result, counts = verify_step_logits(out.logits, counts, batch, sampling, steps, num_logprobs)
    if return_routed:  # the router's choices for every input token: (B, T, L_moe, k)
        result = result._replace(sample=result.sample._replace(routed=(out.routed,)))
    if return_hidden:
        hidden = jnp.take_along_axis(out.hidden, result.num_accepted[:, None, None], axis=1)[:, 0]
        return result, store.cache, counts, hidden
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


class Runner:
    """Engine steps of a single-program model (pp=1, any tp/dp): one jitted step over the whole mesh.

    The engine talks to this and to `pipeline_runner.PipelineRunner` alike: `allocate()` the pools, then `step` /
    `multi` over a list of micro-batches (always one here), each (StepBatch, SamplingBatch, steps, sample_rows).
    `attention` is the engine's resolved AttentionPlan: what every step runs, per phase and layer kind.
    """

    microbatches = 1
    num_stages = 1

    def __init__(self, model, layout: CacheLayout, attention: AttentionPlan, return_routed: bool = False,
                 return_hidden: bool = False):
        """return_hidden: steps and verify steps also give each row's final-normed hidden state, kept on the device
        in `hidden` (one (B, D) array per micro-batch of the last call) for the assistant drafter."""
        self.model = model
        self.layout = layout
        self.attention = attention
        self.mesh = model.mesh
        self.return_routed = return_routed
        self.return_hidden = return_hidden
        self.hidden: list[jax.Array] = []
        self._lowered: list | None = None  # set by `lowering`
        self.replicated = sharding.replicated(self.mesh)

    @contextlib.contextmanager
    def lowering(self, into: list) -> Iterator[None]:
        """While active, `step`, `multi` and `verify` lower their jitted programs instead of running them: each
        program's `jax.stages.Lowered` is appended to `into`, and the calls hand back the cache and counts untouched
        and no results (None). Lowering with the very arguments a step passes (the same pools, static graph,
        layout, mesh context) is what makes `Lowered.compile()` fill the in-memory cache that the step's later call
        looks up (serving/warmup.py compiles them in parallel before the engine takes requests)."""
        self._lowered = into
        try:
            yield
        finally:
            self._lowered = None

    def _call(self, program, *args, **kwargs):
        """Run a jitted program, or lower it (`lowering`). Lowered, it returns what the caller unpacks: the
        forward half of a split step its logits' abstract value (replicated, as forward_logits pins them) so that
        the sampler half can be lowered next; the others None results and their cache and counts as given."""
        if self._lowered is None:
            return program(*args, **kwargs)
        lowered = program.lower(*args, **kwargs)
        self._lowered.append(lowered)
        if program is forward_logits:
            logits, routed, hidden, _ = lowered.out_info
            replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
            return jax.ShapeDtypeStruct(logits.shape, logits.dtype, sharding=replicated), routed, hidden, args[2]
        if program is sample_logits:
            return None, args[1]
        cache, counts = args[2], args[3]
        return (None, cache, counts, None) if kwargs.get("return_hidden") else (None, cache, counts)

    def _keep_hidden(self, outputs: tuple) -> tuple:
        """(result, cache, counts[, hidden]) -> (result, cache, counts), the hidden state appended to `hidden`."""
        if self.return_hidden:
            self.hidden.append(outputs[3])
        return outputs[:3]

    def allocate(self) -> dict[str, jax.Array]:
        """Zeroed pools on the mesh, each sharded by KV head where tp divides its head count."""
        return kv_cache.allocate(self.model.config.text, self.layout, self.model.dtype,
                                 sharding=lambda shape: sharding.kv_pool_sharding(shape, self.mesh))

    @property
    def counts_sharding(self) -> jax.sharding.Sharding:
        return sharding.replicated(self.mesh)

    # Steps whose sampling carries a DeferredMask run split (forward_logits, then sample_logits): the grammar masks
    # are filled on the host while the device runs the forward. (PipelineRunner fills them once the stages before
    # its last, which samples, are dispatched.)
    splits_sampling = True

    def step(self, cache, counts, microbatches, num_logprobs: int, phase: str, media: StepMedia | None = None):
        """One step of each micro-batch. phase: "prefill" | "decode"; media: a prefill chunk's soft tokens."""
        results = []
        tokens, blocks = (None, None) if media is None else (media.tokens, media.vision_blocks)
        self.hidden = []
        with jax.set_mesh(self.mesh):
            for batch, sampling, steps, sample_rows in microbatches:
                # The input tokens as a replicated device array, whether they come from the host or (async
                # scheduling) from the previous step's sampled tokens on the device: one program for both.
                batch = batch.replace(tokens=jax.device_put(batch.tokens, self.replicated))
                if isinstance(sampling.token_mask, DeferredMask):
                    logits, routed, hidden, cache = self._call(
                        forward_logits, self.model.static_graph, self.model.flat_state, cache, batch, tokens, blocks,
                        layout=self.layout, attention=self.attention, phase=phase, return_routed=self.return_routed,
                        return_hidden=self.return_hidden)
                    # Dispatched, not finished: the host fills the masks while the device runs the forward.
                    sampling = sampling.replace(token_mask=sampling.token_mask.fill())
                    result, counts = self._call(sample_logits, logits, counts, batch, sampling, steps, sample_rows,
                                                num_logprobs=num_logprobs)
                    if self.return_routed and result is not None:  # (None while `lowering`)
                        result = result._replace(routed=(routed,))
                    if self.return_hidden:
                        self.hidden.append(hidden)
                    results.append(result)
                    continue
                result, cache, counts = self._keep_hidden(self._call(
                    model_step, self.model.static_graph, self.model.flat_state, cache, counts, batch, sampling, steps,
                    sample_rows, tokens, blocks, layout=self.layout, attention=self.attention, phase=phase,
                    num_logprobs=num_logprobs, return_routed=self.return_routed, return_hidden=self.return_hidden))
                results.append(result)
        return results, cache, counts

    def multi(self, cache, counts, microbatches, num_logprobs: int, num_steps: int):
        results = []
        self.hidden = []  # not returned by the multi-step scan (the engine does not run it for the assistant)
        with jax.set_mesh(self.mesh):
            for batch, sampling, steps, _ in microbatches:
                result, cache, counts = self._call(decode_steps, self.model.static_graph, self.model.flat_state,
                                                   cache, counts, batch, sampling, steps, layout=self.layout,
                                                   attention=self.attention, num_logprobs=num_logprobs,
                                                   num_steps=num_steps, return_routed=self.return_routed)
                results.append(result)
        return results, cache, counts

    def verify(self, cache, counts, microbatches, num_logprobs: int):
        """A speculative verify step of each micro-batch (rows [last, drafts...]): VerifyResults."""
        results = []
        self.hidden = []
        with jax.set_mesh(self.mesh):
            for batch, sampling, steps, _ in microbatches:
                result, cache, counts = self._keep_hidden(self._call(
                    verify_step, self.model.static_graph, self.model.flat_state, cache, counts, batch, sampling, steps,
                    layout=self.layout, attention=self.attention, num_logprobs=num_logprobs,
                    return_routed=self.return_routed, return_hidden=self.return_hidden))
                results.append(result)
        return results, cache, counts
