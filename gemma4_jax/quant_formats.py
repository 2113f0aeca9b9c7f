"""Checkpoints' quantization configs (loading layer): what a ModelOpt or compressed-tensors export says about its
packed tensors, and the host-side conversions of their scales.

Configs: ModelOpt (`hf_quant_config.json` or `quantization_config` with `quant_method: modelopt`) and
compressed-tensors (`quant_method: compressed-tensors`, formats `float-quantized` and `nvfp4-pack-quantized`).
Which modules are quantized is decided per module from the tensors present (checkpoint.py); the config is read to
check that the tensors agree with it (algorithm, excluded modules). The formats themselves are quant.py.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
from typing import Any

import numpy as np

from gemma4_jax.quant import FP8, NVFP4, QuantizationError


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """What a checkpoint says about its quantization. `formats`: the packed formats it may contain."""

    method: str  # "modelopt" | "compressed-tensors"
    formats: tuple[str, ...]
    excluded: tuple[str, ...]  # module patterns left unquantized, as written (glob, or "re:" regex)
    source: str  # the file the config came from

    def is_excluded(self, module: str) -> bool:
        for pattern in self.excluded:
            if pattern.startswith("re:"):
                if re.match(pattern[3:], module):
                    return True
            elif module == pattern or fnmatch.fnmatchcase(module, pattern):
                return True
        return False


_MODELOPT_ALGOS = {"NVFP4": NVFP4, "W4A16_NVFP4": NVFP4, "FP8": FP8, "FP8_PC_PT": FP8,
                   "FP8_PER_CHANNEL_PER_TOKEN": FP8}
_CT_FORMATS = {"float-quantized": FP8, "nvfp4-pack-quantized": NVFP4}


def _modelopt(algo: Any, excluded: Any, source: str) -> QuantConfig:
    if algo not in _MODELOPT_ALGOS:
        raise QuantizationError(f"{source}: ModelOpt quant_algo {algo!r} is not supported; supported: "
                                f"{sorted(_MODELOPT_ALGOS)}")
    return QuantConfig("modelopt", (_MODELOPT_ALGOS[algo],), tuple(excluded or ()), source)


def _compressed_tensors(q: dict[str, Any], source: str) -> QuantConfig:
    groups = q.get("config_groups") or {}
    formats = {g.get("format") or q.get("format") for g in groups.values()} or {q.get("format")}
    bad = sorted(str(f) for f in formats if f not in _CT_FORMATS)
    if bad:
        raise QuantizationError(f"{source}: compressed-tensors format(s) {bad} are not supported; supported: "
                                f"{sorted(_CT_FORMATS)}")
    for name, group in groups.items():
        weights = group.get("weights") or {}
        if weights.get("type", "float") != "float":
            raise QuantizationError(f"{source}: config group {name!r} quantizes weights to {weights.get('type')}; "
                                    "only float (FP8 / NVFP4) weights are supported")
        if weights.get("strategy") == "block":
            raise QuantizationError(f"{source}: config group {name!r} uses block-wise FP8 weight scales; only "
                                    "per-channel and per-tensor FP8 scales are supported")
        if weights.get("dynamic"):
            raise QuantizationError(f"{source}: config group {name!r} has dynamic weight quantization")
    return QuantConfig("compressed-tensors", tuple(sorted(_CT_FORMATS[f] for f in formats)),
                       tuple(q.get("ignore") or ()), source)


def read_quant_config(path: str) -> QuantConfig | None:
    """The quantization config of a checkpoint directory (hf_quant_config.json first, then config.json)."""
    hf_quant = os.path.join(path, "hf_quant_config.json")
    if os.path.exists(hf_quant):
        with open(hf_quant) as f:
            d = json.load(f)
        q = d.get("quantization", d)
        return _modelopt(q.get("quant_algo"), q.get("exclude_modules"), hf_quant)
    config = os.path.join(path, "config.json")
    if not os.path.exists(config):
        return None
    with open(config) as f:
        d = json.load(f)
    q = d.get("quantization_config") or (d.get("text_config") or {}).get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method == "modelopt":
        return _modelopt(q.get("quant_algo"), q.get("exclude_modules", q.get("ignore")), config)
    if method == "compressed-tensors":
        return _compressed_tensors(q, config)
    raise QuantizationError(f"{config}: quantization_config quant_method {method!r} is not supported; supported: "
                            "'modelopt' (NVFP4, FP8) and 'compressed-tensors' (float-quantized FP8, NVFP4)")


# ----------------------------------------------------------------------------------------------------------------
# Host-side conversions used by the checkpoint loader



def host_scalar(t: np.ndarray, key: str) -> float:
    """A per-tensor scale (shape () or (1,)) as a positive finite float."""
    value = float(np.asarray(t, np.float32).reshape(()))
    if not np.isfinite(value) or value <= 0:
        raise QuantizationError(f"tensor {key!r}: scale {value} must be positive and finite")
    return value


def host_rows(t: np.ndarray, n: int, key: str, reciprocal: bool = False) -> np.ndarray:
    """A per-tensor or per-row scale (shape (), (1,), (n,) or (n, 1)) -> float32 (n,)."""
    values = np.asarray(t, np.float32).reshape(-1)
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise QuantizationError(f"tensor {key!r}: scales must be positive and finite")
    if reciprocal:
        values = (np.float32(1.0) / values).astype(np.float32)
    return np.broadcast_to(values, (n,)).astype(np.float32)
