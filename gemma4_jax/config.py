"""Frozen, hashable Gemma 4 configuration, built in one place from a Hugging Face `config.json`.

Every per-layer fact the model needs (attention kind, head dim, KV heads, KV sharing and its source layer,
MLP width, RoPE) is computed here once and stored in `LayerSpec`s, so modules never re-derive them.

Accepted inputs: `gemma4_text` (Gemma4ForCausalLM) and `gemma4` (Gemma4ForConditionalGeneration, whose
`text_config` is used) configs; full-attention overrides written either as `global_head_dim` /
`num_global_key_value_heads` or as the newer `per_layer_config`; MoE aliases `num_experts_per_tok` /
`top_k_experts` and `moe_intermediate_size` / `expert_intermediate_size`.

Presets with the real sizes of the family (`e2b`, `e4b`, `26b-a4b`, `31b`) and a `tiny` one are HF-style dicts
that go through the same parser.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from gemma4_jax.errors import ConfigError  # noqa: F401 (part of this module's surface)
from gemma4_jax.tower_config import SUPPORTED_ACTIVATIONS, audio_config_from_dict, vision_config_from_dict

SLIDING = "sliding_attention"
FULL = "full_attention"
_LAYER_TYPES = (SLIDING, FULL)
_TEXT_ARCHITECTURES = ("Gemma4ForCausalLM", "Gemma4TextModel")
_MULTIMODAL_ARCHITECTURES = ("Gemma4ForConditionalGeneration", "Gemma4Model")
# Per-layer override keys we know how to apply (HF's heterogeneous config may carry others we cannot honour).
_PER_LAYER_KEYS = ("head_dim", "num_key_value_heads", "intermediate_size")


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding of one layer kind. `rope_type` is "default" or "proportional"."""

    rope_type: str
    theta: float
    partial_rotary_factor: float = 1.0
    factor: float = 1.0


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Everything one decoder layer needs to know about itself.

    kv_sharing: None (own K/V), "store" (own K/V that later layers read) or "reuse" (reads kv_source_layer's K/V,
    has no K/V weights of its own). kv_source_layer == index unless kv_sharing == "reuse".
    """

    index: int
    attention_type: str  # SLIDING or FULL
    head_dim: int
    num_kv_heads: int
    kv_sharing: str | None
    kv_source_layer: int
    k_eq_v: bool  # values are the (v-normed) key projection: full layers when attention_k_eq_v
    intermediate_size: int  # already doubled on KV-shared layers when use_double_wide_mlp
    sliding_window: int | None  # None on full-attention layers
    rope: RopeSpec

    @property
    def is_sliding(self) -> bool:
        return self.attention_type == SLIDING

    @property
    def is_kv_shared(self) -> bool:
        return self.kv_sharing == "reuse"


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Gemma 4 language model. Hashable, so it can be a static argument of jitted functions."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: tuple[str, ...]
    layers: tuple[LayerSpec, ...]
    rms_norm_eps: float = 1e-6
    sliding_window: int = 512
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131072
    hidden_size_per_layer_input: int = 0  # PLE width; 0 = no per-layer embeddings
    vocab_size_per_layer_input: int = 262144
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    enable_moe_block: bool = False
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1,)

    @property
    def has_ple(self) -> bool:
        return self.hidden_size_per_layer_input > 0

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K/V bytes per token of context: full-attention layers that own a cache (both K and V are kept, also
        with keys-as-values, where V is the unrotated v-normed key). Sliding layers are bounded by the window and
        KV-shared layers own nothing."""
        owners = [s for s in self.layers if not s.is_kv_shared and not s.is_sliding]
        return sum(2 * s.num_kv_heads * s.head_dim * dtype_bytes for s in owners)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A whole checkpoint: the text model plus what the multimodal wrapper adds (towers come in a later issue)."""

    text: TextConfig
    architecture: str = "Gemma4ForCausalLM"
    model_type: str = "gemma4_text"
    # Raw sub-configs of the towers, kept as JSON text so that the config stays hashable.
    vision_config_json: str | None = None
    audio_config_json: str | None = None
    image_token_id: int = 258880
    audio_token_id: int = 258881
    video_token_id: int = 258884
    boi_token_id: int = 255999
    eoi_token_id: int = 258882
    boa_token_id: int = 256000
    eoa_token_id: int = 258883
    # The parsed vision tower (tower_config.VisionConfig) or None; bidirectional attention among the soft tokens of one
    # image/frame on sliding layers (text_config.use_bidirectional_attention == "vision").
    vision: Any = None
    vision_bidirectional: bool = False
    # The parsed audio tower (tower_config.AudioConfig) or None.
    audio: Any = None

    @property
    def is_multimodal(self) -> bool:
        return self.model_type == "gemma4"


# ----------------------------------------------------------------------------------------------------------------
# Parsing


def _require(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise ConfigError(f"{where}: required field '{key}' is missing")
    return d[key]


def _first(d: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if d.get(key) is not None:
            return d[key]
    return default


def _rope_spec(params: dict[str, Any] | None, layer_type: str, where: str) -> RopeSpec:
    defaults = {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }
    p = (params or {}).get(layer_type) or defaults[layer_type]
    rope_type = p.get("rope_type", p.get("type", "default"))
    if rope_type not in ("default", "proportional"):
        raise ConfigError(f"{where}: rope_type '{rope_type}' for {layer_type} is not supported (default, proportional)")
    if "rope_theta" not in p:
        raise ConfigError(f"{where}: rope_parameters[{layer_type!r}] has no rope_theta")
    return RopeSpec(
        rope_type=rope_type,
        theta=float(p["rope_theta"]),
        partial_rotary_factor=float(p.get("partial_rotary_factor") or 1.0) if rope_type == "proportional" else 1.0,
        factor=float(p.get("factor", 1.0)),
    )


def _kv_sharing_modes(layer_types: list[str], num_kv_shared: int, where: str) -> tuple[list, list[int]]:
    """Same rules as HF's `Gemma4TextConfig.kv_sharing_modes`, plus the source layer of every reuse layer."""
    n = len(layer_types)
    modes: list[str | None] = [None] * n
    sources = list(range(n))
    if num_kv_shared == 0:
        return modes, sources
    if not 0 < num_kv_shared < n:
        raise ConfigError(f"{where}: num_kv_shared_layers={num_kv_shared} must be in [0, num_hidden_layers={n})")
    first_shared = n - num_kv_shared
    producers = {}
    for i in range(first_shared):
        producers[layer_types[i]] = i  # the last non-shared layer of each type
    missing = sorted(set(layer_types[first_shared:]) - set(producers))
    if missing:
        raise ConfigError(
            f"{where}: KV sharing is impossible: layer type(s) {missing} appear among the last {num_kv_shared} "
            f"(KV-shared) layers but no earlier layer of that type produces a cache"
        )
    for producer in producers.values():
        modes[producer] = "store"
    for i in range(first_shared, n):
        modes[i] = "reuse"
        sources[i] = producers[layer_types[i]]
    return modes, sources


