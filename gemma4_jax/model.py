"""The user-facing model: build from a checkpoint directory, a config or a preset; run full-sequence logits.

`Model` keeps the split form that jitted code wants (`graphdef`, `state`) next to the config and the mesh; the nnx
module is rebuilt from them on demand (`module`). Step functions are pure functions of (state, inputs).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma4_jax import attention_backends, checkpoint, multimodal, orbax_io, pipeline, quant, sharding, towers
from gemma4_jax.attention_backends import AttentionPlan
from gemma4_jax.config import ModelConfig, load_config, preset
from gemma4_jax.decoder import Gemma4Text
from gemma4_jax.forward import TokenInputs, forward

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def resolve_dtype(dtype: Any, platform: str | None = None) -> jnp.dtype:
    """A dtype name or numpy/jax dtype -> the parameter and activation dtype.

    "auto" (vLLM's name) picks per platform: float32 on CPU, where XLA's bfloat16 dots run 3-7x slower than its
    float32 ones (docs/benchmarks.md), and bfloat16 (Gemma 4's checkpoint dtype) on accelerators."""
    if isinstance(dtype, str):
        if dtype == "auto":
            return jnp.dtype(jnp.float32 if (platform or jax.default_backend()) == "cpu" else jnp.bfloat16)
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


@functools.partial(jax.jit, static_argnames=("graph", "attention", "return_routed"))
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


def from_config(config: ModelConfig | str, dtype: Any = "bfloat16", seed: int = 0, pp: int = 1, tp: int = 1,
                dp: int = 1, moe_backend: str = "auto", attention_backend: str = "auto") -> Model:
    """A randomly initialised model from a ModelConfig or a preset name ('tiny', 'e2b', ...).
    attention_backend: what `Model.logits` runs (attention_backends.py); the engine takes its own choice."""
    cfg = preset(config) if isinstance(config, str) else config
    dt = resolve_dtype(dtype)
    attention = attention_backends.resolve_attention(attention_backend, log_choice=log.debug)
    backend = quant.resolve_moe_backend(moe_backend, cfg.text.enable_moe_block, {None})
    graphdef, abstract_state = _abstract(cfg, dt, None, backend)
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
            flat = dict(nnx.to_flat_state(nnx.split(multimodal.build_module(cfg, dt, nnx.Rngs(seed)))[1]))
            return [flat[p].get_value() for p in paths]

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
    Quantized checkpoints (NVFP4, FP8) stay packed (docs/quantization.md). moe_backend: "auto", "xla" or
    "fp4_pallas" (NVFP4 experts only); an unusable choice raises QuantizationError before any weight is read.
    attention_backend: what `Model.logits` runs ("auto", "xla", or a registered kernel; attention_backends.py);
    an unusable choice raises ValueError before any weight is read. The engine resolves its own choice.
    """
    path = os.fspath(path)
    attention = attention_backends.resolve_attention(attention_backend, log_choice=log.debug)
    # A directory written by `gemma4-jax convert` (orbax_io.py): same model, parameters restored from orbax.
    meta = orbax_io.read_metadata(path) if orbax_io.looks_converted(path) else None
    cfg = load_config(path)
    dt = resolve_dtype(dtype)
    plan = checkpoint.quant_plan(path, cfg) if meta is None else orbax_io.plan_from_metadata(meta, path)
    formats = {plan.expert_format(i) for i in range(cfg.text.num_hidden_layers)}
    backend = quant.resolve_moe_backend(moe_backend, cfg.text.enable_moe_block, formats)
    graphdef, abstract_state = _abstract(cfg, dt, plan, backend)
    mesh = _place(cfg, abstract_state, pp, tp, dp)
    if meta is not None:
        state = orbax_io.restore_state(path, meta, abstract_state, _sharding_of(mesh), np.dtype(dt).name)
    else:
        state = checkpoint.load_state(path, cfg, abstract_state, _sharding_of(mesh), dt)
    return _make_model(cfg, graphdef, abstract_state, state, mesh, dt, attention, path=path)
