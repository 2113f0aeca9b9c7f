"""Hugging Face safetensors checkpoints -> parameter tree, as a table of key patterns.

- Files: one `model.safetensors`, a sharded set with `model.safetensors.index.json`, or a directory of
  `*.safetensors`. Tensors are read one at a time from memory-mapped files (our own small reader: the safetensors
  package's numpy path lacks bfloat16/FP8 without extras), transformed, cast to the requested dtype and put on the
  devices with their sharding; no second full copy of the model ever exists in host memory.
- Keys: the prefixes of both architectures (`model.` for Gemma4ForCausalLM, `model.language_model.` for
  Gemma4ForConditionalGeneration) are stripped, then `TABLE` maps the rest to a parameter path and a transform.
- Checks: every parameter filled, every tensor used or knowingly ignored (K/V weights of KV-shared layers, the
  tied LM head, towers in a text-only load), shapes equal to what the config implies, files not truncated.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from gemma4_jax.config import ModelConfig

log = logging.getLogger(__name__)

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint that does not match its config or cannot be read."""


# ----------------------------------------------------------------------------------------------------------------
# Reading safetensors files


@dataclasses.dataclass
class TensorInfo:
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


class SafetensorsFile:
    """Header of one .safetensors file plus a lazily opened memory map of its data."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated file ({size} bytes), no safetensors header")
            n = int.from_bytes(raw, "little")
            if n <= 0 or 8 + n > size:
                raise CheckpointError(f"{path}: truncated or not safetensors (header of {n} bytes, file {size})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
        self.data_offset = 8 + n
        self.metadata = header.pop("__metadata__", {}) or {}
        self.tensors: dict[str, TensorInfo] = {}
        for key, info in header.items():
            start, end = info["data_offsets"]
            if info["dtype"] not in _DTYPES:
                raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
            if self.data_offset + end > size:
                raise CheckpointError(
                    f"{path}: truncated: tensor {key!r} ends at byte {self.data_offset + end}, file has {size}"
                )
            shape = tuple(int(s) for s in info["shape"])
            itemsize = np.dtype(_DTYPES[info["dtype"]]).itemsize
            if end - start != math.prod(shape) * itemsize:
                raise CheckpointError(f"{path}: tensor {key!r} byte range does not match shape {shape}")
            self.tensors[key] = TensorInfo(path, info["dtype"], shape, start, end)
        self._mmap: np.memmap | None = None

    def get(self, key: str) -> np.ndarray:
        """The tensor as a read-only view into the memory map (no copy)."""
        info = self.tensors[key]
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mmap[self.data_offset + info.start : self.data_offset + info.end]
        return raw.view(_DTYPES[info.dtype]).reshape(info.shape)


class CheckpointFiles:
    """All tensors of a checkpoint directory, by key."""

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise CheckpointError(f"checkpoint directory {path!r} does not exist")
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not os.path.exists(os.path.join(path, n))]
            if missing:
                raise CheckpointError(f"{index} lists shard file(s) that are missing: {missing}")
            files = [os.path.join(path, n) for n in names]
        else:
            files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
            if not files:
                raise CheckpointError(f"no *.safetensors files in {path!r}")
            weight_map = None
        self.files = {f: SafetensorsFile(f) for f in files}
        self.where: dict[str, SafetensorsFile] = {}
        for sf in self.files.values():
            for key in sf.tensors:
                self.where[key] = sf
        if weight_map is not None:
            absent = sorted(
                k for k, fname in weight_map.items() if k not in self.files[os.path.join(path, fname)].tensors
            )
            if absent:
                raise CheckpointError(f"index lists tensors missing from their shard files: {absent[:10]}")

    def keys(self) -> list[str]:
        return sorted(self.where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.where[key].tensors[key].shape

    def get(self, key: str) -> np.ndarray:
        return self.where[key].get(key)


# ----------------------------------------------------------------------------------------------------------------
# The key table


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


def _rule(pattern: str, path: str, kind: str = "identity", n_in: int = 1) -> Rule:
    kinds = {
        "identity": (_identity, _identity_shape),
        "linear": (_linear, lambda t: _linear_shape(t, n_in)),
        "experts": (_experts, _experts_shape),
    }
    transform, shape = kinds[kind]
    return Rule(re.compile(pattern + r"$"), path, transform, shape)


_L = r"layers\.(\d+)\."
TABLE: tuple[Rule, ...] = (
    _rule(r"embed_tokens\.weight", "embed_tokens.embedding"),
    _rule(r"embed_tokens_per_layer\.weight", "embed_tokens_per_layer.embedding"),
    _rule(r"per_layer_model_projection\.weight", "per_layer_model_projection.kernel", "linear"),
    _rule(r"per_layer_projection_norm\.weight", "per_layer_projection_norm.weight"),
    _rule(r"norm\.weight", "norm.weight"),
    _rule(r"lm_head\.weight", "lm_head.kernel", "linear"),
    _rule(_L + r"self_attn\.(q|k|v)_proj\.weight", "layers.{0}.self_attn.{1}_proj.kernel", "linear"),
    _rule(_L + r"self_attn\.o_proj\.weight", "layers.{0}.self_attn.o_proj.kernel", "linear", n_in=2),
    _rule(_L + r"self_attn\.(q|k)_norm\.weight", "layers.{0}.self_attn.{1}_norm.weight"),
    _rule(_L + r"mlp\.(gate|up|down)_proj\.weight", "layers.{0}.mlp.{1}_proj.kernel", "linear"),
    _rule(_L + r"(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|post_feedforward_layernorm"
          r"|post_feedforward_layernorm_1|post_per_layer_input_norm)\.weight", "layers.{0}.{1}.weight"),
    _rule(_L + r"(per_layer_input_gate|per_layer_projection)\.weight", "layers.{0}.{1}.kernel", "linear"),
    _rule(_L + r"layer_scalar", "layers.{0}.layer_scalar"),
    _rule(_L + r"router\.proj\.weight", "layers.{0}.moe.router.proj.kernel", "linear"),
    _rule(_L + r"router\.(scale|per_expert_scale)", "layers.{0}.moe.router.{1}"),
    _rule(_L + r"experts\.(gate_up_proj|down_proj)", "layers.{0}.moe.experts.{1}", "experts"),
    _rule(_L + r"(pre_feedforward_layernorm_2|post_feedforward_layernorm_2)\.weight", "layers.{0}.moe.{1}.weight"),
)

_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.", "")
_TOWER_PREFIXES = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.",
                   "vision_tower.", "audio_tower.", "embed_vision.", "embed_audio.", "multi_modal_projector.")


def _strip(key: str) -> str:
    if key == "lm_head.weight":
        return key
    for prefix in _TEXT_PREFIXES:
        if prefix and key.startswith(prefix):
            return key[len(prefix):]
    return key


def _ignored(key: str, cfg: ModelConfig) -> str | None:
    """Why a checkpoint tensor is knowingly not loaded, or None."""
    text = cfg.text
    if key.startswith(_TOWER_PREFIXES):
        return "multimodal tower (text-only load)"
    short = _strip(key)
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
    short = _strip(key)
    for rule in TABLE:
        m = rule.pattern.match(short)
        if m:
            return rule.path.format(*m.groups()), rule
    return None


# ----------------------------------------------------------------------------------------------------------------
# Loading


def _path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def iter_targets(abstract_state: nnx.State) -> Iterator[tuple[str, nnx.Variable]]:
    for path, var in nnx.to_flat_state(abstract_state):
        yield _path_str(path), var


def load_state(
    path: str,
    cfg: ModelConfig,
    abstract_state: nnx.State,
    sharding_of: Callable[[nnx.Variable], jax.sharding.Sharding],
    dtype,
) -> nnx.State:
    """Fill an abstract state (from nnx.eval_shape) with checkpoint tensors, placed with `sharding_of(var)`.

    Raises CheckpointError naming missing parameters, unexpected tensors and wrong shapes.
    """
    files = CheckpointFiles(path)
    targets = dict(iter_targets(abstract_state))
    loaded: dict[str, jax.Array] = {}
    unexpected, skipped, bad_shapes = [], {}, []
    plan, planned = [], set()
    for key in files.keys():
        mapped = map_key(key)
        if mapped is None or mapped[0] not in targets:
            why = _ignored(key, cfg)
            if why:
                skipped[why] = skipped.get(why, 0) + 1
            else:
                unexpected.append(key)
            continue
        target_path, rule = mapped
        if target_path in planned:
            raise CheckpointError(f"{path}: tensor {key!r} maps to {target_path}, which another tensor already fills")
        var = targets[target_path]
        want = rule.hf_shape(tuple(var.shape))
        got = files.shape(key)
        if tuple(got) != tuple(want):
            bad_shapes.append(f"{key}: checkpoint shape {tuple(got)}, config implies {tuple(want)}")
            continue
        plan.append((target_path, key, rule))
        planned.add(target_path)
    missing = sorted(set(targets) - planned)
    problems = []
    if bad_shapes:
        problems.append("wrong shapes:\n  " + "\n  ".join(bad_shapes))
    if missing:
        problems.append(f"missing tensors for {len(missing)} parameter(s): " + ", ".join(missing[:20])
                        + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): " + ", ".join(unexpected[:20])
                        + (" ..." if len(unexpected) > 20 else ""))
    if problems:
        raise CheckpointError(f"checkpoint {path!r} does not match its config:\n" + "\n".join(problems))

    for target_path, key, rule in plan:
        var = targets[target_path]
        host = rule.transform(files.get(key), tuple(var.shape)).astype(dtype, copy=False)
        loaded[target_path] = jax.device_put(host, sharding_of(var))
        del host
    for why, count in skipped.items():
        log.info("skipped %d tensor(s): %s", count, why)

    flat = [(p, var.replace(loaded[_path_str(p)])) for p, var in nnx.to_flat_state(abstract_state)]
    return nnx.from_flat_state(flat)
