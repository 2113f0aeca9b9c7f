"""Tower configs (ground floor, beside config.py): the vision encoder's and the audio conformer's config.json
sections, parsed and checked once into frozen, hashable dataclasses that ModelConfig holds."""

from __future__ import annotations

import dataclasses
from typing import Any

from gemma4_jax.errors import ConfigError

# The text decoder's activations (layers.ACTIVATIONS implements them); the vision tower uses the same set.
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh", "gelu")
SUPPORTED_AUDIO_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Gemma 4 vision encoder (HF `Gemma4VisionConfig`). Hashable: it is part of ModelConfig."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 100.0
    pooling_kernel_size: int = 3
    patch_size: int = 16
    position_embedding_size: int = 10 * 1024
    use_clipped_linears: bool = False
    standardize: bool = False

    @property
    def patch_dim(self) -> int:
        """Values per patch: 3 channels x patch_size**2 pixels."""
        return 3 * self.patch_size**2


def vision_config_from_dict(d: dict[str, Any], where: str = "vision_config") -> VisionConfig:
    """Parse HF's `vision_config` dict; missing fields take HF's defaults."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
    defaults = VisionConfig()
    get = lambda key: d[key] if d.get(key) is not None else getattr(defaults, key)  # noqa: E731
    rope = d.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", "axial")
    if rope_type != "axial":
        raise ConfigError(f"{where}: rope_type {rope_type!r} is not supported by the vision tower (only 'axial')")
    heads, kv_heads = int(get("num_attention_heads")), int(get("num_key_value_heads"))
    hidden = int(get("hidden_size"))
    head_dim = int(d.get("head_dim") or hidden // heads)
    cfg = VisionConfig(
        hidden_size=hidden,
        intermediate_size=int(get("intermediate_size")),
        num_hidden_layers=int(get("num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_activation=str(get("hidden_activation")),
        rms_norm_eps=float(get("rms_norm_eps")),
        rope_theta=float(rope.get("rope_theta", defaults.rope_theta)),
        pooling_kernel_size=int(get("pooling_kernel_size")),
        patch_size=int(get("patch_size")),
        position_embedding_size=int(get("position_embedding_size")),
        use_clipped_linears=bool(get("use_clipped_linears")),
        standardize=bool(get("standardize")),
    )
    sizes = {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads", "head_dim",
                                          "pooling_kernel_size", "patch_size", "position_embedding_size")}
    bad = [f"{k}={v}" for k, v in sizes.items() if v <= 0]
    if bad:
        raise ConfigError(f"{where}: sizes must be positive ({', '.join(bad)})")
    if heads % kv_heads:
        raise ConfigError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    if head_dim % 4:
        # 2-D axial RoPE: half of the head per axis, rotate-half inside each half.
        raise ConfigError(f"{where}: head_dim={head_dim} must be a multiple of 4 for the 2-D axial rotary embedding")
    if cfg.hidden_activation not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(f"{where}: hidden_activation {cfg.hidden_activation!r} is not supported; expected one of "
                          f"{sorted(SUPPORTED_ACTIVATIONS)}")
    return cfg


@dataclasses.dataclass(frozen=True)
class AudioConfig:
    """HF `Gemma4AudioConfig` (config.json `audio_config`), frozen and hashable. Defaults are HF's (E2B/E4B)."""

    hidden_size: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "silu"
    subsampling_conv_channels: tuple[int, int] = (128, 32)
    conv_kernel_size: int = 5
    residual_weight: float = 0.5
    attention_chunk_size: int = 12
    attention_context_left: int = 13
    attention_context_right: int = 0
    attention_logit_cap: float = 50.0
    attention_invalid_logits_value: float = -1.0e9
    use_clipped_linears: bool = True
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    output_proj_dims: int = 1536

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_past_horizon(self) -> int:
        return self.attention_context_left - 1

    @property
    def context_size(self) -> int:
        """Keys one attention chunk sees: its own chunk plus the past and future horizons."""
        return self.attention_chunk_size + self.max_past_horizon + self.attention_context_right

    @property
    def num_mel_bins(self) -> int:
        """The feature width the subsampling projection implies: HF sizes `input_proj_linear` as
        (channels[0] // 4) * channels[1], i.e. it assumes ceil(ceil(F / 2) / 2) == channels[0] // 4."""
        return self.subsampling_conv_channels[0]


def audio_config_from_dict(d: dict[str, Any], where: str = "audio_config") -> AudioConfig:
    """Parse config.json's `audio_config` (unknown HF bookkeeping keys are ignored)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
    values: dict[str, Any] = {}
    try:
        for field in dataclasses.fields(AudioConfig):
            raw = d.get(field.name)
            if raw is None:
                continue
            if field.name == "subsampling_conv_channels":
                if not isinstance(raw, (list, tuple)) or len(raw) != 2:
                    raise ValueError(f"subsampling_conv_channels must list 2 channel counts, got {raw!r}")
                values[field.name] = (int(raw[0]), int(raw[1]))
            else:
                values[field.name] = type(field.default)(raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: invalid value ({e})") from None
    cfg = AudioConfig(**values)
    positive = ("hidden_size", "num_hidden_layers", "num_attention_heads", "conv_kernel_size",
                "attention_chunk_size", "attention_context_left", "output_proj_dims")
    bad = [k for k in positive if getattr(cfg, k) <= 0]
    if bad or min(cfg.subsampling_conv_channels) <= 0 or cfg.attention_context_right < 0:
        raise ConfigError(f"{where}: sizes must be positive (offending: {bad or 'subsampling/context_right'})")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(
            f"{where}: hidden_size={cfg.hidden_size} is not a multiple of num_attention_heads={cfg.num_attention_heads}"
        )
    if cfg.subsampling_conv_channels[0] % 4:
        raise ConfigError(f"{where}: subsampling_conv_channels[0]={cfg.subsampling_conv_channels[0]} must be a "
                          "multiple of 4 (the projection input is channels[0] // 4 mel bins x channels[1])")
    if not cfg.attention_logit_cap > 0:
        raise ConfigError(f"{where}: attention_logit_cap must be positive, got {cfg.attention_logit_cap}")
    if cfg.hidden_act not in SUPPORTED_AUDIO_ACTIVATIONS:
        raise ConfigError(f"{where}: hidden_act {cfg.hidden_act!r} is not supported; expected one of "
                          f"{SUPPORTED_AUDIO_ACTIVATIONS}")
    return cfg
