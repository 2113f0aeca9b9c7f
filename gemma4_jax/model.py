"""The user-facing model: build from a checkpoint directory, a config or a preset; run full-sequence logits.

`Model` keeps the split form that jitted code wants (`graphdef`, `state`) next to the config and the mesh; the nnx
module is rebuilt from them on demand (`module`). Step functions are pure functions of (state, inputs).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma4_jax import attention_backends, checkpoint, multimodal, orbax_io, pipeline, quant, sharding, towers
from gemma4_jax.assistant import DraftOutput, Gemma4Assistant, TargetKV
from gemma4_jax.assistant_config import (
    AssistantConfig,
    assistant_preset,
    check_target,
    is_assistant_dict,
    load_assistant_config,
)
from gemma4_jax.attention_backends import AttentionPlan
from gemma4_jax.config import ConfigError, ModelConfig, load_config, preset
from gemma4_jax.decoder import Gemma4Text
from gemma4_jax.forward import TokenInputs, forward
from gemma4_jax.layers import model_jit

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


@functools.cache
def cpu_multiplies_bf16() -> bool:
    """Whether this machine's CPU multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16, read from the flags of
    /proc/cpuinfo; False where that file does not exist), i.e. whether XLA:CPU's YNNPACK bfloat16 GEMM runs at
    about twice the float32 rate."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = {word for line in f if line.startswith("flags") for word in line.split(":", 1)[1].split()}
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_dtype(dtype: Any, platform: str | None = None) -> jnp.dtype:
    """A dtype name or numpy/jax dtype -> the parameter and activation dtype.

    "auto" (vLLM's name) is bfloat16 (Gemma 4's checkpoint dtype) on accelerators and on CPUs that multiply
    bfloat16 natively (`cpu_multiplies_bf16`), float32 on other CPUs. On this project's AVX512-BF16 machine a
    bench-100m engine in bfloat16 runs 1.2-1.35x float32's tokens/s from 2 rows up and its prefill ~1.15-1.45x, and
    with the CPU product kernel ~1.5x at batch 1, in half the memory (docs/benchmarks.md, "bfloat16 on CPU" and
    "Native CPU kernels")."""
    if isinstance(dtype, str):
        if dtype == "auto":
            platform = platform or jax.default_backend()
            wide = platform == "cpu" and not cpu_multiplies_bf16()
            return jnp.dtype(jnp.float32 if wide else jnp.bfloat16)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; choose one of {['auto', *sorted(_DTYPES)]}")
        return jnp.dtype(_DTYPES[dtype])
    d = jnp.dtype(dtype)
    if d not in [jnp.dtype(v) for v in _DTYPES.values()]:
        raise ValueError(f"dtype {d} is not supported; choose one of {['auto', *sorted(_DTYPES)]}")
    return d


class StaticGraph:
    """A GraphDef as a jit static argument, hashed once.

    jit hashes its static arguments on every call, and hashing a GraphDef walks the whole module tree (~2,700
    hash calls, ~6 ms of host time per engine step at batch 1 on the bench-100m model). This wrapper hashes it
    once; `static_graph` interns wrappers of equal graphdefs, so models loaded twice from one checkpoint share
    compiled programs and a cache lookup is an identity check."""

    __slots__ = ("graphdef", "_hash")

    def __init__(self, graphdef: nnx.GraphDef):
        self.graphdef = graphdef
        self._hash = hash(graphdef)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, StaticGraph) and self._hash == other._hash
                                 and self.graphdef == other.graphdef)


_INTERNED: dict[StaticGraph, StaticGraph] = {}


def static_graph(graphdef: nnx.GraphDef) -> StaticGraph:
    """The one StaticGraph of graphdefs equal to this one."""
    wrapper = StaticGraph(graphdef)
    return _INTERNED.setdefault(wrapper, wrapper)


