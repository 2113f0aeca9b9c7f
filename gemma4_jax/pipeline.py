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

Every stage runs the one forward (forward.py) over its layer range (`run_stage`). Engine steps through the stages
are serving/pipeline_runner.py: the running batch is split into micro-batches that flow through the stages; with
`num_scheduler_steps` > 1 a micro-batch's sampled tokens go straight from the last stage's devices to the first's,
so the host enqueues all steps of all micro-batches at once. The bubble (idle stage-steps / all stage-steps) of
the dispatched schedule is counted per call (`schedule_bubble`) and reported in the engine's stats.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemma4_jax import sharding
from gemma4_jax.attention_backends import AttentionPlan
from gemma4_jax.config import TextConfig
from gemma4_jax.forward import Activations, ForwardOutput, TokenInputs, forward
from gemma4_jax.layers import model_jit
from gemma4_jax.multimodal import TOWERS


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """Static facts of a pipeline over a config: who runs which layers and what crosses each boundary."""

    layers: tuple[range, ...]  # per stage
    crossing_kv: tuple[tuple[int, ...], ...]  # per boundary s -> s+1: source layers whose K/V travel on
    slice_stage: int  # stage that narrows rows to their kept token (engine; the rule is in forward.py)

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


def run_stage(model, plan: StagePlan, s: int, carry: TokenInputs | Activations, *, attention: AttentionPlan,
              phase: str = "prefill", kv_store=None, keep_index: jax.Array | None = None,
              return_routed: bool = False, return_hidden: bool = False) -> ForwardOutput:
    """Stage s of `model` (merged from that stage's parameters): the one forward over the stage's layers.

    Stage 0 starts from TokenInputs, later ones from the Activations the previous stage returned. The last stage
    applies the head (logits; (B, 1, V) with keep_index); the others return the activations trimmed to what
    crosses the boundary: the K/V of sources read on later stages, the PLE rows of later layers, and the vision
    blocks while rows are not yet narrowed to their kept token (after that they change nothing: no later token
    of the kept one's block is in the chunk). routed: this stage's MoE layers, (B, T, L_s, k). return_hidden: the
    last stage also returns the final-normed stream (forward's `hidden`, the MTP assistant drafter's input)."""
    last = s == plan.num_stages - 1
    out = forward(model, carry, attention=attention, phase=phase, kv_store=kv_store, layers=plan.layers[s],
                  keep_index=keep_index, head=last, return_routed=return_routed, return_hidden=return_hidden and last)
    if last:
        return out
    act = out.activations
    start = plan.layers[s + 1].start
    act = act.replace(shared={src: act.shared[src] for src in plan.crossing_kv[s]},
                      ple=None if act.ple is None else act.ple[:, :, start - act.ple_offset:], ple_offset=start,
                      vision_blocks=None if act.narrowed else act.vision_blocks)
    return out.replace(activations=act)


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


def to_stage(tree, mesh: Mesh):
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
        self.placeholders = [nnx.from_flat_state([(p, v) for p, v in abstract.items() if p not in o]) for o in owned]
        self._forward_fns: dict[tuple, Any] = {}  # jitted stage programs (full forward, towers)

    @property
    def num_stages(self) -> int:
        return self.plan.num_stages

    def module(self, s: int):
        return nnx.merge(self.graphdef, self.states[s], self.placeholders[s])

    # ------------------------------------------------------------------------------------------------------------
    # Full-sequence forward (Model.logits)

    def _forward_fn(self, s: int, attention: AttentionPlan, return_routed: bool):
        key = (s, attention, return_routed)
        if key not in self._forward_fns:
            graphdef, rest, plan = self.graphdef, self.placeholders[s], self.plan

            def fn(stage_state, carry):
                out = run_stage(nnx.merge(graphdef, stage_state, rest), plan, s, carry, attention=attention,
                                return_routed=return_routed)
                return out.logits if out.logits is not None else out.activations, out.routed

            self._forward_fns[key] = model_jit(fn)
        return self._forward_fns[key]

    def forward(self, inputs: TokenInputs, attention: AttentionPlan, return_routed_experts: bool = False):
        """Full-sequence forward through the stages. inputs: host TokenInputs ((B, T) tokens and positions, media
        soft tokens and vision blocks when present; stage 0 splices the soft tokens in, the block ids travel with
        the activations). -> float32 logits (B, T, V) on the last stage's devices; with return_routed_experts
        (logits, router ids (B, T, L_moe, k) int32 gathered from every stage)."""
        first = self.meshes[0]
        replicated = NamedSharding(first, PartitionSpec())
        carry = jax.tree.map(lambda a: jax.device_put(a, replicated), inputs)
        carry = carry.replace(tokens=jax.device_put(inputs.tokens, sharding.batch_sharding(inputs.tokens.shape, first)),
                              positions=jax.device_put(inputs.positions,
                                                       sharding.batch_sharding(inputs.positions.shape, first)))
        routed = []
        for s in range(self.num_stages):
            if s:
                carry = to_stage(carry, self.meshes[s])
            with jax.set_mesh(self.meshes[s]):
                carry, ids = self._forward_fn(s, attention, return_routed_experts)(self.states[s], carry)
            if return_routed_experts:
                routed.append(np.asarray(jax.device_get(ids)))
        if return_routed_experts:
            return carry, np.concatenate(routed, axis=2)
        return carry

    def tower_fn(self, kind: str):
        """The towers live on stage 0 (DESIGN decision 2): a jitted (stage-0 state, a, b) -> (soft tokens (N, L, D),
        valid (N, L)) for kind "vision" (pixel values, positions) or "audio" (features, mask)."""
        key = ("tower", kind)
        if key not in self._forward_fns:
            graphdef, rest = self.graphdef, self.placeholders[0]
            soft = TOWERS[kind]

            def fn(stage_state, a, b):
                return getattr(nnx.merge(graphdef, stage_state, rest), soft)(a, b)

            self._forward_fns[key] = model_jit(fn)
        return self._forward_fns[key]

    def soft_tokens(self, kind: str, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run a tower on stage 0's devices -> host (soft tokens (N, L, D), valid (N, L))."""
        put = functools.partial(jax.device_put, device=NamedSharding(self.meshes[0], PartitionSpec()))
        with jax.set_mesh(self.meshes[0]):
            return jax.device_get(self.tower_fn(kind)(self.states[0], put(np.asarray(a)), put(np.asarray(b))))
