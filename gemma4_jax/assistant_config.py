"""Configuration of the MTP assistant (drafter) models, `gemma4_assistant` (HF `Gemma4AssistantForCausalLM`),
parsed and validated in one place.

An assistant is a small Gemma 4 decoder whose every layer is KV-shared: it owns no K/V and attends to the K/V that
the *target* stored in its last sliding and last full-attention layer (`target_kv_layers`). HF encodes this as
`num_kv_shared_layers == num_hidden_layers`, which its own `Gemma4TextConfig.kv_sharing_modes` cannot express (it
raises when no layer produces a cache); here every layer becomes a "reuse" layer whose source is the target
(`kv_source_layer == TARGET_KV_SOURCE`), and the target-side facts are checked against the target's config by
`check_target`.

Validated as HF's `Gemma4AssistantConfig.validate_architecture` does (no per-layer embeddings, no MoE, no double-wide
MLP, all layers shared), with errors that name the field; HF's defaults apply to absent fields, so a config that HF
refuses is refused here too. Presets with the real sizes (`e2b-assistant` ... `31b-assistant`) and a `tiny-assistant`
that drafts for the `tiny` text preset go through the same parser.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from gemma4_jax.config import FULL, SLIDING, TextConfig, read_config_json, text_config_from_dict
from gemma4_jax.errors import ConfigError

ASSISTANT_MODEL_TYPE = "gemma4_assistant"
ASSISTANT_ARCHITECTURES = ("Gemma4AssistantForCausalLM",)
# kv_source_layer of an assistant layer: not a layer of this model but the target's last layer of the same kind.
TARGET_KV_SOURCE = -1
# HF Gemma4TextConfig defaults of the fields the assistant must set to 0 (absent = HF's default = refused).
_HF_TEXT_DEFAULTS = {"hidden_size_per_layer_input": 256, "vocab_size_per_layer_input": 262144}


@dataclasses.dataclass(frozen=True)
class AssistantConfig:
    """An assistant checkpoint. Hashable (a static argument of jitted draft steps).

    text: the assistant's decoder; every LayerSpec has kv_sharing "reuse" and kv_source_layer TARGET_KV_SOURCE,
    its head_dim / num_kv_heads are those of the target K/V it reads. backbone_hidden_size: the target's hidden size
    (pre_projection: 2 * backbone -> hidden, post_projection: hidden -> backbone). use_ordered_embeddings: the
    centroid-masked LM head (num_centroids clusters of vocab / num_centroids tokens, the top
    centroid_intermediate_top_k clusters scored).
    """

    text: TextConfig
    backbone_hidden_size: int
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    tie_word_embeddings: bool = True
    architecture: str = "Gemma4AssistantForCausalLM"
    model_type: str = ASSISTANT_MODEL_TYPE

    @property
    def vocab_size_per_centroid(self) -> int:
        return self.text.vocab_size // self.num_centroids

    @property
    def attention_types(self) -> tuple[str, ...]:
        """The layer kinds present, i.e. which of the target's stored K/V the assistant reads."""
        return tuple(t for t in (SLIDING, FULL) if t in self.text.layer_types)


def is_assistant_dict(d: Any) -> bool:
    """Whether a parsed config.json describes an assistant (by model_type or architecture)."""
    if not isinstance(d, dict):
        return False
    archs = d.get("architectures") or []
    return d.get("model_type") in (ASSISTANT_MODEL_TYPE, "gemma4_unified_assistant") or any(
        "Assistant" in str(a) for a in archs)


def _check_text_fields(t: dict[str, Any], where: str) -> None:
    """HF's validate_architecture, field by field (HF's defaults for absent fields)."""
    for key, default in _HF_TEXT_DEFAULTS.items():
        value = default if t.get(key) is None else t[key]
        if value != 0:
            raise ConfigError(f"{where}: {key} must be 0 in an assistant (it has no per-layer embeddings), got "
                              f"{value}" + (" (absent: HF's default)" if t.get(key) is None else ""))
    for key in ("enable_moe_block", "use_double_wide_mlp"):
        if t.get(key):
            raise ConfigError(f"{where}: {key} must be false in an assistant, got {t[key]!r}")
    n = t.get("num_hidden_layers")
    shared = t.get("num_kv_shared_layers")
    # HF's __post_init__ turns a missing / zero count into "all layers"; anything else must say all of them.
    if shared not in (None, 0, n):
        raise ConfigError(f"{where}: all layers of an assistant must be KV-shared (they read the target's K/V): "
                          f"num_kv_shared_layers must be num_hidden_layers={n} (or 0 / absent), got {shared}")
    if t.get("final_logit_softcapping") not in (None, 0, 0.0):
        raise ConfigError(f"{where}: final_logit_softcapping={t['final_logit_softcapping']} is not applied by the "
                          "assistant's LM head (HF never soft-caps its logits); set it to null")