class _TreeDefKey:
    """A state's PyTreeDef as pytree aux data, hashed once (as StaticGraph: jit compares aux data on every call)."""

    __slots__ = ("treedef", "_hash")

    def __init__(self, treedef: jax.tree_util.PyTreeDef):
        self.treedef = treedef
        self._hash = hash(treedef)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, _TreeDefKey) and self._hash == other._hash
                                 and self.treedef == other.treedef)


@jax.tree_util.register_pytree_node_class
class FlatState:
    """A model's parameter state, flattened once: its leaves and the structure to rebuild it inside jit.

    Passing an nnx.State to a jitted step flattens it on every call, one Python callback per Variable (~0.2 ms per
    engine step for bench-100m's 197 parameters, growing with the model); this is one node over the same leaves.
    `merge(graph, state)` takes either form."""

    __slots__ = ("leaves", "key")

    def __init__(self, leaves: tuple, key: _TreeDefKey):
        self.leaves = leaves
        self.key = key

    @classmethod
    def of(cls, state: nnx.State) -> FlatState:
        leaves, treedef = jax.tree.flatten(state)
        return cls(tuple(leaves), _TreeDefKey(treedef))

    def tree_flatten(self):
        return self.leaves, self.key

    @classmethod
    def tree_unflatten(cls, key: _TreeDefKey, leaves) -> FlatState:
        return cls(tuple(leaves), key)

    def unflatten(self) -> nnx.State:
        return jax.tree.unflatten(self.key.treedef, self.leaves)


def merge(graph: StaticGraph, state: nnx.State | FlatState):
    """The module of a jitted step from its static graph and its state (an nnx.State or a FlatState)."""
    return nnx.merge(graph.graphdef, state.unflatten() if isinstance(state, FlatState) else state)


