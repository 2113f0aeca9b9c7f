"""Hugging Face safetensors checkpoints -> parameter tree, as a table of key patterns.

- Files: one `model.safetensors`, a sharded set with `model.safetensors.index.json`, or a directory of
  `*.safetensors`. Tensors are read one at a time from memory-mapped files (our own small reader: the safetensors
  package's numpy path lacks bfloat16/FP8 without extras), transformed, cast to the requested dtype and put on the
  devices with their sharding; no second full copy of the model ever exists in host memory.
- Keys: the prefixes of both architectures (`model.` for Gemma4ForCausalLM, `model.language_model.` for
  Gemma4ForConditionalGeneration) are stripped, then the key tables (checkpoint_rules.py) map the rest to a
  parameter path and a transform.
- Quantized checkpoints (ModelOpt NVFP4, compressed-tensors FP8 / NVFP4) and per-expert tensors: `_scan` finds the
  packed modules from the tensors present, `apply_quant_plan` builds packed modules for them, and the loader fills
  them without unpacking (quant.py describes the formats).
- Checks: every parameter filled, every tensor used or knowingly ignored (K/V weights of KV-shared layers, the
  tied LM head, towers in a text-only load), shapes equal to what the config implies, files not truncated.
"""

from __future__ import annotations

import dataclasses
import functools
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

from gemma4_jax import quant, quant_formats
from gemma4_jax.checkpoint_rules import LAYER_PREFIX as _L
from gemma4_jax.checkpoint_rules import TOWER_PREFIXES as _TOWER_PREFIXES
from gemma4_jax.checkpoint_rules import Rule, ignored, map_key, strip_prefix
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
# Quantized and per-expert tensors
#
# A module is quantized when the checkpoint says so with its tensors: packed weights (uint8 NVFP4, float8 FP8) and
# their scales. ModelOpt NVFP4: weight, weight_scale, weight_scale_2 (+ input_scale); compressed-tensors NVFP4:
# weight_packed, weight_scale, weight_global_scale (= 1 / weight_scale_2); FP8: weight, weight_scale (per channel or
# per tensor). Experts come fused (experts.gate_up_proj / down_proj, unquantized) or per expert
# (experts.<e>.{gate,up,down}_proj.<leaf>, also under "moe." or "mlp."), stacked into (E, ...) while streaming.

_LEAF = re.compile(r"(.*)\.(weight_packed|weight_scale_2|weight_scale|weight_global_scale|input_scale"
                   r"|input_global_scale|weight)$")
_PER_EXPERT = re.compile(_L + r"(?:mlp\.|moe\.)?experts\.(\d+)\.(gate|up|down)_proj$")
_FLOATS = ("F64", "F32", "F16", "BF16")
_REQUIRED = {
    ("nvfp4", "modelopt"): ("weight", "weight_scale", "weight_scale_2"),
    ("nvfp4", "compressed-tensors"): ("weight_packed", "weight_scale", "weight_global_scale"),
    ("fp8", None): ("weight", "weight_scale"),
    (None, None): ("weight",),
}


@dataclasses.dataclass(frozen=True)
class Piece:
    """One checkpoint tensor's contribution: the whole of a parameter, a slice of one (index), or nothing
    (target None: read and validated, e.g. an activation scale of a weight-only model)."""

    key: str
    target: str | None
    shapes: tuple[tuple[int, ...], ...]  # accepted checkpoint shapes
    dtypes: tuple[str, ...]  # accepted safetensors dtypes
    convert: Callable[[np.ndarray], np.ndarray]
    index: tuple | None = None
    why: str = ""  # what the tensor is, for error messages


@dataclasses.dataclass
class _Module:
    """The tensors of one linear-like module of the checkpoint: short base name -> {leaf: full key}."""

    base: str
    leaves: dict[str, str]
    fmt: str | None = None
    flavor: str | None = None  # NVFP4 naming: "modelopt" or "compressed-tensors"

    def full_name(self) -> str:
        key = next(iter(self.leaves.values()))
        return key[: key.rindex(".")]


