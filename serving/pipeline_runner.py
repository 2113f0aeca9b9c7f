"""Engine steps through pipeline stages (pp > 1): the same interface as runner.Runner, over the model's stages.

Each stage is its own jitted program on its sub-mesh (gemma4_jax/pipeline.py says why): it merges the stage's
parameters, runs `pipeline.run_stage` (the one forward over its layers) against its own pools, and the last stage
applies the head and samples. Pools: stage s allocates the pools of its own layers on its own devices (`cache` is
a list per stage). Penalty counts live with the sampler on the last stage. `step` / `multi` take a list of
micro-batches and dispatch them all before waiting for any result: JAX dispatch is asynchronous and each device
runs its queue in order, so stage s+1 computes micro-batch j while stage s computes j+1.

With the MTP assistant drafter (return_hidden) the last stage also returns each row's final-normed hidden state
(`hidden`, one (B, D) array per micro-batch of the last call, on the last stage's devices), as runner.Runner does.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gemma4_jax import sharding
from gemma4_jax.attention_backends import AttentionPlan
from gemma4_jax.forward import TokenInputs
from gemma4_jax.layers import model_jit
from gemma4_jax.pipeline import Pipeline, run_stage, schedule_bubble, to_stage
from gemma4_jax.serving import kv_cache
from gemma4_jax.serving.kv_cache import PagedKVStore
from gemma4_jax.serving.runner import StepMedia, sample_step, verify_step_logits
from gemma4_jax.serving.step_builder import DeferredMask


class PipelineRunner:
    """Engine steps through the stages (same interface as serving.runner.Runner)."""

    def __init__(self, model, layout, attention: AttentionPlan, microbatches: int | None = None,
                 return_routed: bool = False, return_hidden: bool = False):
        self.model = model
        self.return_routed = return_routed
        self.return_hidden = return_hidden
        self.hidden: list[jax.Array] = []
        self.layout = layout
        self.attention = attention
        self.pipeline: Pipeline = model.pipeline
        self.num_stages = self.pipeline.num_stages
        # As many micro-batches as stages keeps every stage busy in steady state (M >= P); more shrink the
        # fill/drain bubble at the price of smaller per-stage matmuls.
        self.microbatches = int(microbatches or self.num_stages)
        if self.microbatches < 1:
            raise ValueError(f"pipeline_microbatches must be positive, got {self.microbatches}")
        self.busy_stage_steps = 0
        self.total_stage_steps = 0
        self._fns: dict[tuple, Any] = {}

    @property
    def bubble(self) -> float:
        return 1.0 - self.busy_stage_steps / self.total_stage_steps if self.total_stage_steps else 0.0

    def allocate(self) -> list[dict[str, jax.Array]]:
        cfg = self.model.config.text
        return [kv_cache.allocate(cfg, self.layout, self.model.dtype, layers=layers,
                                  sharding=lambda shape, m=mesh: sharding.kv_pool_sharding(shape, m))
                for layers, mesh in zip(self.pipeline.plan.layers, self.pipeline.meshes, strict=True)]

    @property
    def counts_sharding(self) -> jax.sharding.Sharding:
        return sharding.replicated(self.pipeline.meshes[-1])

    def stage_fn(self, s: int, phase: str, num_logprobs: int):
        """Stage s's jitted engine program: (stage state, its pools, counts, carry, batch, sampling, steps,
        sample_rows) -> ((carry or SampleResult, this stage's router ids (B, L_s, k) or None, the last stage's
        hidden state (B, D) with return_hidden or None), pools, counts).
        phase "verify": a speculative verify step (runner.verify_step): every position's logits, no narrowing to
        the kept token, the "prefill" backends; the last stage returns a VerifyResult and router ids
        (B, T, L_s, k) and, with return_hidden, the hidden state at each row's index num_accepted."""
        key = (s, phase, num_logprobs)
        if key not in self._fns:
            pipe, layout, attention, return_routed = self.pipeline, self.layout, self.attention, self.return_routed
            return_hidden = self.return_hidden
            graphdef, rest, plan, last = pipe.graphdef, pipe.placeholders[s], pipe.plan, s == self.num_stages - 1

            def fn(stage_state, cache, counts, carry, batch, sampling, steps, sample_rows):
                model = nnx.merge(graphdef, stage_state, rest)
                store = PagedKVStore(cache, batch, layout)
                if s == 0:  # carry: None, or the chunk's media as TokenInputs fields
                    media = carry or {}
                    carry = TokenInputs(tokens=batch.tokens, positions=batch.positions, media=media.get("tokens"),
                                        vision_blocks=media.get("vision_blocks"))
                verifying = phase == "verify"
                out = run_stage(model, plan, s, carry, attention=attention,
                                phase="prefill" if verifying else phase, kv_store=store,
                                keep_index=None if verifying else batch.last_index, return_routed=return_routed,
                                return_hidden=return_hidden)
                ids = None if not return_routed else out.routed if verifying else out.routed[:, 0]
                if not last:
                    return (out.activations, ids, None), store.cache, counts
                if verifying:
                    result, counts = verify_step_logits(out.logits, counts, batch, sampling, steps, num_logprobs)
                    hidden = None
                    if return_hidden:  # the state whose logits gave the emitted bonus token (runner.verify_step)
                        hidden = jnp.take_along_axis(out.hidden, result.num_accepted[:, None, None], axis=1)[:, 0]
                    return (result, ids, hidden), store.cache, counts
                result, counts = sample_step(out.logits[:, 0], counts, batch, sampling, steps, sample_rows,
                                             num_logprobs)
                return (result, ids, out.hidden[:, 0] if return_hidden else None), store.cache, counts

            self._fns[key] = model_jit(fn, donate_argnames=("cache", "counts"))
        return self._fns[key]

    def _dispatch(self, cache, counts, mb, num_logprobs: int, phase: str, tokens=None,
                  media: StepMedia | None = None):
        """Enqueue one micro-batch through every stage (no waiting). tokens: stage 0's input tokens when they
        come from a previous step on device; media: a prefill chunk's soft tokens for stage 0.
        Returns the (device) SampleResult; the last stage's hidden state (return_hidden) goes to `hidden`."""
        batch, sampling, steps, sample_rows = mb
        deferred = sampling.token_mask if isinstance(sampling.token_mask, DeferredMask) else None
        if deferred is not None:  # the stages before the last get an all-allowed mask of the same shape (unused)
            sampling = early = sampling.replace(token_mask=deferred.allow_all())
        meshes = self.pipeline.meshes
        carry = None
        if media is not None:
            put = lambda a: jax.device_put(a, NamedSharding(meshes[0], PartitionSpec()))  # noqa: E731
            carry = {"tokens": jax.tree.map(put, media.tokens)}
            if media.vision_blocks is not None:
                carry["vision_blocks"] = put(media.vision_blocks)
        stage_routed = []
        for s in range(self.num_stages):
            stage_batch = batch
            if s == 0 and tokens is not None:
                stage_batch = batch.replace(tokens=to_stage(tokens, meshes[0]))
            if s:
                carry = to_stage(carry, meshes[s])
            fn = self.stage_fn(s, phase, num_logprobs)
            last = s == self.num_stages - 1
            if last and deferred is not None:
                # The earlier stages are dispatched and running: fill the grammar masks meanwhile.
                sampling = early.replace(token_mask=deferred.fill())
            with jax.set_mesh(meshes[s]):
                (carry, ids, hidden), cache[s], stage_counts = fn(self.pipeline.states[s], cache[s],
                                                          counts if last else None, carry, stage_batch, sampling,
                                                          steps, sample_rows)
            stage_routed.append(ids)
            if last:
                counts = stage_counts
                if self.return_hidden:
                    self.hidden.append(hidden)
        if self.return_routed and phase == "verify":
            carry = carry._replace(sample=carry.sample._replace(routed=tuple(stage_routed)))
        elif self.return_routed:
            carry = carry._replace(routed=tuple(stage_routed))
        return carry, cache, counts

    # Steps whose sampling carries a DeferredMask fill it after the stages before the last are dispatched (the last
    # stage samples), so the host fills the grammar masks while they run.
    splits_sampling = True

    def step(self, cache, counts, microbatches, num_logprobs: int, phase: str, media: StepMedia | None = None):
        cache = list(cache)
        results = []
        self.hidden = []
        for mb in microbatches:
            result, cache, counts = self._dispatch(cache, counts, mb, num_logprobs, phase, media=media)
            results.append(result)
        self._count(len(microbatches), 1)
        return results, cache, counts

    def verify(self, cache, counts, microbatches, num_logprobs: int):
        """A speculative verify step of each micro-batch through the stages (see stage_fn's "verify")."""
        return self.step(cache, counts, microbatches, num_logprobs, phase="verify")

    def multi(self, cache, counts, microbatches, num_logprobs: int, num_steps: int):
        """num_steps decode steps of every micro-batch, all enqueued at once: step t of micro-batch j feeds its
        sampled tokens (last stage) to step t + 1 (stage 0) on device. Results stacked (num_steps, B, ...)."""
        cache = list(cache)
        per_mb: list[list] = [[] for _ in microbatches]
        self.hidden = []  # not kept across the steps (the engine does not run multi-steps for the assistant)
        tokens: list = [None] * len(microbatches)
        for t in range(num_steps):
            for j, (batch, sampling, steps, _) in enumerate(microbatches):
                live = np.asarray(batch.positions)[:, 0] >= 0
                advanced = batch.replace(
                    positions=np.where(live[:, None], np.asarray(batch.positions) + t, -1).astype(np.int32),
                    context_lens=np.where(live, np.asarray(batch.context_lens) + t, 0).astype(np.int32),
                )
                mb = (advanced, sampling, np.asarray(steps) + t, live)
                result, cache, counts = self._dispatch(cache, counts, mb, num_logprobs, "decode", tokens=tokens[j])
                self.hidden = []
                tokens[j] = result.tokens[:, None].astype(jnp.int32)
                per_mb[j].append(result)
        self._count(len(microbatches), num_steps)
        stacked = [jax.tree.map(lambda *xs: jnp.stack(xs), *results) for results in per_mb]
        return stacked, cache, counts

    def _count(self, num_microbatches: int, num_steps: int) -> None:
        busy, total = schedule_bubble(self.num_stages, num_microbatches, num_steps)
        self.busy_stage_steps += busy
        self.total_stage_steps += total
