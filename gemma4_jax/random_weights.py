"""Random weights for real-size presets, made fast: for benchmarks and device checks without a download.

`from_config` initialises every parameter with its own initialiser inside one jitted program per pipeline stage;
at real size (E4B's 8B parameters over ~1,000 arrays, 26B-A4B, 31B) that program takes minutes to compile on a GPU
(run 1 of the first device check did not finish E4B in 150 s). `random_model` instead calls one small jitted
generator per distinct (shape, dtype, kind) once per parameter, each with its own key: E4B's 15 GB of weights in
~12 s on an H200. The values are not `from_config`'s (no per-module initialisers): float weights N(0, 0.02), which
keeps activations finite through every layer (norm weights too: Gemma's norms scale by 1 + w); packed NVFP4/FP8
parameters by `quant.random_packed` (NVFP4 codes uniform, block scales ~K^-0.5 / 2.2).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gemma4_jax import model as model_lib
from gemma4_jax import quant
from gemma4_jax.attention_backends import resolve_attention
from gemma4_jax.config import ModelConfig, preset

EXPERT_FORMATS = ("bf16", "nvfp4", "fp8")


def random_model(
    config: ModelConfig | str,
    dtype: Any = "bfloat16",
    experts: str = "bf16",
    seed: int = 0,
    moe_backend: str = "auto",
    attention_backend: str = "auto",
) -> model_lib.Model:
    """A one-device model of `config` (a ModelConfig or preset name) with random weights (module docstring).

    experts: "bf16" (the experts in `dtype`), "nvfp4" or "fp8" (every MoE layer's experts packed, the layout of an
    experts-only quantized checkpoint); refused for a model without experts. Built from the facade's own parts
    (model._abstract, _place, _make_model), so the result is an ordinary `Model`."""
    cfg = preset(config) if isinstance(config, str) else config
    if experts not in EXPERT_FORMATS:
        raise ValueError(f"experts must be one of {EXPERT_FORMATS}, got {experts!r}")
    plan = quant.QuantPlan()
    if experts != "bf16":
        if not cfg.text.enable_moe_block:
            raise ValueError(f"experts={experts!r} needs a MoE model; this config has no experts")
        fmt = quant.NVFP4 if experts == "nvfp4" else quant.FP8
        plan = quant.QuantPlan.experts_only(cfg.text.num_hidden_layers, fmt)
    dt = model_lib.resolve_dtype(dtype)
    backend = quant.resolve_moe_backend(
        moe_backend, cfg.text.enable_moe_block, plan.expert_formats(cfg.text.num_hidden_layers)
    )
    graphdef, abstract = model_lib._abstract(cfg, dt, plan, backend)
    mesh = model_lib._place(cfg, abstract, 1, 1, 1)
    of = model_lib._sharding_of(mesh)
    makers: dict = {}

    def maker(kind: str, shape, dtype, where):
        key = (kind, shape, jnp.dtype(dtype).name)
        if key not in makers:

            def make(k):
                if kind in quant.PACKED_PARAMS:
                    return quant.random_packed(kind, shape, dtype, k)
                if kind == "ones":
                    return jnp.ones(shape, dtype)
                return (jax.random.normal(k, shape, jnp.float32) * 0.02).astype(dtype)

            makers[key] = jax.jit(make, out_shardings=where)
        return makers[key]

    root = jax.random.key(seed)
    values = []
    for i, (path, var) in enumerate(nnx.to_flat_state(abstract)):
        name = str(path[-1])
        if name in quant.PACKED_PARAMS:  # a QuantLinear's arrays
            kind = name
        elif jnp.issubdtype(var.dtype, jnp.integer) or var.dtype == jnp.bool_:
            kind = "ones"
        else:
            kind = "normal"
        value = maker(kind, tuple(var.shape), var.dtype, of(var))(jax.random.fold_in(root, i))
        values.append((path, var.replace(value)))
    state = nnx.from_flat_state(values)
    attention = resolve_attention(attention_backend, log_choice=lambda _: None)
    return model_lib._make_model(cfg, graphdef, abstract, state, mesh, dt, attention)
