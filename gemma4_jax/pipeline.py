"""Pipeline parallelism: each stage a separate XLA program on the devices of its index of the "pp" axis.

Why per-stage programs on sub-meshes (and not one program over stacked per-stage weights sharded on "pp"): Gemma 4
layers are not alike. Sliding and full layers differ in head dim (256 / 512), KV heads and RoPE; KV-shared layers
have no K/V weights and (double-wide) a twice wider MLP; the pools differ per layer kind. Stacking the stages'
weights needs identical stages, which a 35-layer E2B with 20 KV-shared layers or a 30-layer 26B-A4B on pp=4 does
not have. So stage s is its own jitted function over its own parameter subset, on `sharding.stage_meshes(mesh)[s]`
(tensor/data parallel inside the stage by the one rules table), and the host dispatches the stages in order. JAX
dispatch is asynchronous and each device runs its queue in order, so with several micro-batches in flight stage
s+1 computes micro-batch j while stage s computes j+1: the pipeline schedule comes from the dispatch order.

What crosses a stage boundary (`StagePlan`): the residual stream x (B, T, D), the positions, the per-layer
embedding inputs of the layers still to come (computed on the first stage, which owns the PLE tables), and the
(k, v, positions) of every KV-sharing source layer whose readers sit on a later stage. Stage 0 holds the
embeddings; the last stage the final norm, the LM head and, with tied embeddings, its own copy of the token table.

Engine decode: the running batch is split into micro-batches that flow through the stages; with
`num_scheduler_steps` > 1 a micro-batch's sampled tokens go straight from the last stage's devices to the first's,
so the host enqueues all steps of all micro-batches at once. The bubble (idle stage-steps / all stage-steps) of
the dispatched schedule is counted per call (`schedule_bubble`) and reported in the engine's stats.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemma4_jax import sharding
from gemma4_jax.config import TextConfig
from gemma4_jax.decoder import SequenceKV, stack_routed


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """Static facts of a pipeline over a config: who runs which layers and what crosses each boundary."""

    layers: tuple[range, ...]  # per stage
    crossing_kv: tuple[tuple[int, ...], ...]  # per boundary s -> s+1: source layers whose K/V travel on
    slice_stage: int  # stage that narrows rows to their kept token (engine; see Gemma4Text.decode_layers)

    @property
    def num_stages(self) -> int:
        return len(self.layers)

    @staticmethod
    def for_config(cfg: TextConfig, pp: int) -> StagePlan:
        stages = sharding.stage_layers(cfg.num_hidden_layers, pp)
        crossing = []
        for s in range(pp - 1):
            nxt = stages[s + 1].start
            crossing.append(tuple(sorted({
                spec.kv_source_layer for spec in cfg.layers
                if spec.is_kv_shared and spec.index >= nxt and spec.kv_source_layer < nxt
            })))
        shared = [spec.index for spec in cfg.layers if spec.is_kv_shared]
        first = shared[0] if shared else cfg.num_hidden_layers - 1
        slice_stage = next(s for s, r in enumerate(stages) if first in r)
        return StagePlan(stages, tuple(crossing), slice_stage)


def _take_rows(index: jax.Array, a: jax.Array) -> jax.Array:
    """a: (B, T, ...) -> (B, 1, ...), token index[b] of row b."""
    return a[jnp.arange(a.shape[0]), index][:, None]


def run_stage(model, plan: StagePlan, s: int, carry: dict, kv_store, keep_index: jax.Array | None,
              routed: list | None = None):
    """Run stage s of `model` (merged from that stage's parameters). Stage 0's carry is {"tokens", "positions"};
    later ones get what the previous stage returned. Returns the next carry, or the last stage's hidden states
    (B, T, D) ((B, 1, D) with keep_index). routed: a list for this stage's router ids (decode_layers)."""
    last = s == plan.num_stages - 1
    layers = plan.layers[s]
    blocks = carry.get("vision_blocks")  # (B, T) bidirectional image blocks (full-sequence forward only)
    if s == 0 and "soft_tokens" in carry:  # multimodal: the towers' soft tokens replace the placeholders
        x, ple = model.embed_multimodal(carry["tokens"], carry["slots"], carry["soft_tokens"])
        positions, shared = carry["positions"], {}
    elif s == 0:
        x, ple = model.embed(carry["tokens"])
        positions, shared = carry["positions"], {}
    else:
        x, positions, shared = carry["x"], carry["positions"], dict(carry["shared"])
        ple = carry.get("ple")
        if ple is not None:  # the carry holds the rows of layers >= this stage; decode_layers indexes by layer
            ple = jnp.pad(ple, ((0, 0), (0, 0), (layers.start, 0), (0, 0)))
    narrow = keep_index is not None and s == plan.slice_stage
    x = model.decode_layers(x, positions, ple, kv_store, layers=layers, shared_kv=shared,
                            keep_index=keep_index if narrow else None, routed=routed, vision_blocks=blocks)
    if routed and keep_index is not None and not narrow and s < plan.slice_stage:
        # Before the narrowing stage x still holds every token: keep the ids of each row's last one.
        routed[:] = [_take_rows(keep_index, r) for r in routed]
    if last:
        return x
    if narrow:  # decode_layers narrowed x; the later stages' positions and PLE rows follow
        positions = _take_rows(keep_index, positions)
        ple = None if ple is None else _take_rows(keep_index, ple)
    out = {"x": x, "positions": positions, "shared": {src: shared[src] for src in plan.crossing_kv[s]}}
    if blocks is not None and not (keep_index is not None and s >= plan.slice_stage):
        # After the engine narrows rows to their last token, blocks change nothing for that one query (no later
        # token of its block is in the chunk), so they stop here.
        out["vision_blocks"] = blocks
    if ple is not None:
        out["ple"] = ple[:, :, plan.layers[s + 1].start :]
    return out


def schedule_bubble(num_stages: int, num_microbatches: int, num_steps: int = 1) -> tuple[int, int]:
    """(busy, total) stage-steps of the dispatched schedule, each stage task counted as one time unit.

    Each stage runs its tasks in dispatch order (step t, micro-batch j, stage s); a task waits for the same
    micro-batch on the previous stage and, on stage 0, for that micro-batch's token from the last stage at step
    t - 1. total = stages x makespan; bubble = 1 - busy / total ((P - 1) / (M + P - 1) for one step, M >= 1).
    """
    free = [0] * num_stages
    done_last = [0] * num_microbatches
    for _ in range(num_steps):
        for j in range(num_microbatches):
            ready = done_last[j]
            for s in range(num_stages):
                start = max(free[s], ready)
                free[s] = ready = start + 1
            done_last[j] = ready
    return num_stages * num_microbatches * num_steps, num_stages * max(free)


def _to_stage(tree, mesh: Mesh):
    """Move arrays onto a stage's sub-mesh keeping their PartitionSpec (the stage meshes have the same shape)."""

    def move(a):
        spec = a.sharding.spec if isinstance(getattr(a, "sharding", None), NamedSharding) else PartitionSpec()
        return jax.device_put(a, NamedSharding(mesh, spec))

    return jax.tree.map(move, tree)


class Pipeline:
    """A model split into stages: per-stage parameter states on their sub-meshes and the jitted stage programs."""

    def __init__(self, cfg: TextConfig, graphdef: nnx.GraphDef, abstract_state: nnx.State, state: nnx.State,
                 mesh: Mesh):
        pp = mesh.shape["pp"]
        self.cfg = cfg
        self.graphdef = graphdef
        self.plan = StagePlan.for_config(cfg, pp)
        self.meshes = sharding.stage_meshes(mesh)
        flat = dict(nnx.to_flat_state(state))
        owned: list[dict] = [{} for _ in range(pp)]
        for path, var in flat.items():
            owned[sharding.param_stage(path, self.plan.layers)][path] = var
        tied = ("embed_tokens", "embedding")
        if cfg.tie_word_embeddings and pp > 1:
            # The last stage's own copy of the tied table (device to device; the checkpoint is read once).
            var = flat[tied]
            copy = jax.device_put(var.get_value(), NamedSharding(self.meshes[-1], var.get_value().sharding.spec))
            owned[-1][tied] = var.replace(copy)
        abstract = dict(nnx.to_flat_state(abstract_state))
        self.states = [nnx.from_flat_state(list(o.items())) for o in owned]
        # Inside stage s the module is merged from its own parameters plus shape-only placeholders for the rest,
        # which its layers never touch.
        self._rest = [nnx.from_flat_state([(p, v) for p, v in abstract.items() if p not in o]) for o in owned]
        self._forward_fns: dict[int, Any] = {}
        self._engine_fns: dict[tuple, Any] = {}

    @property
    def num_stages(self) -> int:
        return self.plan.num_stages

    def module(self, s: int):
        return nnx.merge(self.graphdef, self.states[s], self._rest[s])

    # ------------------------------------------------------------------------------------------------------------
    # Full-sequence forward (Model.logits)

    def _forward_fn(self, s: int, return_routed: bool = False):
        key = (s, return_routed)
        if key not in self._forward_fns:
            graphdef, rest, plan, last = self.graphdef, self._rest[s], self.plan, s == self.num_stages - 1

            def fn(stage_state, carry):
                model = nnx.merge(graphdef, stage_state, rest)
                routed = [] if return_routed else None
                out = run_stage(model, plan, s, carry, SequenceKV(), None, routed)
                out = model.head(out) if last else out
                return (out, stack_routed(routed)) if return_routed else out

            self._forward_fns[key] = jax.jit(fn)
        return self._forward_fns[key]

    def forward(self, input_ids: np.ndarray, positions: np.ndarray, return_routed_experts: bool = False,
                media: dict | None = None):
        """input_ids, positions: (B, T) -> float32 logits (B, T, V) on the last stage's devices.
        return_routed_experts: -> (logits, router ids (B, T, L_moe, k) int32, gathered from every stage).
        media (multimodal.logits): {"slots" (M,), "soft_tokens" (M, D) from `encode_fn`, "vision_blocks" (B, T)
        or None}: stage 0 splices the soft tokens in; the block ids travel with the activations."""
        first = self.meshes[0]
        carry = {"tokens": jax.device_put(input_ids, sharding.batch_sharding(input_ids.shape, first)),
                 "positions": jax.device_put(positions, sharding.batch_sharding(positions.shape, first))}
        for name, value in (media or {}).items():
            if value is not None:
                carry[name] = jax.device_put(value, NamedSharding(first, PartitionSpec()))
        routed = []
        for s in range(self.num_stages):
            if s:
                carry = _to_stage(carry, self.meshes[s])
            with jax.set_mesh(self.meshes[s]):
                carry = self._forward_fn(s, return_routed_experts)(self.states[s], carry)
            if return_routed_experts:
                carry, ids = carry
                routed.append(np.asarray(jax.device_get(ids)))
        if return_routed_experts:
            return carry, np.concatenate(routed, axis=2)
        return carry

    def tower_fn(self, kind: str):
        """The towers live on stage 0 (DESIGN decision 2): a jitted (stage-0 state, a, b) -> (soft tokens (N, L, D),
        valid (N, L)) for kind "vision" (pixel values, positions) or "audio" (features, mask)."""
        key = ("tower", kind)
        if key not in self._forward_fns:
            from gemma4_jax.multimodal import TOWERS

            graphdef, rest = self.graphdef, self._rest[0]
            soft = TOWERS[kind]

            def fn(stage_state, a, b):
                return getattr(nnx.merge(graphdef, stage_state, rest), soft)(a, b)

            self._forward_fns[key] = jax.jit(fn)
        return self._forward_fns[key]

    def soft_tokens(self, kind: str, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run a tower on stage 0's devices -> host (soft tokens (N, L, D), valid (N, L))."""
        put = functools.partial(jax.device_put, device=NamedSharding(self.meshes[0], PartitionSpec()))
        with jax.set_mesh(self.meshes[0]):
            return jax.device_get(self.tower_fn(kind)(self.states[0], put(np.asarray(a)), put(np.asarray(b))))

    # ------------------------------------------------------------------------------------------------------------
    # Engine steps

    def engine_fn(self, s: int, layout, num_logprobs: int, return_routed: bool = False):
        key = (s, layout, num_logprobs, return_routed)
        if key not in self._engine_fns:
            from gemma4_jax.serving.kv_cache import PagedKVStore
            from gemma4_jax.serving.runner import sample_step

            graphdef, rest, plan, last = self.graphdef, self._rest[s], self.plan, s == self.num_stages - 1

            def fn(stage_state, cache, counts, carry, batch, sampling, steps, sample_rows):
                model = nnx.merge(graphdef, stage_state, rest)
                store = PagedKVStore(cache, batch, layout)
                if s == 0:  # a media chunk brings {"slots", "soft_tokens"[, "vision_blocks"]} (mm_inputs.py)
                    carry = {"tokens": batch.tokens, "positions": batch.positions, **(carry or {})}
                routed = [] if return_routed else None
                out = run_stage(model, plan, s, carry, store, batch.last_index, routed)
                # Each stage returns its own layers' router ids (B, L_s, k) beside its output; the runner
                # gathers them into SampleResult.routed.
                ids = stack_routed(routed)[:, 0] if return_routed else None
                if not last:
                    return (out, ids), store.cache, counts
                logits = model.head(out[:, 0])
                result, counts = sample_step(logits, counts, batch, sampling, steps, sample_rows, num_logprobs)
                return (result, ids), store.cache, counts

            self._engine_fns[key] = jax.jit(fn, donate_argnames=("cache", "counts"))
        return self._engine_fns[key]


class PipelineRunner:
    """Engine steps through the stages (same interface as serving.runner.Runner).

    Pools: stage s allocates the pools of its own layers on its own devices (`cache` is a list per stage). Penalty
    counts live with the sampler on the last stage. `step`/`multi` take a list of micro-batches and dispatch them
    all before waiting for any result.
    """

    def __init__(self, model, layout, microbatches: int | None = None, return_routed: bool = False):
        self.model = model
        self.return_routed = return_routed
        self.layout = layout
        self.pipeline: Pipeline = model.pipeline
        self.num_stages = self.pipeline.num_stages
        # As many micro-batches as stages keeps every stage busy in steady state (M >= P); more shrink the
        # fill/drain bubble at the price of smaller per-stage matmuls.
        self.microbatches = int(microbatches or self.num_stages)
        if self.microbatches < 1:
            raise ValueError(f"pipeline_microbatches must be positive, got {self.microbatches}")
        self.busy_stage_steps = 0
        self.total_stage_steps = 0

    @property
    def bubble(self) -> float:
        return 1.0 - self.busy_stage_steps / self.total_stage_steps if self.total_stage_steps else 0.0

    def allocate(self) -> list[dict[str, jax.Array]]:
        from gemma4_jax.serving import kv_cache

        cfg = self.model.config.text
        return [kv_cache.allocate(cfg, self.layout, self.model.dtype, layers=layers,
                                  sharding=lambda shape, m=mesh: sharding.kv_pool_sharding(shape, m))
                for layers, mesh in zip(self.pipeline.plan.layers, self.pipeline.meshes, strict=True)]

    @property
    def counts_sharding(self) -> jax.sharding.Sharding:
        return sharding.replicated(self.pipeline.meshes[-1])

    def _dispatch(self, cache, counts, mb, num_logprobs: int, tokens=None, media: dict | None = None):
        """Enqueue one micro-batch through every stage (no waiting). tokens: stage 0's input tokens when they
        come from a previous step on device; media: a prefill chunk's soft tokens for stage 0 (mm_inputs.py).
        Returns the (device) SampleResult."""
        batch, sampling, steps, sample_rows = mb
        meshes = self.pipeline.meshes
        carry = None
        if media:
            carry = {k: jax.device_put(v, NamedSharding(meshes[0], PartitionSpec()))
                     for k, v in media.items() if v is not None}
        stage_routed = []
        for s in range(self.num_stages):
            stage_batch = batch
            if s == 0 and tokens is not None:
                stage_batch = batch.replace(tokens=_to_stage(tokens, meshes[0]))
            if s:
                carry = _to_stage(carry, meshes[s])
            fn = self.pipeline.engine_fn(s, self.layout, num_logprobs, self.return_routed)
            last = s == self.num_stages - 1
            with jax.set_mesh(meshes[s]):
                (carry, ids), cache[s], stage_counts = fn(self.pipeline.states[s], cache[s],
                                                          counts if last else None, carry, stage_batch, sampling,
                                                          steps, sample_rows)
            stage_routed.append(ids)
            if last:
                counts = stage_counts
        if self.return_routed:
            carry = carry._replace(routed=tuple(stage_routed))
        return carry, cache, counts

    def step(self, cache, counts, microbatches, num_logprobs: int, media: dict | None = None):
        cache = list(cache)
        results = []
        for mb in microbatches:
            result, cache, counts = self._dispatch(cache, counts, mb, num_logprobs, media=media)
            results.append(result)
        self._count(len(microbatches), 1)
        return results, cache, counts

    def multi(self, cache, counts, microbatches, num_logprobs: int, num_steps: int):
        """num_steps decode steps of every micro-batch, all enqueued at once: step t of micro-batch j feeds its
        sampled tokens (last stage) to step t + 1 (stage 0) on device. Results stacked (num_steps, B, ...)."""
        cache = list(cache)
        per_mb: list[list] = [[] for _ in microbatches]
        tokens: list = [None] * len(microbatches)
        for t in range(num_steps):
            for j, (batch, sampling, steps, _) in enumerate(microbatches):
                live = np.asarray(batch.positions)[:, 0] >= 0
                advanced = batch.replace(
                    positions=np.where(live[:, None], np.asarray(batch.positions) + t, -1).astype(np.int32),
                    context_lens=np.where(live, np.asarray(batch.context_lens) + t, 0).astype(np.int32),
                )
                mb = (advanced, sampling, np.asarray(steps) + t, live)
                result, cache, counts = self._dispatch(cache, counts, mb, num_logprobs, tokens=tokens[j])
                tokens[j] = result.tokens[:, None].astype(jnp.int32)
                per_mb[j].append(result)
        self._count(len(microbatches), num_steps)
        stacked = [jax.tree.map(lambda *xs: jnp.stack(xs), *results) for results in per_mb]
        return stacked, cache, counts

    def _count(self, num_microbatches: int, num_steps: int) -> None:
        busy, total = schedule_bubble(self.num_stages, num_microbatches, num_steps)
        self.busy_stage_steps += busy
        self.total_stage_steps += total


# ----------------------------------------------------------------------------------------------------------------
# What each device holds (no memory: shapes only)


@functools.lru_cache(maxsize=8)
def _abstract_params(cfg, dtype) -> tuple[tuple[tuple, tuple[int, ...], int, tuple], ...]:
    """(path, shape, itemsize, logical axes) of every parameter, via jax.eval_shape (cached: tracing a 60-layer
    model takes seconds)."""
    from gemma4_jax.model import abstract_model

    _, state = abstract_model(cfg, dtype)
    return tuple((path, tuple(var.shape), np.dtype(var.dtype).itemsize, var.get_metadata().get("logical_axes"))
                 for path, var in nnx.to_flat_state(state))


def memory_per_device(config, pp: int = 1, tp: int = 1, dp: int = 1, dtype: Any = "bfloat16",
                      context_tokens: int = 0, max_seqs: int = 0,
                      devices: Sequence[jax.Device] | None = None) -> list[dict]:
    """Parameter and KV bytes per device of a layout, from `jax.eval_shape` shapes (no weights allocated).

    config: a ModelConfig or preset name. KV: `context_tokens` tokens in paged full-attention pools plus `max_seqs`
    sliding-window rings. Returns one row per device: {"device", "stage", "param_bytes", "kv_bytes",
    "kv_bytes_per_token"} (KV bytes per token of context: full-attention layers that own a cache).
    """
    from gemma4_jax.config import preset
    from gemma4_jax.model import resolve_dtype

    cfg = preset(config) if isinstance(config, str) else config
    text = cfg.text
    devices = list(devices if devices is not None else jax.devices())
    sharding.validate(text, pp=pp, tp=tp, dp=dp, num_devices=len(devices))
    dt = resolve_dtype(dtype)
    params = _abstract_params(cfg, dt)
    mesh = sharding.make_mesh(pp=pp, tp=tp, dp=dp, devices=devices)
    meshes = sharding.stage_meshes(mesh)
    stages = sharding.stage_layers(text.num_hidden_layers, pp)
    rows = {d.id: {"device": d.id, "stage": s, "param_bytes": 0, "kv_bytes": 0, "kv_bytes_per_token": 0}
            for s, m in enumerate(meshes) for d in m.devices.flat}

    def add(key, mesh_, shape, itemsize, axes):
        ns = sharding.named_sharding(axes, shape, mesh_)
        nbytes = int(np.prod(ns.shard_shape(tuple(shape)))) * itemsize
        for d in mesh_.devices.flat:
            rows[d.id][key] += nbytes

    for path, shape, itemsize, axes in params:
        s = sharding.param_stage(path, stages)
        add("param_bytes", meshes[s], shape, itemsize, axes)
        if path == ("embed_tokens", "embedding") and text.tie_word_embeddings and pp > 1:
            add("param_bytes", meshes[-1], shape, itemsize, axes)  # the head's own copy
    pages = -(-context_tokens // 16)
    for spec in text.layers:
        if spec.is_kv_shared:
            continue
        s = next(i for i, r in enumerate(stages) if spec.index in r)
        item = np.dtype(dt).itemsize
        if spec.is_sliding:
            shape = (max_seqs, text.sliding_window, spec.num_kv_heads, spec.head_dim)
        else:
            shape = (pages, 16, spec.num_kv_heads, spec.head_dim)
            add("kv_bytes_per_token", meshes[s], (1, 1, spec.num_kv_heads, spec.head_dim), 2 * item,
                sharding.KV_POOL_AXES)
        add("kv_bytes", meshes[s], shape, 2 * item, sharding.KV_POOL_AXES)  # K and V
    return [rows[d.id] for m in meshes for d in m.devices.flat]