def assistant_config_from_dict(d: dict[str, Any], where: str = "config.json") -> AssistantConfig:
    """Parse an assistant's HF config.json dict into an AssistantConfig (ConfigError naming the field)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    model_type, archs = d.get("model_type"), list(d.get("architectures") or [])
    if model_type == "gemma4_unified_assistant":
        raise ConfigError(f"{where}: gemma4_unified_assistant drafts for the gemma4_unified (12B) model, which "
                          "gemma4-jax does not support; gemma4_assistant is supported")
    if model_type != ASSISTANT_MODEL_TYPE:
        raise ConfigError(f"{where}: model_type {model_type!r} is not an assistant (expected {ASSISTANT_MODEL_TYPE!r})")
    unknown = [a for a in archs if a not in ASSISTANT_ARCHITECTURES]
    if unknown:
        raise ConfigError(f"{where}: unknown assistant architecture(s) {unknown}; supported: "
                          f"{list(ASSISTANT_ARCHITECTURES)}")
    t = d.get("text_config")
    if not isinstance(t, dict):
        raise ConfigError(f"{where}: an assistant config needs a 'text_config' object")
    if t.get("model_type", "gemma4_text") != "gemma4_text":
        raise ConfigError(f"{where}: text_config model_type {t.get('model_type')!r}; expected 'gemma4_text'")
    tw = f"{where} text_config"
    _check_text_fields(t, tw)
    # Parse the decoder as an ordinary one (no sharing), then make every layer read the target's K/V.
    base = text_config_from_dict({**t, "num_kv_shared_layers": 0, "vocab_size_per_layer_input": None}, where=tw)
    layers = tuple(dataclasses.replace(s, kv_sharing="reuse", kv_source_layer=TARGET_KV_SOURCE) for s in base.layers)
    tie = bool(d.get("tie_word_embeddings", True))
    text = dataclasses.replace(base, layers=layers, num_kv_shared_layers=base.num_hidden_layers,
                               hidden_size_per_layer_input=0, vocab_size_per_layer_input=0,
                               final_logit_softcapping=None, tie_word_embeddings=tie)

    backbone = d.get("backbone_hidden_size", 1536)  # HF's default
    if not isinstance(backbone, int) or isinstance(backbone, bool) or backbone <= 0:
        raise ConfigError(f"{where}: backbone_hidden_size must be a positive integer, got {backbone!r}")
    ordered = bool(d.get("use_ordered_embeddings", False))
    centroids = int(d.get("num_centroids", 2048))
    top_k = int(d.get("centroid_intermediate_top_k", 32))
    if ordered:
        if centroids <= 0 or text.vocab_size % centroids:
            raise ConfigError(f"{where}: use_ordered_embeddings needs num_centroids ({centroids}) to divide "
                              f"vocab_size ({text.vocab_size})")
        if not 0 < top_k <= centroids:
            raise ConfigError(f"{where}: centroid_intermediate_top_k={top_k} must be in [1, num_centroids="
                              f"{centroids}]")
    return AssistantConfig(text=text, backbone_hidden_size=backbone, use_ordered_embeddings=ordered,
                           num_centroids=centroids, centroid_intermediate_top_k=top_k, tie_word_embeddings=tie,
                           architecture=archs[0] if archs else ASSISTANT_ARCHITECTURES[0])


def load_assistant_config(path: str | os.PathLike) -> AssistantConfig:
    """Read an assistant's `config.json` (a checkpoint directory or the file itself)."""
    d, file = read_config_json(path)
    return assistant_config_from_dict(d, where=file)


# ----------------------------------------------------------------------------------------------------------------
# The target side: which of its layers the assistant reads, and whether their K/V fit.


def target_kv_layers(target: TextConfig) -> dict[str, int]:
    """{attention type: index of the target layer whose K/V the assistant reads}: per kind, the last layer that owns
    its K/V (HF's "store" layers: the source of the KV-shared layers; in a target without KV sharing, simply the last
    layer of that kind; HF 5.23 stores nothing in that case, so its own generate cannot drive such a pair)."""
    out: dict[str, int] = {}
    for spec in target.layers:
        if not spec.is_kv_shared:
            out[spec.attention_type] = spec.index
    return out


