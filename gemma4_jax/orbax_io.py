"""Converted checkpoints: a Hugging Face checkpoint loaded once, its parameter state saved with orbax-checkpoint.

Layout of a converted directory (docs/convert.md):
    OUT/gemma4_jax_checkpoint.json   format name + version, dtype, source, quantization plan, parameter list
    OUT/params/                      orbax StandardCheckpointer (OCDBT + tensorstore): one array per parameter,
                                     keyed by its dotted nnx path ("layers.3.attn.q_proj.kernel")
    OUT/config.json, hf_quant_config.json, tokenizer and processor files, copied unchanged

Why orbax: the arrays are stored chunked, so `restore_state` hands orbax a target of ShapeDtypeStructs that carry
the sharding of the requested (pp, tp, dp) layout and each device reads only its own slices, whatever layout the
conversion ran with. Packed quantized weights (uint8 NVFP4, float8 FP8, float32 scales) are saved as they sit in
device memory; the quantization plan in the metadata rebuilds the packed modules before the restore.

A dtype other than the converted one is cast at read time by tensorstore (float parameters only; packed arrays
keep their own dtypes). Down-casting float32 -> bfloat16 gives exactly what loading the Hugging Face checkpoint in
bfloat16 gives; up-casting a bfloat16 conversion does not bring back the precision it dropped (a warning says so).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from gemma4_jax import quant, quant_formats
from gemma4_jax.checkpoint import CheckpointError

log = logging.getLogger(__name__)

FORMAT = "gemma4_jax.orbax"
FORMAT_VERSION = 1
METADATA_FILE = "gemma4_jax_checkpoint.json"
PARAMS_DIR = "params"

# Copied unchanged when present: the config (the model is rebuilt from it), the quantization config, and what the
# tokenizer / chat template / media processors need, so a converted directory serves like the original.
COPIED_FILES = (
    "config.json", "hf_quant_config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json",
    "processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
)
COPIED_PATTERNS = ("tokenizer*", "*chat_template*", "*processor_config.json")

# Float parameter dtypes that a restore may cast between (the model dtypes of model.resolve_dtype).
_CASTABLE = {"float32", "bfloat16", "float16"}


def path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


# ----------------------------------------------------------------------------------------------------------------
# Metadata


def is_converted(path: str) -> bool:
    """A directory written by `convert` (its metadata file is there)."""
    return os.path.isfile(os.path.join(path, METADATA_FILE))


def looks_converted(path: str) -> bool:
    """A directory with an orbax parameter tree but possibly no metadata (a broken or partial copy)."""
    return is_converted(path) or os.path.isdir(os.path.join(path, PARAMS_DIR))


def read_metadata(path: str) -> dict[str, Any]:
    """The metadata of a converted directory, checked: format name and version, dtype, parameter list."""
    file = os.path.join(path, METADATA_FILE)
    if not os.path.isfile(file):
        raise CheckpointError(f"{path}: {METADATA_FILE} is missing; a converted directory needs it (it records the "
                              "dtype and the quantization plan). Convert again with `gemma4-jax convert`.")
    try:
        with open(file) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not readable JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{file}: 'format' is {meta.get('format') if isinstance(meta, dict) else None!r}, "
                              f"expected {FORMAT!r}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{file}: format_version {version!r} is not supported by this gemma4_jax (it reads "
                              f"version {FORMAT_VERSION}); convert the Hugging Face checkpoint again")
    for key in ("dtype", "quant_plan", "parameters"):
        if key not in meta:
            raise CheckpointError(f"{file}: required key {key!r} is missing")
    if meta["dtype"] not in _CASTABLE:
        raise CheckpointError(f"{file}: dtype {meta['dtype']!r} is not one of {sorted(_CASTABLE)}")
    return meta


def plan_to_json(plan: quant.QuantPlan) -> dict[str, Any]:
    return {"linears": [list(x) for x in plan.linears], "experts": [list(x) for x in plan.experts],
            "config_source": os.path.basename(plan.config.source) if plan.config else None}


def plan_from_metadata(meta: dict[str, Any], path: str) -> quant.QuantPlan:
    """The quantization plan recorded at conversion (the quantization config is read again from the copied files)."""
    try:
        linears = tuple((str(p), str(f)) for p, f in meta["quant_plan"].get("linears", ()))
        experts = tuple((int(layer), str(f)) for layer, f in meta["quant_plan"].get("experts", ()))
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{os.path.join(path, METADATA_FILE)}: quant_plan is malformed ({e})") from None
    bad = sorted({f for _, f in linears + experts} - set(quant.FORMATS))
    if bad:
        raise CheckpointError(f"{os.path.join(path, METADATA_FILE)}: quant_plan formats {bad} are unknown; "
                              f"expected {list(quant.FORMATS)}")
    qcfg = quant_formats.read_quant_config(path) if linears or experts else None
    return quant.QuantPlan(linears, experts, qcfg)


# ----------------------------------------------------------------------------------------------------------------
# Restore


def restore_state(path: str, meta: dict[str, Any], abstract_state: nnx.State,
                  sharding_of, dtype_name: str) -> nnx.State:
    """Fill an abstract state (shapes, dtypes, and the metadata `sharding_of` reads) from OUT/params.

    Each parameter is restored straight into `sharding_of(var)` (a NamedSharding of the requested layout); orbax
    reads only the slices each device holds. Raises CheckpointError naming missing / unexpected parameters, shape
    or packed-dtype mismatches, and unreadable files.
    """
    import orbax.checkpoint as ocp

    params = os.path.join(path, PARAMS_DIR)
    if not os.path.isdir(params):
        raise CheckpointError(f"{params}: the orbax parameter directory is missing")
    for name in ("_METADATA", "_CHECKPOINT_METADATA"):
        if not os.path.isfile(os.path.join(params, name)):
            raise CheckpointError(f"{os.path.join(params, name)}: orbax metadata file is missing (incomplete copy?)")
    if meta["dtype"] != dtype_name:
        if dtype_name == "float32" or (dtype_name == "bfloat16" and meta["dtype"] == "float16"):
            log.warning("%s was converted in %s; loading it as %s casts, it does not restore the precision the "
                        "conversion dropped (convert again with --dtype %s for that)", path, meta["dtype"],
                        dtype_name, dtype_name)

    targets = {path_str(p): var for p, var in nnx.to_flat_state(abstract_state)}
    with ocp.StandardCheckpointer() as ckptr:
        try:
            stored = ckptr.metadata(params).item_metadata
        except Exception as e:  # orbax raises several kinds (FileNotFoundError, ValueError, tensorstore errors)
            raise CheckpointError(f"{params}: cannot read the orbax metadata ({type(e).__name__}: {e})") from None
        if stored is None:  # orbax logs and returns None when the tree metadata files are gone
            raise CheckpointError(f"{params}: the orbax tree metadata is missing or unreadable (incomplete copy?)")
        stored = dict(stored.tree if hasattr(stored, "tree") else stored)
        missing = sorted(set(targets) - set(stored))
        unexpected = sorted(set(stored) - set(targets))
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} parameter(s): " + ", ".join(missing[:20]))
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected parameter(s): " + ", ".join(unexpected[:20]))
        for name in sorted(set(targets) & set(stored)):
            var, info = targets[name], stored[name]
            if tuple(info.shape) != tuple(var.shape):
                problems.append(f"{name}: stored shape {tuple(info.shape)}, the model expects {tuple(var.shape)}")
            stored_dt, want_dt = np.dtype(info.dtype).name, np.dtype(var.dtype).name
            if stored_dt != want_dt and not (stored_dt in _CASTABLE and want_dt in _CASTABLE):
                problems.append(f"{name}: stored as {stored_dt}, the model expects {want_dt} (packed arrays are "
                                "never cast)")
        if problems:
            raise CheckpointError(f"converted checkpoint {path!r} does not match its config and metadata:\n  "
                                  + "\n  ".join(problems))
        target = {name: jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding_of(var))
                  for name, var in targets.items()}
        try:
            restored = ckptr.restore(params, target)
        except Exception as e:  # a deleted / truncated data file surfaces as a tensorstore error deep in orbax
            raise CheckpointError(f"{params}: restoring the parameters failed; the orbax data files are missing or "
                                  f"damaged ({type(e).__name__}: {str(e)[:500]})") from None
    flat = [(p, var.replace(restored[path_str(p)])) for p, var in nnx.to_flat_state(abstract_state)]
    return nnx.from_flat_state(flat)


# ----------------------------------------------------------------------------------------------------------------
# Convert