@functools.partial(model_jit, static_argnames=("graph", "attention", "return_routed"))
def _logits(graph: StaticGraph, state: nnx.State, inputs: TokenInputs, *, attention: AttentionPlan,
            return_routed: bool) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The full-sequence forward of a single-program model: (B, T, V) logits [, routed ids (B, T, L_moe, k)]."""
    out = forward(nnx.merge(graph.graphdef, state), inputs, attention=attention, phase="prefill",
                  return_routed=return_routed)
    return (out.logits, out.routed) if return_routed else out.logits


class Model:
    """A Gemma 4 model ready to run: config, mesh, graphdef and (sharded) state."""

    def __init__(self, config: ModelConfig, graphdef: nnx.GraphDef, state: nnx.State, mesh: jax.sharding.Mesh,
                 dtype: jnp.dtype, path: str | None = None, pipeline: pipeline.Pipeline | None = None,
                 attention: AttentionPlan | None = None):
        self.config = config
        self.graphdef = graphdef
        self.static_graph = static_graph(graphdef)  # what jitted steps take as their static argument
        self.state = state
        self.mesh = mesh
        self.dtype = dtype
        self.path = path
        self.pipeline = pipeline  # the stages when pp > 1 (pipeline.py); `state` still holds every parameter
        # The attention backends `logits` runs (its phase is "prefill"); the engine resolves its own plan.
        self.attention = attention or attention_backends.resolve_attention("auto", log_choice=log.debug)

    @property
    def num_stages(self) -> int:
        return 1 if self.pipeline is None else self.pipeline.num_stages

    @property
    def flat_state(self) -> FlatState:
        """`state` flattened once (FlatState), what the engine's jitted steps take; rebuilt if `state` is replaced."""
        cached = getattr(self, "_flat_state", None)
        if cached is None or cached[0] is not self.state:
            cached = self._flat_state = (self.state, FlatState.of(self.state))
        return cached[1]

    @property
    def module(self) -> Gemma4Text:
        return nnx.merge(self.graphdef, self.state)

    def num_params(self) -> int:
        return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(self.state))

    def logits(self, input_ids: Any, positions: Any = None, *, return_routed_experts: bool = False,
               **media: Any) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Full-sequence forward. input_ids: int (B, T) (or (T,)) -> float32 logits (B, T, V).

        return_routed_experts (MoE models): also return the router's top-k expert ids per token and MoE layer,
        int32 (B, T, L_moe, k), in the router's order (highest weight first) -> (logits, ids).

        positions: optional (B, T) int; a negative position marks a padding token that no other token attends to.
        media (numpy arrays, the HF processor's names): pixel_values (N, P, 3*patch**2) + image_position_ids
        (N, P, 2); pixel_values_videos (F, P, 3*patch**2) + video_position_ids (F, P, 2) [+ num_frames_per_video];
        input_features (A, T', mel) + input_features_mask (A, T'); mm_token_type_ids (B, T) (bidirectional
        attention inside images where the config asks for it). See multimodal.py.
        """
        media = {k: v for k, v in media.items() if v is not None}
        if media and not multimodal.has_towers(self.config):
            raise TypeError(
                f"{sorted(media)}: this model was loaded as text-only; multimodal inputs need the towers "
                "(a Gemma4ForConditionalGeneration checkpoint loaded with its vision/audio config)"
            )
        if return_routed_experts and not self.config.text.enable_moe_block:
            raise ValueError("return_routed_experts needs a mixture-of-experts model (config num_experts / "
                             "enable_moe_block); this model is dense and has no router")
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be an integer array of shape (B, T), got {ids.dtype} {ids.shape}")
        vocab = self.config.text.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"input_ids must lie in [0, {vocab}); got values in [{ids.min()}, {ids.max()}]")
        if positions is None:
            pos = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
        else:
            pos = np.asarray(positions, dtype=np.int32).reshape(ids.shape)
        inputs = TokenInputs(tokens=ids.astype(np.int32), positions=pos)
        if multimodal.has_towers(self.config):
            media_tokens, blocks = towers.media_inputs(self, ids, **media)
            inputs = inputs.replace(media=media_tokens, vision_blocks=blocks)
        if self.pipeline is not None:
            return self.pipeline.forward(inputs, self.attention, return_routed_experts)
        with jax.set_mesh(self.mesh):
            # Rows split over the data axis (when dp divides B): each data replica computes its own rows.
            inputs = inputs.replace(tokens=jax.device_put(inputs.tokens, sharding.batch_sharding(ids.shape, self.mesh)),
                                    positions=jax.device_put(pos, sharding.batch_sharding(pos.shape, self.mesh)))
            return _logits(self.static_graph, self.state, inputs, attention=self.attention,
                           return_routed=return_routed_experts)


def _abstract(cfg: ModelConfig, dtype: jnp.dtype, quant_plan: quant.QuantPlan | None = None,
              moe_backend: str = "xla") -> tuple[nnx.GraphDef, nnx.State]:
    plan = quant_plan or quant.QuantPlan()
    abstract = nnx.eval_shape(
        lambda: checkpoint.apply_quant_plan(multimodal.build_module(cfg, dtype, nnx.Rngs(0)), plan, moe_backend))
    return nnx.split(abstract)


def _sharding_of(mesh):
    """Where a parameter lives: its pipeline stage's sub-mesh (metadata set by `_place`), sharded by its logical
    axes inside the stage. Loading puts each tensor straight there (only that stage's devices get it)."""
    meshes = sharding.stage_meshes(mesh)

    def of(var: nnx.Variable) -> jax.sharding.Sharding:
        meta = var.get_metadata()
        return sharding.named_sharding(meta.get("logical_axes"), var.shape, meshes[meta.get("pipeline_stage", 0)])

    return of


def _place(cfg: ModelConfig, abstract_state: nnx.State, pp: int, tp: int, dp: int) -> jax.sharding.Mesh:
    """Check the layout against the config, build the mesh and tag every parameter with its pipeline stage."""
    sharding.validate(cfg.text, pp=pp, tp=tp, dp=dp)
    mesh = sharding.make_mesh(pp=pp, tp=tp, dp=dp)
    if pp > 1:
        stages = sharding.stage_layers(cfg.text.num_hidden_layers, pp)
        for path, var in nnx.to_flat_state(abstract_state):
            var.set_metadata(pipeline_stage=sharding.param_stage(path, stages))
    return mesh


def _make_model(cfg, graphdef, abstract_state, state, mesh, dt, attention: AttentionPlan, path=None) -> Model:
    stages = None
    if mesh.shape["pp"] > 1:
        stages = pipeline.Pipeline(cfg.text, graphdef, abstract_state, state, mesh)
    return Model(cfg, graphdef, state, mesh, dt, path=path, pipeline=stages, attention=attention)


def abstract_model(config: ModelConfig | str, dtype: Any = "bfloat16",
                   quant_plan: quant.QuantPlan | None = None) -> tuple[nnx.GraphDef, nnx.State]:
    """Shapes and dtypes of every parameter, with no memory (jax.eval_shape). `config` may be a preset name;
    `quant_plan` packs the modules it names (e.g. `quant.QuantPlan.experts_only(num_layers)`)."""
    cfg = preset(config) if isinstance(config, str) else config
    return _abstract(cfg, resolve_dtype(dtype), quant_plan)


def _random_packed(path: tuple, var: nnx.Variable, seed: int) -> jax.Array:
    """quant.random_packed for one packed parameter inside the init program, keyed by the parameter's path."""
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(_path_str(path).encode()) % (2**31))
    return quant.random_packed(str(path[-1]), var.shape, var.dtype, key)


def _path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def from_config(config: ModelConfig | str, dtype: Any = "bfloat16", seed: int = 0, pp: int = 1, tp: int = 1,
                dp: int = 1, moe_backend: str = "auto", attention_backend: str = "auto",
                quant_plan: quant.QuantPlan | None = None) -> Model:
    """A randomly initialised model from a ModelConfig or a preset name ('tiny', 'e2b', ...).
    attention_backend: what `Model.logits` runs (attention_backends.py); the engine takes its own choice.
    quant_plan: pack the modules it names with random packed values (e.g. `quant.QuantPlan.experts_only(L)`: the
    layout of an NVFP4-experts checkpoint, for benchmarks without a download); None = all in `dtype`."""
    cfg = preset(config) if isinstance(config, str) else config
    dt = resolve_dtype(dtype)
    attention = attention_backends.resolve_attention(attention_backend, log_choice=log.debug)
    plan = quant_plan or quant.QuantPlan()
    formats = plan.expert_formats(cfg.text.num_hidden_layers)
    backend = quant.resolve_moe_backend(moe_backend, cfg.text.enable_moe_block, formats)
    graphdef, abstract_state = _abstract(cfg, dt, plan, backend)
    mesh = _place(cfg, abstract_state, pp, tp, dp)
    of = _sharding_of(mesh)
    flat_abstract = list(nnx.to_flat_state(abstract_state))
    values = {}
    # One init program per stage, returning only that stage's parameters (XLA drops the rest), on its devices:
    # the same random values as pp=1, and no stage ever holds another's weights.
    for s in range(pp):
        paths = [p for p, v in flat_abstract if v.get_metadata().get("pipeline_stage", 0) == s]
        shardings = [of(v) for p, v in flat_abstract if v.get_metadata().get("pipeline_stage", 0) == s]

        @functools.partial(jax.jit, out_shardings=shardings)
        def init(paths=tuple(paths)):
            module = checkpoint.apply_quant_plan(multimodal.build_module(cfg, dt, nnx.Rngs(seed)), plan, backend)
            flat = dict(nnx.to_flat_state(nnx.split(module)[1]))
            packed = {p for p, _ in plan.linears} | {f"layers.{i}.moe.experts" for i, _ in plan.experts}
            out = []
            for p in paths:
                is_packed = any(_path_str(p).startswith(q + ".") or _path_str(p).startswith("model." + q + ".")
                                for q in packed)
                out.append(_random_packed(p, flat[p], seed) if is_packed else flat[p].get_value())
            return out

        with jax.set_mesh(sharding.stage_meshes(mesh)[s]):
            values.update(zip(paths, init(), strict=True))
    state = nnx.from_flat_state([(p, v.replace(values[p])) for p, v in flat_abstract])
    return _make_model(cfg, graphdef, abstract_state, state, mesh, dt, attention)


def from_pretrained(path: str | os.PathLike, dtype: Any = "bfloat16", pp: int = 1, tp: int = 1,
                    dp: int = 1, moe_backend: str = "auto", attention_backend: str = "auto") -> Model:
    """Load a Hugging Face Gemma 4 checkpoint directory (config.json + safetensors), or one written by
    `gemma4-jax convert` (orbax; restored straight into this layout, docs/convert.md).

    pp: pipeline stages, tp: tensor/expert parallel degree, dp: data parallel degree, over the first pp*dp*tp
    devices (docs/sharding.md). Each tensor goes from the file straight to its stage's devices, sharded.
    Quantized checkpoints (NVFP4, FP8) stay packed (docs/quantization.md). An MTP assistant checkpoint
    (`gemma4_assistant`) gives an `AssistantModel` (`load_assistant`). moe_backend: "auto", "xla" or
    "fp4_pallas" (NVFP4 experts only); an unusable choice raises QuantizationError before any weight is read.
    attention_backend: what `Model.logits` runs ("auto", "xla", or a registered kernel; attention_backends.py);
    an unusable choice raises ValueError before any weight is read. The engine resolves its own choice.
    """
    path = os.fspath(path)
    if _is_assistant(path):
        if pp != 1:
            raise ConfigError(f"{path}: an MTP assistant runs whole on one pipeline stage; pp={pp} is not supported "
                              "for it (the target may be pipelined)")
        return load_assistant(path, dtype=dtype, tp=tp, dp=dp, attention_backend=attention_backend)
    attention = attention_backends.resolve_attention(attention_backend, log_choice=log.debug)
    # A directory written by `gemma4-jax convert` (orbax_io.py): same model, parameters restored from orbax.
    meta = orbax_io.read_metadata(path) if orbax_io.looks_converted(path) else None
    cfg = load_config(path)
    dt = resolve_dtype(dtype)
    plan = checkpoint.quant_plan(path, cfg) if meta is None else orbax_io.plan_from_metadata(meta, path)
    formats = plan.expert_formats(cfg.text.num_hidden_layers)
    backend = quant.resolve_moe_backend(moe_backend, cfg.text.enable_moe_block, formats)
    graphdef, abstract_state = _abstract(cfg, dt, plan, backend)
    mesh = _place(cfg, abstract_state, pp, tp, dp)
    if meta is not None:
        state = orbax_io.restore_state(path, meta, abstract_state, _sharding_of(mesh), np.dtype(dt).name)
    else:
        state = checkpoint.load_state(path, cfg, abstract_state, _sharding_of(mesh), dt)
    return _make_model(cfg, graphdef, abstract_state, state, mesh, dt, attention, path=path)


# ----------------------------------------------------------------------------------------------------------------
# MTP assistants (drafters): docs/speculative.md


def _is_assistant(path: str) -> bool:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        return False
    try:
        with open(file) as f:
            return is_assistant_dict(json.load(f))
    except (OSError, json.JSONDecodeError):
        return False  # load_config reports it


@functools.partial(model_jit, static_argnames=("graph", "attention"))
def _assistant_step(graph: StaticGraph, state: nnx.State, token_embedding: jax.Array, hidden: jax.Array,
                    target_kv: TargetKV, position: jax.Array, *, attention: AttentionPlan) -> DraftOutput:
    return nnx.merge(graph.graphdef, state)(token_embedding, hidden, target_kv, position, attention)


class AssistantModel:
    """An MTP assistant ready to draft: config, mesh, graphdef and (sharded) state, as `Model`.

    Jitted callers merge `graphdef` / `state` (or take `static_graph`) and call `assistant.assistant_step` /
    `assistant.draft` with the target's embedding function and K/V; `step` is the same for one eager call."""

    def __init__(self, config: AssistantConfig, graphdef: nnx.GraphDef, state: nnx.State, mesh: jax.sharding.Mesh,
                 dtype: jnp.dtype, path: str | None = None, attention: AttentionPlan | None = None):
        self.config = config
        self.graphdef = graphdef
        self.static_graph = static_graph(graphdef)
        self.state = state
        self.mesh = mesh
        self.dtype = dtype
        self.path = path
        self.attention = attention or attention_backends.resolve_attention("auto", log_choice=log.debug)

    @property
    def module(self) -> Gemma4Assistant:
        return nnx.merge(self.graphdef, self.state)

    def num_params(self) -> int:
        return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(self.state))

    def check_target(self, target: Model | ModelConfig) -> dict[str, int]:
        """Refuse (ConfigError) a target this assistant cannot draft for; returns the target layers whose K/V it
        reads, {attention type: layer index}."""
        cfg = target.config if isinstance(target, Model) else target
        return check_target(self.config, cfg.text, where=self.path or "assistant")

    def step(self, token_embedding: Any, hidden: Any, target_kv: TargetKV, position: Any) -> DraftOutput:
        """One draft step (assistant.assistant_step) from the target's embedding of the token: token_embedding,
        hidden (B, D_t); target_kv: the target's K/V; position (B,) int. -> DraftOutput(logits (B, V), hidden)."""
        with jax.set_mesh(self.mesh):
            return _assistant_step(self.static_graph, self.state, jnp.asarray(token_embedding),
                                   jnp.asarray(hidden), target_kv, jnp.asarray(position, jnp.int32),
                                   attention=self.attention)


