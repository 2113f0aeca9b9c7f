"""The checkpoint key tables (loading layer): HF key pattern -> parameter path + transform, for the text decoder
and each tower, and `map_key` over all of them. Plain data read by checkpoint.py; nothing registers itself.

A rule's transform turns the HF tensor into our layout (nn.Linear (out, in) -> einsum kernel in_shape + out_shape,
fused experts (E, out, in) -> (E, in, out), convolutions to channels-last) and `hf_shape` gives the HF shape a
parameter of a target shape must come from, so a wrong shape is reported by name before anything is placed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

import numpy as np

from gemma4_jax.config import ModelConfig

AUDIO_PARAM_PREFIX = "audio"  # the multimodal module's attribute holding the audio tower and embedder



def _identity(w: np.ndarray, target: tuple[int, ...]) -> np.ndarray:
    return w


def _identity_shape(target: tuple[int, ...]) -> tuple[int, ...]:
    return target


def _linear(w: np.ndarray, target: tuple[int, ...]) -> np.ndarray:
    """HF nn.Linear weight (out_flat, in_flat) -> kernel in_shape + out_shape (target)."""
    return np.ascontiguousarray(w.T).reshape(target)


def _linear_shape(target: tuple[int, ...], n_in: int = 1) -> tuple[int, ...]:
    return (math.prod(target[n_in:]), math.prod(target[:n_in]))


def _experts(w: np.ndarray, target: tuple[int, ...]) -> np.ndarray:
    """HF fused experts (E, out, in) -> (E, in, out)."""
    return np.ascontiguousarray(np.swapaxes(w, 1, 2))


def _experts_shape(target: tuple[int, ...]) -> tuple[int, ...]:
    return (target[0], target[2], target[1])


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: re.Pattern
    path: str  # parameter path template, "." separated, {0} = first regex group
    transform: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


def rule(pattern: str, path: str, kind: str = "identity", n_in: int = 1) -> Rule:
    kinds = {
        "identity": (_identity, _identity_shape),
        "linear": (_linear, lambda t: _linear_shape(t, n_in)),
        "experts": (_experts, _experts_shape),
    }
    transform, shape = kinds[kind]
    return Rule(re.compile(pattern + r"$"), path, transform, shape)


LAYER_PREFIX = _L = r"layers\.(\d+)\."  # a decoder layer's keys; {0} of the path templates
TEXT_RULES: tuple[Rule, ...] = (
    rule(r"embed_tokens\.weight", "embed_tokens.embedding"),
    rule(r"embed_tokens_per_layer\.weight", "embed_tokens_per_layer.embedding"),
    rule(r"per_layer_model_projection\.weight", "per_layer_model_projection.kernel", "linear"),
    rule(r"per_layer_projection_norm\.weight", "per_layer_projection_norm.weight"),
    rule(r"norm\.weight", "norm.weight"),
    rule(r"lm_head\.weight", "lm_head.kernel", "linear"),
    rule(_L + r"self_attn\.(q|k|v)_proj\.weight", "layers.{0}.self_attn.{1}_proj.kernel", "linear"),
    rule(_L + r"self_attn\.o_proj\.weight", "layers.{0}.self_attn.o_proj.kernel", "linear", n_in=2),
    rule(_L + r"self_attn\.(q|k)_norm\.weight", "layers.{0}.self_attn.{1}_norm.weight"),
    rule(_L + r"mlp\.(gate|up|down)_proj\.weight", "layers.{0}.mlp.{1}_proj.kernel", "linear"),
    rule(_L + r"(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|post_feedforward_layernorm"
          r"|post_feedforward_layernorm_1|post_per_layer_input_norm)\.weight", "layers.{0}.{1}.weight"),
    rule(_L + r"(per_layer_input_gate|per_layer_projection)\.weight", "layers.{0}.{1}.kernel", "linear"),
    rule(_L + r"layer_scalar", "layers.{0}.layer_scalar"),
    rule(_L + r"router\.proj\.weight", "layers.{0}.moe.router.proj.kernel", "linear"),
    rule(_L + r"router\.(scale|per_expert_scale)", "layers.{0}.moe.router.{1}"),
    rule(_L + r"experts\.(gate_up_proj|down_proj)", "layers.{0}.moe.experts.{1}", "experts"),
    rule(_L + r"(pre_feedforward_layernorm_2|post_feedforward_layernorm_2)\.weight", "layers.{0}.moe.{1}.weight"),
)

# The MTP assistant's own modules (Gemma4AssistantForCausalLM, keys without a prefix); its decoder is TEXT_RULES.
ASSISTANT_RULES: tuple[Rule, ...] = (
    rule(r"(pre_projection|post_projection)\.weight", "{0}.kernel", "linear"),
    rule(r"masked_embedding\.centroids\.weight", "masked_embedding.centroids.kernel", "linear"),
    rule(r"masked_embedding\.token_ordering", "masked_embedding.token_ordering"),
)

_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.", "")
TOWER_PREFIXES = _TOWER_PREFIXES = (
    "model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.",
    "vision_tower.", "audio_tower.", "embed_vision.", "embed_audio.", "multi_modal_projector.")
_VISION_PREFIXES = ("model.vision_tower.", "model.embed_vision.", "vision_tower.", "embed_vision.")
_AUDIO_PREFIXES = ("model.audio_tower.", "model.embed_audio.", "audio_tower.", "embed_audio.")


def strip_prefix(key: str) -> str:
    if key == "lm_head.weight":
        return key
    for prefix in _TEXT_PREFIXES:
        if prefix and key.startswith(prefix):
            return key[len(prefix):]
    return key


def ignored(key: str, cfg: ModelConfig) -> str | None:
    """Why a checkpoint tensor is knowingly not loaded, or None."""
    text = cfg.text
    if key.startswith(_TOWER_PREFIXES):
        if getattr(cfg, "vision", None) is not None and key.startswith(_VISION_PREFIXES):
            return None  # the model has a vision tower: a vision key that no rule maps is unexpected
        if getattr(cfg, "audio", None) is not None and key.startswith(_AUDIO_PREFIXES):
            return None  # the model has an audio tower: an audio key that no rule maps is unexpected
        return "multimodal tower (text-only load)"
    short = strip_prefix(key)
    if short == "lm_head.weight" and text.tie_word_embeddings:
        return "tied LM head"
    if "rotary_emb" in short:
        return "rotary buffers"
    m = re.match(_L + r"self_attn\.(k_proj|v_proj|k_norm|v_norm)\.", short)
    if m and text.layers[int(m.group(1))].is_kv_shared:
        return "K/V weights of a KV-shared layer (HF ignores them too)"
    return None


def map_key(key: str) -> tuple[str, Rule] | None:
    """HF key -> (parameter path, rule), or None when no rule matches."""
    if key.startswith(_TOWER_PREFIXES):  # a tower key nobody maps (or a text-only load) is judged by `ignored`
        return map_vision_key(key) or map_audio_key(key)
    short = strip_prefix(key)
    for r in TEXT_RULES + ASSISTANT_RULES:
        m = r.pattern.match(short)
        if m:
            return r.path.format(*m.groups()), r
    return None


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint table: HF keys under `model.vision_tower.` / `model.embed_vision.` -> parameter paths.

_VL = r"encoder\.layers\.(\d+)\."
_VISION_RULES = (
    rule(r"patch_embedder\.input_proj\.weight", "vision_tower.patch_embedder.input_proj.kernel",
                     "linear"),
    rule(r"patch_embedder\.position_embedding_table",
                     "vision_tower.patch_embedder.position_embedding_table"),
    rule(r"(std_bias|std_scale)", "vision_tower.{0}"),
    rule(_VL + r"self_attn\.(q|k|v)_proj\.linear\.weight",
                     "vision_tower.encoder.layers.{0}.self_attn.{1}_proj.linear.kernel", "linear"),
    rule(_VL + r"self_attn\.o_proj\.linear\.weight",
                     "vision_tower.encoder.layers.{0}.self_attn.o_proj.linear.kernel", "linear", n_in=2),
    rule(_VL + r"(self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)\."
                     r"(input_min|input_max|output_min|output_max)",
                     "vision_tower.encoder.layers.{0}.{1}.{2}"),
    rule(_VL + r"self_attn\.(q|k)_norm\.weight",
                     "vision_tower.encoder.layers.{0}.self_attn.{1}_norm.weight"),
    rule(_VL + r"mlp\.(gate|up|down)_proj\.linear\.weight",
                     "vision_tower.encoder.layers.{0}.mlp.{1}_proj.linear.kernel", "linear"),
    rule(_VL + r"(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm"
                     r"|post_feedforward_layernorm)\.weight", "vision_tower.encoder.layers.{0}.{1}.weight"),
)
_EMBED_VISION_RULES = (
    rule(r"embedding_projection\.weight", "embed_vision.embedding_projection.kernel", "linear"),
)
_VISION_HF_PREFIXES = {"model.vision_tower.": _VISION_RULES, "vision_tower.": _VISION_RULES,
                "model.embed_vision.": _EMBED_VISION_RULES, "embed_vision.": _EMBED_VISION_RULES}


def map_vision_key(key: str) -> tuple[str, Rule] | None:
    """HF vision key -> (parameter path, rule), or None for a key this table does not know."""
    for prefix, rules in _VISION_HF_PREFIXES.items():
        if key.startswith(prefix):
            short = key[len(prefix):]
            for r in rules:
                m = r.pattern.match(short)
                if m:
                    return r.path.format(*m.groups()), r
            return None
    return None


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint keys: HF `model.audio_tower.*` / `model.embed_audio.*` -> `audio.tower.*` / `audio.embedder.*`


def _conv2d(w: np.ndarray, target: tuple[int, ...]) -> np.ndarray:
    """HF Conv2d weight (O, I, kh, kw) -> (kh, kw, I, O)."""
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def _depthwise(w: np.ndarray, target: tuple[int, ...]) -> np.ndarray:
    """HF depthwise Conv1d weight (D, 1, K) -> (K, D)."""
    return np.ascontiguousarray(w[:, 0, :].T)


def _audio_rule(pattern: str, path: str, kind: str = "identity", n_in: int = 1) -> Rule:
    if kind == "conv2d":
        return Rule(re.compile(pattern + "$"), path, _conv2d, lambda t: (t[3], t[2], t[0], t[1]))
    if kind == "depthwise":
        return Rule(re.compile(pattern + "$"), path, _depthwise, lambda t: (t[1], 1, t[0]))
    return rule(pattern, path, kind, n_in)


_AL = r"tower\.layers\.(\d+)\."
_CLIPPED = (r"(feed_forward[12]\.ffw_layer_[12]|self_attn\.[qkv]_proj|self_attn\.post"
            r"|lconv1d\.linear_start|lconv1d\.linear_end)")
AUDIO_RULES: tuple[Rule, ...] = (
    _audio_rule(r"tower\.subsample_conv_projection\.(layer[01])\.conv\.weight",
                "tower.subsample_conv_projection.{0}.conv.kernel", "conv2d"),
    _audio_rule(r"tower\.subsample_conv_projection\.(layer[01])\.norm\.weight",
                "tower.subsample_conv_projection.{0}.norm.weight"),
    _audio_rule(r"tower\.subsample_conv_projection\.input_proj_linear\.weight",
                "tower.subsample_conv_projection.input_proj_linear.kernel", "linear"),
    _audio_rule(_AL + r"self_attn\.post\.linear\.weight", "tower.layers.{0}.self_attn.post.linear.kernel", "linear",
                n_in=2),
    _audio_rule(_AL + _CLIPPED + r"\.linear\.weight", "tower.layers.{0}.{1}.linear.kernel", "linear"),
    _audio_rule(_AL + _CLIPPED + r"\.(input_min|input_max|output_min|output_max)", "tower.layers.{0}.{1}.{2}"),
    _audio_rule(_AL + r"self_attn\.relative_k_proj\.weight", "tower.layers.{0}.self_attn.relative_k_proj.kernel",
                "linear"),
    _audio_rule(_AL + r"self_attn\.per_dim_scale", "tower.layers.{0}.self_attn.per_dim_scale"),
    _audio_rule(_AL + r"lconv1d\.depthwise_conv1d\.weight", "tower.layers.{0}.lconv1d.depthwise_conv1d.kernel",
                "depthwise"),
    _audio_rule(_AL + r"((?:feed_forward[12]|lconv1d)\.\w+_norm|norm_pre_attn|norm_post_attn|norm_out)\.weight",
                "tower.layers.{0}.{1}.weight"),
    _audio_rule(r"tower\.output_proj\.weight", "tower.output_proj.kernel", "linear"),
    _audio_rule(r"tower\.output_proj\.bias", "tower.output_proj.bias"),
    _audio_rule(r"embedder\.embedding_projection\.weight", "embedder.embedding_projection.kernel", "linear"),
)

_AUDIO_HF_PREFIXES = {"model.audio_tower.": "tower.", "audio_tower.": "tower.", "model.embed_audio.": "embedder.",
                "embed_audio.": "embedder."}


def map_audio_key(key: str) -> tuple[str, Rule] | None:
    """HF audio key -> (parameter path under AUDIO_PARAM_PREFIX, rule), or None for a key this table does not know."""
    for prefix, ours in _AUDIO_HF_PREFIXES.items():
        if key.startswith(prefix):
            short = ours + key[len(prefix):]
            break
    else:
        return None
    for r in AUDIO_RULES:
        m = r.pattern.match(short)
        if m:
            return f"{AUDIO_PARAM_PREFIX}." + r.path.format(*m.groups()), r
    return None
