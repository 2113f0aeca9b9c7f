"""gemma4-jax: Gemma 4 in JAX/Flax, exact against Hugging Face transformers.

Public surface (kept small on purpose):
    from_pretrained(path, dtype="bfloat16", pp=1, tp=1) -> Model     # HF checkpoint dir
    from_config(config_or_preset, dtype=..., seed=0) -> Model        # random weights
    abstract_model(config_or_preset, dtype=...) -> (graphdef, state) # shapes only, no memory
    Model.logits(input_ids) -> (B, T, V) float32
    LLM(path, dtype=..., **engine_options).generate(prompts, SamplingParams(...)) / .chat(conversations, ...)
    load_config, preset, PRESETS, ModelConfig, TextConfig, ConfigError, CheckpointError

Names are imported on first use (PEP 562), so `import gemma4_jax.config` loads the config layer alone and the
package's layers stay importable bottom-up (docs/architecture.md); `LLM` and `SamplingParams` come from the
serving layer, the rest from the model facade and below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from gemma4_jax.version import __version__

_EXPORTS = {
    "PRESETS": "gemma4_jax.config",
    "ConfigError": "gemma4_jax.config",
    "ModelConfig": "gemma4_jax.config",
    "TextConfig": "gemma4_jax.config",
    "load_config": "gemma4_jax.config",
    "preset": "gemma4_jax.config",
    "CheckpointError": "gemma4_jax.checkpoint",
    "Model": "gemma4_jax.model",
    "abstract_model": "gemma4_jax.model",
    "from_config": "gemma4_jax.model",
    "from_pretrained": "gemma4_jax.model",
    "LLM": "gemma4_jax.serving.llm",
    "SamplingParams": "gemma4_jax.serving.sampling",
}

__all__ = [
    "LLM", "PRESETS", "CheckpointError", "ConfigError", "Model", "ModelConfig", "SamplingParams", "TextConfig",
    "__version__", "abstract_model", "from_config", "from_pretrained", "load_config", "preset",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from gemma4_jax.checkpoint import CheckpointError
    from gemma4_jax.config import PRESETS, ConfigError, ModelConfig, TextConfig, load_config, preset
    from gemma4_jax.model import Model, abstract_model, from_config, from_pretrained
    from gemma4_jax.serving.llm import LLM
    from gemma4_jax.serving.sampling import SamplingParams


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gemma4_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