def _abstract_assistant(cfg: AssistantConfig, dtype: jnp.dtype, plan: quant.QuantPlan | None = None
                        ) -> tuple[nnx.GraphDef, nnx.State]:
    plan = plan or quant.QuantPlan()
    if plan.experts:
        raise ConfigError("an assistant has no experts, but the checkpoint has quantized expert tensors")
    if cfg.use_ordered_embeddings and any(p == "lm_head" for p, _ in plan.linears):
        raise ConfigError("a quantized lm_head with use_ordered_embeddings is not supported: the centroid-masked "
                          "head gathers rows of the head's weight; keep lm_head unquantized")
    abstract = nnx.eval_shape(
        lambda: checkpoint.apply_quant_plan(Gemma4Assistant(cfg, dtype=dtype, rngs=nnx.Rngs(0)), plan))
    return nnx.split(abstract)


def abstract_assistant(config: AssistantConfig | str, dtype: Any = "bfloat16") -> tuple[nnx.GraphDef, nnx.State]:
    """Shapes and dtypes of an assistant's parameters with no memory; `config` may be a preset name
    ('e2b-assistant', 'e4b-assistant', '26b-a4b-assistant', '31b-assistant', 'tiny-assistant')."""
    cfg = assistant_preset(config) if isinstance(config, str) else config
    return _abstract_assistant(cfg, resolve_dtype(dtype))