def _module_format(mod: _Module, files: CheckpointFiles) -> None:
    leaves = mod.leaves
    weight = leaves.get("weight") or leaves.get("weight_packed")
    dtype = files.where[weight].tensors[weight].dtype if weight else None
    if "weight_packed" in leaves or "weight_global_scale" in leaves:
        mod.fmt, mod.flavor = quant.NVFP4, "compressed-tensors"
    elif dtype == "U8" or "weight_scale_2" in leaves:
        mod.fmt, mod.flavor = quant.NVFP4, "modelopt"
    elif dtype == "F8_E4M3":
        mod.fmt = quant.FP8
    elif dtype == "F8_E5M2":
        raise CheckpointError(f"tensor {weight!r}: float8_e5m2 weights are not supported (FP8 E4M3 and NVFP4 are)")
    elif set(leaves) - {"weight"}:
        raise CheckpointError(f"{mod.full_name()}: has quantization scales {sorted(set(leaves) - {'weight'})} but "
                              f"its weight is {dtype or 'missing'}, not a packed NVFP4 (uint8) or FP8 tensor")


def _missing_leaves(mod: _Module) -> list[str]:
    need = _REQUIRED[(mod.fmt, mod.flavor if mod.fmt == quant.NVFP4 else None)]
    prefix = mod.full_name()
    return [f"{prefix}.{leaf}" for leaf in need if leaf not in mod.leaves]


@dataclasses.dataclass
class _Scan:
    linears: dict[str, _Module]  # parameter path of a quantized Linear module -> its tensors
    experts: dict[int, dict[tuple[int, str], _Module]]  # layer -> (expert, proj) -> tensors
    plan: quant.QuantPlan


def _scan(files: CheckpointFiles, cfg: ModelConfig, path: str) -> _Scan:
    """Find the quantized modules and the per-expert tensors, check them against each other and the quant config."""
    text = cfg.text
    qcfg = quant_formats.read_quant_config(path)
    modules: dict[str, _Module] = {}
    for key in files.keys():
        if key.startswith(_TOWER_PREFIXES):
            continue
        m = _LEAF.match(strip_prefix(key))
        if m:
            modules.setdefault(m.group(1), _Module(m.group(1), {})).leaves[m.group(2)] = key
    linears: dict[str, _Module] = {}
    experts: dict[int, dict[tuple[int, str], _Module]] = {}
    missing: list[str] = []
    for base, mod in modules.items():
        expert = _PER_EXPERT.match(base)
        if expert and not text.enable_moe_block:
            continue  # left to the generic checks: unexpected tensors of a dense model
        _module_format(mod, files)
        if expert:
            layer, e, proj = int(expert.group(1)), int(expert.group(2)), expert.group(3)
            experts.setdefault(layer, {})[(e, proj)] = mod
        elif mod.fmt is not None:
            mapped = map_key(next(iter(mod.leaves.values())).rsplit(".", 1)[0] + ".weight")
            if mapped is None or not mapped[0].endswith(".kernel"):
                raise CheckpointError(f"{mod.full_name()}: quantized tensors for a module that is not a linear layer "
                                      "of this model")
            linears[mapped[0][: -len(".kernel")]] = mod
        else:
            continue
        missing += _missing_leaves(mod)
    expert_formats: list[tuple[int, str]] = []
    for layer, mods in sorted(experts.items()):
        if layer >= text.num_hidden_layers:
            raise CheckpointError(f"per-expert tensors for layer {layer}, but the config has {text.num_hidden_layers}")
        fmts = {mod.fmt for mod in mods.values()}
        if len(fmts) > 1:
            raise CheckpointError(f"layer {layer}: experts mix formats {sorted(str(f) for f in fmts)}; all of a "
                                  "layer's experts must be quantized alike")
        extra = sorted(e for e, _ in mods if e >= text.num_experts)
        if extra:
            raise CheckpointError(f"layer {layer}: tensors for expert(s) {extra}, but num_experts={text.num_experts}")
        example = next(iter(mods.values())).full_name()
        stem = example[: example.rindex("experts.")] + "experts"
        for e in range(text.num_experts):
            for proj in ("gate", "up", "down"):
                if (e, proj) not in mods:
                    missing.append(f"{stem}.{e}.{proj}_proj.weight")
        fmt = fmts.pop()
        if fmt is not None:
            expert_formats.append((layer, fmt))
    if missing:
        raise CheckpointError(f"checkpoint {path!r}: missing tensor(s): " + ", ".join(sorted(missing)[:20])
                              + (" ..." if len(missing) > 20 else ""))
    plan = quant.QuantPlan(tuple(sorted((p, m.fmt) for p, m in linears.items())), tuple(expert_formats), qcfg)
    quantized = list(linears.values()) + [m for layer, _ in expert_formats for m in experts[layer].values()]
    if quantized:
        found = sorted({m.fmt for m in quantized})
        if qcfg is None:
            raise CheckpointError(f"checkpoint {path!r} has quantized tensors (e.g. {quantized[0].full_name()}, "
                                  f"{found}) but no quantization_config in config.json nor hf_quant_config.json")
        if not set(found) <= set(qcfg.formats):
            raise CheckpointError(f"checkpoint {path!r}: tensors are quantized as {found} but {qcfg.source} declares "
                                  f"{qcfg.method} {list(qcfg.formats)}")
        excluded = [m.full_name() for m in quantized if qcfg.is_excluded(m.full_name())]
        if excluded:
            raise CheckpointError(f"checkpoint {path!r}: module(s) {excluded[:5]} carry quantized tensors but "
                                  f"{qcfg.source} excludes them from quantization")
    elif qcfg is not None:
        log.warning("%s declares %s quantization but no tensor is quantized", qcfg.source, qcfg.method)
    return _Scan(linears, experts, plan)


