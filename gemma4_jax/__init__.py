"""gemma4-jax: Gemma 4 in JAX/Flax, exact against Hugging Face transformers.

Public surface (kept small on purpose):
    from_pretrained(path, dtype="bfloat16", pp=1, tp=1) -> Model     # HF checkpoint dir
    from_config(config_or_preset, dtype=..., seed=0) -> Model        # random weights
    abstract_model(config_or_preset, dtype=...) -> (graphdef, state) # shapes only, no memory
    Model.logits(input_ids) -> (B, T, V) float32
    LLM(path, dtype=..., **engine_options).generate(prompts, SamplingParams(...)) / .chat(conversations, ...)
    load_config, preset, PRESETS, ModelConfig, TextConfig, ConfigError, CheckpointError
"""

from gemma4_jax.checkpoint import CheckpointError
from gemma4_jax.config import PRESETS, ConfigError, ModelConfig, TextConfig, load_config, preset
from gemma4_jax.llm import LLM
from gemma4_jax.model import Model, abstract_model, from_config, from_pretrained
from gemma4_jax.serving.sampling import SamplingParams

__all__ = [
    "PRESETS",
    "LLM",
    "CheckpointError",
    "ConfigError",
    "Model",
    "ModelConfig",
    "SamplingParams",
    "TextConfig",
    "abstract_model",
    "from_config",
    "from_pretrained",
    "load_config",
    "preset",
]
__version__ = "0.1.0"