def _assistant_mesh(cfg: AssistantConfig, tp: int, dp: int, mesh: jax.sharding.Mesh | None) -> jax.sharding.Mesh:
    if mesh is not None:
        if mesh.shape["pp"] != 1:
            raise ConfigError(f"an assistant runs on one pipeline stage; given a mesh with pp={mesh.shape['pp']}, "
                              "pass one stage's sub-mesh (sharding.stage_meshes(mesh)[s])")
        sharding.validate(cfg.text, pp=1, tp=mesh.shape["tp"], dp=mesh.shape["dp"])
        return mesh
    sharding.validate(cfg.text, pp=1, tp=tp, dp=dp)
    return sharding.make_mesh(pp=1, tp=tp, dp=dp)


def assistant_from_config(config: AssistantConfig | str, dtype: Any = "bfloat16", seed: int = 0, tp: int = 1,
                          dp: int = 1, mesh: jax.sharding.Mesh | None = None,
                          attention_backend: str = "auto") -> AssistantModel:
    """A randomly initialised assistant from an AssistantConfig or a preset name (token_ordering: the identity).
    mesh: place it on this (pp=1) mesh instead of a new (1, dp, tp) one, e.g. the target's."""
    cfg = assistant_preset(config) if isinstance(config, str) else config
    dt = resolve_dtype(dtype)
    attention = attention_backends.resolve_attention(attention_backend, log_choice=log.debug)
    graphdef, abstract_state = _abstract_assistant(cfg, dt)
    mesh = _assistant_mesh(cfg, tp, dp, mesh)
    of = _sharding_of(mesh)
    flat_abstract = list(nnx.to_flat_state(abstract_state))

    @functools.partial(jax.jit, out_shardings=[of(v) for _, v in flat_abstract])
    def init():
        flat = dict(nnx.to_flat_state(nnx.split(Gemma4Assistant(cfg, dtype=dt, rngs=nnx.Rngs(seed)))[1]))
        return [flat[p].get_value() for p, _ in flat_abstract]

    with jax.set_mesh(mesh):
        values = init()
    state = nnx.from_flat_state([(p, v.replace(x)) for (p, v), x in zip(flat_abstract, values, strict=True)])
    return AssistantModel(cfg, graphdef, state, mesh, dt, attention=attention)