def _per_layer_overrides(d: dict[str, Any], layer_types: list[str], k_eq_v: bool, where: str) -> dict[int, dict]:
    n = len(layer_types)
    if "per_layer_config" in d and d["per_layer_config"] is not None:
        raw = d["per_layer_config"]
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: per_layer_config must be a mapping of layer index to overrides")
        out: dict[int, dict] = {}
        for key, overrides in raw.items():
            try:
                idx = int(key)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: per_layer_config key {key!r} is not a layer index") from None
            if not 0 <= idx < n:
                raise ConfigError(f"{where}: per_layer_config key {idx} is outside [0, {n})")
            unknown = sorted(set(overrides) - set(_PER_LAYER_KEYS))
            if unknown:
                raise ConfigError(f"{where}: per_layer_config[{idx}] overrides {unknown}, which Gemma 4 does not vary")
            out[idx] = dict(overrides)
        return out
    # Older form: global_head_dim / num_global_key_value_heads apply to every full-attention layer.
    overrides: dict[str, Any] = {"head_dim": d.get("global_head_dim", 512)}
    if d.get("num_global_key_value_heads") is not None and k_eq_v:
        overrides["num_key_value_heads"] = d["num_global_key_value_heads"]
    return {i: dict(overrides) for i, t in enumerate(layer_types) if t == FULL}


