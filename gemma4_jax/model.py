"""The user-facing model: build from a checkpoint directory, a config or a preset; run full-sequence logits.

`Model` keeps the split form that jitted code wants (`graphdef`, `state`) next to the config and the mesh; the nnx
module is rebuilt from them on demand (`module`). Step functions are pure functions of (state, inputs).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma4_jax import checkpoint, sharding
from gemma4_jax.config import ModelConfig, load_config, preset
from gemma4_jax.decoder import Gemma4Text

_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def resolve_dtype(dtype: Any) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; choose one of {sorted(_DTYPES)}")
        return jnp.dtype(_DTYPES[dtype])
    d = jnp.dtype(dtype)
    if d not in [jnp.dtype(v) for v in _DTYPES.values()]:
        raise ValueError(f"dtype {d} is not supported; choose one of {sorted(_DTYPES)}")
    return d


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, state)
    return model(input_ids, positions)


class Model:
    """A Gemma 4 model ready to run: config, mesh, graphdef and (sharded) state."""

    def __init__(self, config: ModelConfig, graphdef: nnx.GraphDef, state: nnx.State, mesh: jax.sharding.Mesh,
                 dtype: jnp.dtype, path: str | None = None):
        self.config = config
        self.graphdef = graphdef
        self.state = state
        self.mesh = mesh
        self.dtype = dtype
        self.path = path

    @property
    def module(self) -> Gemma4Text:
        return nnx.merge(self.graphdef, self.state)

    def num_params(self) -> int:
        return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(self.state))

    def logits(self, input_ids: Any, positions: Any = None, **multimodal: Any) -> jax.Array:
        """Full-sequence forward. input_ids: int (B, T) (or (T,)) -> float32 logits (B, T, V).

        positions: optional (B, T) int; a negative position marks a padding token that no other token attends to.
        """
        if multimodal:
            raise TypeError(
                f"{sorted(multimodal)}: this model was loaded as text-only; multimodal inputs need the towers "
                "(a Gemma4ForConditionalGeneration checkpoint loaded with its vision/audio config)"
            )
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
        with jax.set_mesh(self.mesh):
            return _forward(self.graphdef, self.state, jnp.asarray(ids, jnp.int32), jnp.asarray(pos))


def _abstract(cfg: ModelConfig, dtype: jnp.dtype) -> tuple[nnx.GraphDef, nnx.State]:
    abstract = nnx.eval_shape(lambda: Gemma4Text(cfg.text, dtype=dtype, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)


def _sharding_of(mesh):
    def of(var: nnx.Variable) -> jax.sharding.Sharding:
        return sharding.named_sharding(var.get_metadata().get("logical_axes"), var.shape, mesh)

    return of


def abstract_model(config: ModelConfig | str, dtype: Any = "bfloat16") -> tuple[nnx.GraphDef, nnx.State]:
    """Shapes and dtypes of every parameter, with no memory (jax.eval_shape). `config` may be a preset name."""
    cfg = preset(config) if isinstance(config, str) else config
    return _abstract(cfg, resolve_dtype(dtype))


def from_config(config: ModelConfig | str, dtype: Any = "bfloat16", seed: int = 0, pp: int = 1, tp: int = 1) -> Model:
    """A randomly initialised model from a ModelConfig or a preset name ('tiny', 'e2b', ...)."""
    cfg = preset(config) if isinstance(config, str) else config
    dt = resolve_dtype(dtype)
    mesh = sharding.make_mesh(pp=pp, tp=tp)
    graphdef, abstract_state = _abstract(cfg, dt)
    shardings = jax.tree.map(_sharding_of(mesh), abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))

    @functools.partial(jax.jit, out_shardings=shardings)
    def init():
        return nnx.split(Gemma4Text(cfg.text, dtype=dt, rngs=nnx.Rngs(seed)))[1]

    with jax.set_mesh(mesh):
        state = init()
    return Model(cfg, graphdef, state, mesh, dt)


def from_pretrained(path: str | os.PathLike, dtype: Any = "bfloat16", pp: int = 1, tp: int = 1) -> Model:
    """Load a Hugging Face Gemma 4 checkpoint directory (config.json + safetensors)."""
    path = os.fspath(path)
    cfg = load_config(path)
    dt = resolve_dtype(dtype)
    mesh = sharding.make_mesh(pp=pp, tp=tp)
    graphdef, abstract_state = _abstract(cfg, dt)
    state = checkpoint.load_state(path, cfg, abstract_state, _sharding_of(mesh), dt)
    return Model(cfg, graphdef, state, mesh, dt, path=path)