def quant_plan(path: str, cfg: ModelConfig) -> quant.QuantPlan:
    """Which modules of this checkpoint are quantized, and how (from its tensors, checked against its config)."""
    return _scan(CheckpointFiles(path), cfg, path).plan


def _packed_pieces(mod: _Module, target: str, fmt: str, rows: int, k: int, index: tuple | None) -> list[Piece]:
    """Pieces of one packed projection: `rows` output rows (of the target's N, at `index`), `k` inputs."""
    idx = index if index is not None else ()
    whole = index is None
    pieces = []
    for leaf, key in mod.leaves.items():
        if leaf in ("input_scale", "input_global_scale"):
            pieces.append(Piece(key, None, ((), (1,)), _FLOATS, lambda t, key=key: quant_formats.host_scalar(t, key),
                                why="activation scale (read and checked; activations stay unquantized)"))
        elif leaf in ("weight", "weight_packed"):
            shape = (rows, k // 2) if fmt == quant.NVFP4 else (rows, k)
            pieces.append(Piece(key, f"{target}.w", (shape,), ("U8",) if fmt == quant.NVFP4 else ("F8_E4M3",),
                                lambda t: t, None if whole else idx,
                                "NVFP4 packs two E2M1 values per byte" if fmt == quant.NVFP4 else "FP8 weight"))
        elif leaf == "weight_scale" and fmt == quant.NVFP4:
            pieces.append(Piece(key, f"{target}.block_scale", ((rows, k // quant.NVFP4_BLOCK),), ("F8_E4M3",),
                                lambda t: t, None if whole else idx, "NVFP4 block scales, one per 16 inputs"))
        elif leaf in ("weight_scale", "weight_scale_2", "weight_global_scale"):
            shapes = ((), (1,)) if leaf != "weight_scale" else ((), (1,), (rows,), (rows, 1))
            convert = functools.partial(quant_formats.host_rows, n=rows, key=key,
                                        reciprocal=leaf == "weight_global_scale")
            pieces.append(Piece(key, f"{target}.row_scale", shapes, _FLOATS, convert, None if whole else idx,
                                "per-tensor scale" if leaf != "weight_scale" else "FP8 per-channel scale"))
        else:
            raise CheckpointError(f"tensor {key!r}: a {leaf} does not belong to a {fmt} weight")
    return pieces


def _expert_pieces(layer: int, mods: dict[tuple[int, str], _Module], fmt: str | None,
                   text) -> list[Piece]:
    d, i = text.hidden_size, text.moe_intermediate_size
    target = f"layers.{layer}.moe.experts"
    pieces = []
    for (e, proj), mod in mods.items():
        cols = {"gate": slice(0, i), "up": slice(i, 2 * i), "down": slice(None)}[proj]
        rows, k = (d, i) if proj == "down" else (i, d)
        if fmt is None:
            key = mod.leaves["weight"]
            unexpected = sorted(set(mod.leaves) - {"weight"})
            if unexpected:
                raise CheckpointError(f"{mod.full_name()}: unexpected {unexpected} beside an unquantized weight")
            name = "down_proj" if proj == "down" else "gate_up_proj"
            # HF (out, in) -> our (in, out) stacks: gate_up (E, D, 2I), down (E, I, D).
            pieces.append(Piece(key, f"{target}.{name}", ((rows, k),), _FLOATS, lambda t: t.T, (e, slice(None), cols),
                                f"expert {e} {proj} projection"))
        else:
            name = "down" if proj == "down" else "gate_up"
            pieces += _packed_pieces(mod, f"{target}.{name}", fmt, rows, k, (e, cols))
    return pieces


def apply_quant_plan(module, plan: quant.QuantPlan, moe_backend: str = "xla"):
    """Swap the Linear / Experts modules that the plan quantizes for packed ones (inside nnx.eval_shape), and set the
    MoE backend of every layer. `module`: a Gemma4Text (or subclass). Returns it."""
    from gemma4_jax.layers import QuantLinear
    from gemma4_jax.moe import QuantExperts

    for path, fmt in plan.linears:
        *parents, name = path.split(".")
        parent = module
        for part in parents:
            parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
        old = getattr(parent, name)
        axes = old.kernel.get_metadata()["logical_axes"]
        n_in = len(old.in_shape)
        setattr(parent, name, QuantLinear(old.in_shape, old.out_shape, axes[:n_in], axes[n_in:], fmt))
    for layer, fmt in plan.experts:
        module.layers[layer].moe.experts = QuantExperts(module.cfg, fmt)
    for layer in module.layers:
        if getattr(layer, "moe", None) is not None:
            layer.moe.experts.backend = moe_backend
    return module


# ----------------------------------------------------------------------------------------------------------------
# Loading


def _path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def iter_targets(abstract_state: nnx.State) -> Iterator[tuple[str, nnx.Variable]]:
    for path, var in nnx.to_flat_state(abstract_state):
        yield _path_str(path), var


def _table_piece(key: str, target: str, rule: Rule, var: nnx.Variable) -> Piece:
    shape = tuple(var.shape)
    return Piece(key, target, (tuple(rule.hf_shape(shape)),), (), lambda t: rule.transform(t, shape))


def load_state(
    path: str,
    cfg: ModelConfig,
    abstract_state: nnx.State,
    sharding_of: Callable[[nnx.Variable], jax.sharding.Sharding],
    dtype=None,
) -> nnx.State:
    """Fill an abstract state (from nnx.eval_shape, with `apply_quant_plan` applied for a quantized checkpoint) with
    checkpoint tensors, each cast to its parameter's dtype and placed with `sharding_of(var)`.

    Tensors are read one at a time from the memory map; a stacked parameter (per-expert tensors) is assembled in one
    host buffer of its own size and put on the devices before the next parameter starts.
    Raises CheckpointError naming missing parameters or tensors, unexpected tensors, wrong shapes and dtypes.
    """
    del dtype  # each parameter's own dtype decides (packed weights keep theirs)
    files = CheckpointFiles(path)
    scan = _scan(files, cfg, path)
    targets = dict(iter_targets(abstract_state))
    pieces: list[Piece] = []
    consumed: set[str] = set()
    for target, mod in scan.linears.items():
        rows = math.prod(targets[f"{target}.row_scale"].shape) if f"{target}.row_scale" in targets else 0
        if not rows:
            raise CheckpointError(f"{mod.full_name()} is quantized but the model built for it is not (internal: "
                                  "build the abstract model with checkpoint.apply_quant_plan)")
        k = (targets[f"{target}.w"].shape[-1] * (2 if mod.fmt == quant.NVFP4 else 1))
        pieces += _packed_pieces(mod, target, mod.fmt, rows, k, None)
        consumed.update(mod.leaves.values())
    expert_fmt = dict(scan.plan.experts)
    for layer, mods in scan.experts.items():
        pieces += _expert_pieces(layer, mods, expert_fmt.get(layer), cfg.text)
        consumed.update(k for m in mods.values() for k in m.leaves.values())

    unexpected, skipped = [], {}
    for key in files.keys():
        if key in consumed:
            continue
        mapped = map_key(key)
        if mapped is None or mapped[0] not in targets:
            why = ignored(key, cfg)
            if why:
                skipped[why] = skipped.get(why, 0) + 1
            else:
                unexpected.append(key)
            continue
        pieces.append(_table_piece(key, mapped[0], mapped[1], targets[mapped[0]]))

    by_target: dict[str, list[Piece]] = {}
    bad = []
    for piece in pieces:
        info = files.where[piece.key].tensors[piece.key]
        if tuple(info.shape) not in piece.shapes:
            want = " or ".join(str(s) for s in piece.shapes)
            bad.append(f"{piece.key}: checkpoint shape {tuple(info.shape)}, expected {want}"
                       + (f" ({piece.why})" if piece.why else ""))
        elif piece.dtypes and info.dtype not in piece.dtypes:
            bad.append(f"{piece.key}: dtype {info.dtype}, expected {' or '.join(piece.dtypes)}"
                       + (f" ({piece.why})" if piece.why else ""))
        elif piece.target is None:
            piece.convert(files.get(piece.key))  # validates; nothing to store
            skipped[piece.why] = skipped.get(piece.why, 0) + 1
        else:
            if piece.target not in targets:
                bad.append(f"{piece.key}: maps to {piece.target}, which this model does not have")
                continue
            group = by_target.setdefault(piece.target, [])
            if group and (piece.index is None or group[0].index is None):
                raise CheckpointError(f"{path}: tensor {piece.key!r} maps to {piece.target}, which "
                                      f"{group[0].key!r} already fills")
            group.append(piece)
    missing = sorted(set(targets) - set(by_target))
    problems = []
    if bad:
        problems.append("wrong shapes or dtypes:\n  " + "\n  ".join(bad[:30]))
    if missing:
        problems.append(f"missing tensors for {len(missing)} parameter(s): " + ", ".join(missing[:20])
                        + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): " + ", ".join(unexpected[:20])
                        + (" ..." if len(unexpected) > 20 else ""))
    if problems:
        raise CheckpointError(f"checkpoint {path!r} does not match its config:\n" + "\n".join(problems))

    loaded: dict[str, jax.Array] = {}
    for target, group in by_target.items():
        var = targets[target]
        if group[0].index is None:
            host = np.asarray(group[0].convert(files.get(group[0].key))).astype(var.dtype, copy=False)
        else:
            host = np.zeros(var.shape, var.dtype)
            for piece in group:
                host[piece.index] = np.asarray(piece.convert(files.get(piece.key))).astype(var.dtype, copy=False)
        loaded[target] = jax.device_put(host, sharding_of(var))
        del host
    for why, count in skipped.items():
        log.info("skipped %d tensor(s): %s", count, why)

    flat = [(p, var.replace(loaded[_path_str(p)])) for p, var in nnx.to_flat_state(abstract_state)]
    return nnx.from_flat_state(flat)