def text_config_from_dict(d: dict[str, Any], where: str = "config") -> TextConfig:
    """Build a TextConfig from a `gemma4_text` config dict (the `text_config` of a `gemma4` one)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
    n_layers = int(_require(d, "num_hidden_layers", where))
    hidden = int(_require(d, "hidden_size", where))
    n_heads = int(_require(d, "num_attention_heads", where))
    vocab = int(_require(d, "vocab_size", where))
    intermediate = int(_require(d, "intermediate_size", where))
    n_kv = int(d.get("num_key_value_heads") or n_heads)
    head_dim = int(d.get("head_dim") or hidden // n_heads)
    if n_layers <= 0 or hidden <= 0 or n_heads <= 0 or vocab <= 0:
        raise ConfigError(f"{where}: sizes must be positive (layers={n_layers}, hidden={hidden}, heads={n_heads})")

    bidirectional = d.get("use_bidirectional_attention")
    if bidirectional == "all":
        raise ConfigError(
            f"{where}: use_bidirectional_attention='all' (a non-causal encoder) is not supported by this "
            "generative model; 'vision' and null are"
        )
    layer_types = list(d.get("layer_types") or [SLIDING if (i + 1) % 6 else FULL for i in range(n_layers)])
    if len(layer_types) != n_layers:
        raise ConfigError(f"{where}: layer_types has {len(layer_types)} entries for num_hidden_layers={n_layers}")
    bad = sorted(set(layer_types) - set(_LAYER_TYPES))
    if bad:
        raise ConfigError(f"{where}: unknown layer type(s) {bad}; expected {list(_LAYER_TYPES)}")
    layer_types[-1] = FULL  # HF forces the last layer to full attention

    k_eq_v = bool(d.get("attention_k_eq_v", False))
    num_kv_shared = int(d.get("num_kv_shared_layers") or 0)
    modes, sources = _kv_sharing_modes(layer_types, num_kv_shared, where)
    overrides = _per_layer_overrides(d, layer_types, k_eq_v, where)
    double_wide = bool(d.get("use_double_wide_mlp", False))
    sliding_window = int(d.get("sliding_window") or 512)
    rope = {t: _rope_spec(d.get("rope_parameters"), t, where) for t in set(layer_types)}

    enable_moe = bool(d.get("enable_moe_block", False))
    num_experts = d.get("num_experts")
    top_k = _first(d, "top_k_experts", "num_experts_per_tok")
    moe_inter = _first(d, "moe_intermediate_size", "expert_intermediate_size")
    if enable_moe:
        missing = [
            k for k, v in (("num_experts", num_experts), ("top_k_experts", top_k), ("moe_intermediate_size", moe_inter))
            if not v
        ]
        if missing:
            raise ConfigError(f"{where}: enable_moe_block is true but {missing} are missing or zero")
        if int(top_k) > int(num_experts):
            raise ConfigError(f"{where}: top_k_experts={top_k} exceeds num_experts={num_experts}")

    specs = []
    for i, t in enumerate(layer_types):
        o = overrides.get(i, {})
        spec_head_dim = int(o.get("head_dim", head_dim))
        spec_kv = int(o.get("num_key_value_heads", n_kv))
        if n_heads % spec_kv:
            raise ConfigError(
                f"{where}: layer {i}: num_attention_heads={n_heads} is not a multiple of kv heads {spec_kv}"
            )
        if spec_head_dim % 2:
            raise ConfigError(f"{where}: layer {i}: head_dim={spec_head_dim} must be even for rotary embeddings")
        width = int(o.get("intermediate_size", intermediate))
        if double_wide and modes[i] == "reuse":
            width *= 2
        specs.append(
            LayerSpec(
                index=i,
                attention_type=t,
                head_dim=spec_head_dim,
                num_kv_heads=spec_kv,
                kv_sharing=modes[i],
                kv_source_layer=sources[i],
                k_eq_v=k_eq_v and t == FULL,
                intermediate_size=width,
                sliding_window=sliding_window if t == SLIDING else None,
                rope=rope[t],
            )
        )
    for spec in specs:
        if spec.is_kv_shared:
            src = specs[spec.kv_source_layer]
            if (src.head_dim, src.num_kv_heads, src.k_eq_v) != (spec.head_dim, spec.num_kv_heads, spec.k_eq_v):
                raise ConfigError(
                    f"{where}: layer {spec.index} reuses layer {src.index}'s K/V but their head_dim/kv heads differ"
                )

    activation = str(d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh")
    if activation not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(
            f"{where}: hidden_activation {activation!r} is not supported; expected {SUPPORTED_ACTIVATIONS}"
        )

    eos = d.get("eos_token_id", 1)
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
    ple = int(d.get("hidden_size_per_layer_input") or 0)
    softcap = d.get("final_logit_softcapping")
    return TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        layer_types=tuple(layer_types),
        layers=tuple(specs),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        sliding_window=sliding_window,
        final_logit_softcapping=float(softcap) if softcap else None,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        hidden_activation=activation,
        max_position_embeddings=int(d.get("max_position_embeddings", 131072)),
        hidden_size_per_layer_input=ple,
        vocab_size_per_layer_input=int(d.get("vocab_size_per_layer_input") or vocab),
        attention_k_eq_v=k_eq_v,
        num_kv_shared_layers=num_kv_shared,
        use_double_wide_mlp=double_wide,
        enable_moe_block=enable_moe,
        num_experts=int(num_experts or 0) if enable_moe else 0,
        top_k_experts=int(top_k or 0) if enable_moe else 0,
        moe_intermediate_size=int(moe_inter or 0) if enable_moe else 0,
        pad_token_id=int(d["pad_token_id"]) if d.get("pad_token_id") is not None else 0,
        bos_token_id=int(d["bos_token_id"]) if d.get("bos_token_id") is not None else 2,
        eos_token_ids=eos_ids,
    )


def _vision_config(d: dict[str, Any] | None, where: str) -> Any:
    if d is None:
        return None
    return vision_config_from_dict(d, where)


def _audio_config(d: dict[str, Any] | None, where: str) -> Any:
    if d is None:
        return None
    return audio_config_from_dict(d, where)


def config_from_dict(d: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Parse a whole HF config.json dict (text-only or multimodal) into a ModelConfig."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    model_type = d.get("model_type")
    archs = d.get("architectures") or []
    if model_type in ("gemma4_assistant", "gemma4_unified_assistant"):
        raise ConfigError(f"{where}: an MTP assistant (drafter) config, not a model of its own: load it with "
                          "gemma4_jax.from_pretrained / load_assistant, or assistant_config.load_assistant_config")
    if model_type not in ("gemma4", "gemma4_text"):
        raise ConfigError(
            f"{where}: model_type {model_type!r} / architectures {archs} is not a Gemma 4 model "
            "(expected model_type 'gemma4' or 'gemma4_text')"
        )
    known = _TEXT_ARCHITECTURES + _MULTIMODAL_ARCHITECTURES
    unknown = [a for a in archs if a not in known]
    if unknown:
        raise ConfigError(f"{where}: unknown architecture(s) {unknown}; supported: {list(known)}")
    if model_type == "gemma4":
        text = d.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"{where}: a 'gemma4' config needs a 'text_config' object")
        tc = text_config_from_dict(text, where=f"{where} text_config")
        # A multimodal wrapper's own tie flag governs the LM head.
        if "tie_word_embeddings" in d:
            tc = dataclasses.replace(tc, tie_word_embeddings=bool(d["tie_word_embeddings"]))
        dump = lambda x: json.dumps(x, sort_keys=True) if x is not None else None  # noqa: E731
        return ModelConfig(
            text=tc,
            architecture=archs[0] if archs else "Gemma4ForConditionalGeneration",
            model_type="gemma4",
            vision_config_json=dump(d.get("vision_config")),
            audio_config_json=dump(d.get("audio_config")),
            image_token_id=int(d.get("image_token_id", 258880)),
            audio_token_id=int(d.get("audio_token_id", 258881)),
            video_token_id=int(d.get("video_token_id", 258884)),
            boi_token_id=int(d.get("boi_token_id", 255999)),
            eoi_token_id=int(d.get("eoi_token_id", 258882)),
            boa_token_id=int(d.get("boa_token_id", 256000)),
            eoa_token_id=int(d.get("eoa_token_index", d.get("eoa_token_id", 258883))),
            vision=_vision_config(d.get("vision_config"), f"{where} vision_config"),
            vision_bidirectional=text.get("use_bidirectional_attention") == "vision",
            audio=_audio_config(d.get("audio_config"), f"{where} audio_config"),
        )
    return ModelConfig(
        text=text_config_from_dict(d, where=where),
        architecture=archs[0] if archs else "Gemma4ForCausalLM",
        model_type="gemma4_text",
    )


def read_config_json(path: str | os.PathLike) -> tuple[dict, str]:
    """The parsed `config.json` of a checkpoint directory (or the file itself) and the file's path; a missing or
    malformed file is a ConfigError naming it."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise ConfigError(f"no config.json at {path!r}")
    try:
        with open(file) as f:
            return json.load(f), file
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None