def check_target(assistant: AssistantConfig, target: TextConfig, where: str = "assistant") -> dict[str, int]:
    """Check that `assistant` can draft for `target`; returns target_kv_layers(target). ConfigError otherwise."""
    a = assistant.text
    if assistant.backbone_hidden_size != target.hidden_size:
        raise ConfigError(f"{where}: backbone_hidden_size={assistant.backbone_hidden_size} but the target's "
                          f"hidden_size is {target.hidden_size}")
    if a.vocab_size != target.vocab_size:
        raise ConfigError(f"{where}: vocab_size={a.vocab_size} but the target's is {target.vocab_size}")
    sources = target_kv_layers(target)
    for spec in a.layers:
        src = sources.get(spec.attention_type)
        if src is None:
            raise ConfigError(f"{where}: layer {spec.index} ({spec.attention_type}) needs a target layer of that "
                              "kind with its own K/V, and the target has none")
        t = target.layers[src]
        if (t.head_dim, t.num_kv_heads) != (spec.head_dim, spec.num_kv_heads):
            raise ConfigError(
                f"{where}: layer {spec.index} ({spec.attention_type}) expects K/V of head_dim {spec.head_dim} with "
                f"{spec.num_kv_heads} KV heads, but the target's layer {src} has head_dim {t.head_dim} with "
                f"{t.num_kv_heads} KV heads")
    return sources


# ----------------------------------------------------------------------------------------------------------------
# Presets: the published assistants (../shared/GEMMA4_FAMILY.md) and a tiny one for the `tiny` text preset.


def _assistant(backbone: int, hidden: int, inter: int, heads: int, kv: int, global_kv: int | None, k_eq_v: bool,
               window: int, max_pos: int, ordered: bool, vocab: int = 262144, head_dim: int = 256,
               global_head_dim: int = 512, **text: Any) -> dict[str, Any]:
    t = {
        "model_type": "gemma4_text", "vocab_size": vocab, "vocab_size_per_layer_input": 0,
        "hidden_size_per_layer_input": 0, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": 4, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
        "global_head_dim": global_head_dim, "attention_k_eq_v": k_eq_v, "sliding_window": window,
        "layer_types": [SLIDING, SLIDING, SLIDING, FULL], "num_kv_shared_layers": 4,
        "final_logit_softcapping": None, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": max_pos, "tie_word_embeddings": True, "enable_moe_block": False,
        "use_double_wide_mlp": False, **text,
    }
    if global_kv is not None:
        t["num_global_key_value_heads"] = global_kv
    return {"model_type": ASSISTANT_MODEL_TYPE, "architectures": list(ASSISTANT_ARCHITECTURES),
            "backbone_hidden_size": backbone, "use_ordered_embeddings": ordered, "num_centroids": 2048,
            "centroid_intermediate_top_k": 32, "tie_word_embeddings": True, "text_config": t}


ASSISTANT_PRESETS: dict[str, dict[str, Any]] = {
    "e2b-assistant": _assistant(1536, 256, 2048, 4, 1, None, False, 512, 131072, ordered=True),
    "e4b-assistant": _assistant(2560, 256, 2048, 4, 2, None, False, 512, 131072, ordered=True),
    "26b-a4b-assistant": _assistant(2816, 1024, 8192, 16, 8, 2, True, 1024, 262144, ordered=False),
    "31b-assistant": _assistant(5376, 1024, 8192, 32, 16, 4, True, 1024, 262144, ordered=False),
    # Drafts for the `tiny` text preset (hidden 64, one KV head of 16 / 32, vocab 512): 16 centroids, top 4.
    "tiny-assistant": {
        **_assistant(64, 32, 64, 2, 1, None, False, 16, 4096, ordered=True, vocab=512, head_dim=16,
                     global_head_dim=32),
        "num_centroids": 16, "centroid_intermediate_top_k": 4,
    },
}
# The target preset (config.PRESETS) each assistant preset drafts for.
ASSISTANT_TARGETS = {"e2b-assistant": "e2b", "e4b-assistant": "e4b", "26b-a4b-assistant": "26b-a4b",
                     "31b-assistant": "31b", "tiny-assistant": "tiny"}


def assistant_preset(name: str, **overrides: Any) -> AssistantConfig:
    """A named assistant preset; keyword overrides patch the outer HF-style dict (text_config replaces whole)."""
    key = name.lower().replace("_", "-")
    if key not in ASSISTANT_PRESETS:
        raise ConfigError(f"unknown assistant preset {name!r}; available: {sorted(ASSISTANT_PRESETS)}")
    return assistant_config_from_dict({**ASSISTANT_PRESETS[key], **overrides}, where=f"preset {key}")