def load_assistant(path: str | os.PathLike, dtype: Any = "bfloat16", tp: int = 1, dp: int = 1,
                   mesh: jax.sharding.Mesh | None = None, target: Model | ModelConfig | None = None,
                   attention_backend: str = "auto") -> AssistantModel:
    """Load an MTP assistant checkpoint directory (HF `Gemma4AssistantForCausalLM`: config.json + safetensors,
    bf16 / float32 or the quantized formats `from_pretrained` reads) through the same key table and loader.

    tp / dp: its own (1, dp, tp) mesh, or `mesh` (e.g. the target's). target: checked now (hidden size, vocabulary,
    the K/V shapes of the target layers it reads), ConfigError otherwise. token_ordering must be a permutation of
    the vocabulary (CheckpointError otherwise)."""
    path = os.fspath(path)
    cfg = load_assistant_config(path)
    if target is not None:
        check_target(cfg, (target.config if isinstance(target, Model) else target).text, where=path)
    if orbax_io.looks_converted(path):
        raise checkpoint.CheckpointError(f"{path}: `gemma4-jax convert` output is read for target models only; load "
                                         "the assistant from its Hugging Face directory")
    attention = attention_backends.resolve_attention(attention_backend, log_choice=log.debug)
    dt = resolve_dtype(dtype)
    graphdef, abstract_state = _abstract_assistant(cfg, dt, checkpoint.quant_plan(path, cfg))
    mesh = _assistant_mesh(cfg, tp, dp, mesh)
    state = checkpoint.load_state(path, cfg, abstract_state, _sharding_of(mesh), dt)
    if cfg.use_ordered_embeddings:
        ordering = np.asarray(state["masked_embedding"]["token_ordering"].get_value())
        if not np.array_equal(np.sort(ordering), np.arange(cfg.text.vocab_size)):
            raise checkpoint.CheckpointError(f"{path}: masked_embedding.token_ordering is not a permutation of the "
                                             f"{cfg.text.vocab_size} token ids")
    return AssistantModel(cfg, graphdef, state, mesh, dt, path=path, attention=attention)