def load_config(path: str | os.PathLike) -> ModelConfig:
    """Read `config.json` from a checkpoint directory (or the file itself)."""
    d, file = read_config_json(path)
    return config_from_dict(d, where=file)


# ----------------------------------------------------------------------------------------------------------------
# Presets: the real sizes of the family (../shared/GEMMA4_FAMILY.md) and a tiny one for tests and demos.


def _pattern(sliding: int, repeats: int) -> list[str]:
    return ([SLIDING] * sliding + [FULL]) * repeats


_COMMON = {
    "model_type": "gemma4_text",
    "architectures": ["Gemma4ForCausalLM"],
    "vocab_size": 262144,
    "vocab_size_per_layer_input": 262144,
    "head_dim": 256,
    "global_head_dim": 512,
    "final_logit_softcapping": 30.0,
    "rms_norm_eps": 1e-6,
    "hidden_activation": "gelu_pytorch_tanh",
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": [1, 106],
}

PRESETS: dict[str, dict[str, Any]] = {
    "e2b": {
        **_COMMON,
        "hidden_size": 1536,
        "num_hidden_layers": 35,
        "intermediate_size": 6144,
        "use_double_wide_mlp": True,
        "num_attention_heads": 8,
        "num_key_value_heads": 1,
        "sliding_window": 512,
        "layer_types": _pattern(4, 7),
        "num_kv_shared_layers": 20,
        "hidden_size_per_layer_input": 256,
        "max_position_embeddings": 131072,
    },
    "e4b": {
        **_COMMON,
        "hidden_size": 2560,
        "num_hidden_layers": 42,
        "intermediate_size": 10240,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "sliding_window": 512,
        "layer_types": _pattern(5, 7),
        "num_kv_shared_layers": 18,
        "hidden_size_per_layer_input": 256,
        "max_position_embeddings": 131072,
    },
    "26b-a4b": {
        **_COMMON,
        "hidden_size": 2816,
        "num_hidden_layers": 30,
        "intermediate_size": 2112,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "num_global_key_value_heads": 2,
        "attention_k_eq_v": True,
        "sliding_window": 1024,
        "layer_types": _pattern(5, 5),
        "hidden_size_per_layer_input": 0,
        "enable_moe_block": True,
        "num_experts": 128,
        "top_k_experts": 8,
        "moe_intermediate_size": 704,
        "max_position_embeddings": 262144,
    },
    "31b": {
        **_COMMON,
        "hidden_size": 5376,
        "num_hidden_layers": 60,
        "intermediate_size": 21504,
        "num_attention_heads": 32,
        "num_key_value_heads": 16,
        "num_global_key_value_heads": 4,
        "attention_k_eq_v": True,
        "sliding_window": 1024,
        "layer_types": _pattern(5, 10),
        "hidden_size_per_layer_input": 0,
        "max_position_embeddings": 262144,
    },
    # A few MB: PLE, KV sharing, double-wide MLP and soft-capping, the E2B recipe in miniature.
    "tiny": {
        **_COMMON,
        "vocab_size": 512,
        "vocab_size_per_layer_input": 512,
        "hidden_size": 64,
        "num_hidden_layers": 6,
        "intermediate_size": 128,
        "use_double_wide_mlp": True,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "global_head_dim": 32,
        "sliding_window": 16,
        "layer_types": _pattern(2, 2),
        "num_kv_shared_layers": 2,
        "hidden_size_per_layer_input": 16,
        "max_position_embeddings": 4096,
        "eos_token_id": 1,
    },
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset ('e2b', 'e4b', '26b-a4b', '31b', 'tiny'); keyword overrides patch the HF-style dict."""
    key = name.lower().replace("_", "-")
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return config_from_dict({**PRESETS[key], **overrides}, where=f"preset {key}")


def preset_dict(name: str) -> dict[str, Any]:
    """The HF-style config.json dict of a preset (a copy)."""
    return json.loads(json.dumps(PRESETS[name.lower().replace("_", "-")]))
