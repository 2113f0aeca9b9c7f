"""`gemma4-jax convert`: a Hugging Face checkpoint -> a directory that `from_pretrained` restores with orbax.

The model facade loads the checkpoint (any pp x tp layout) and this writes its parameters with orbax's
StandardCheckpointer plus the config, tokenizer and processor files and a metadata file (format, dtype,
quantization plan); orbax_io.py (the loading layer) reads such a directory back. The output appears complete or
not at all: everything is written to a temporary sibling directory which then replaces `output`.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, TextIO

import jax
import numpy as np
from flax import nnx

from gemma4_jax import checkpoint
from gemma4_jax.model import from_pretrained, resolve_dtype
from gemma4_jax.orbax_io import (
    COPIED_FILES,
    COPIED_PATTERNS,
    FORMAT,
    FORMAT_VERSION,
    METADATA_FILE,
    PARAMS_DIR,
    is_converted,
    looks_converted,
    path_str,
    plan_to_json,
)
from gemma4_jax.version import __version__


def _files_to_copy(src: str) -> list[str]:
    names = {n for n in COPIED_FILES if os.path.isfile(os.path.join(src, n))}
    for pattern in COPIED_PATTERNS:
        names.update(os.path.basename(f) for f in glob.glob(os.path.join(src, pattern)) if os.path.isfile(f))
    return sorted(names)


def _check_output(src: str, out: str, overwrite: bool) -> None:
    if os.path.realpath(src) == os.path.realpath(out):
        raise ValueError(f"--output {out!r} is the source checkpoint directory; choose another directory")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--output {out!r} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise ValueError(f"--output {out!r} exists and is not empty; pass --overwrite to replace a previous "
                             "conversion")
        if not looks_converted(out):
            # --overwrite replaces a previous conversion, never an arbitrary directory (e.g. a mistyped path).
            raise ValueError(f"--output {out!r} is not empty and holds no gemma4_jax conversion ({METADATA_FILE} "
                             "or params/); refusing to delete it even with --overwrite")


def convert(model_dir: str, output: str, dtype: str = "bfloat16", pp: int = 1, tp: int = 1,
            overwrite: bool = False, progress: TextIO | None = sys.stderr) -> dict[str, Any]:
    """Load a Hugging Face checkpoint with from_pretrained (laid out over pp x tp devices) and write a converted
    directory at `output`. Returns the metadata written. The output appears complete or not at all: everything is
    written to a temporary sibling directory which then replaces `output`."""
    import orbax.checkpoint as ocp


    def say(msg: str) -> None:
        if progress is not None:
            print(msg, file=progress, flush=True)

    model_dir, output = os.path.abspath(os.fspath(model_dir)), os.path.abspath(os.fspath(output))
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"--model {model_dir!r} is not a directory")
    if is_converted(model_dir):
        raise ValueError(f"--model {model_dir!r} is already a converted directory; convert the Hugging Face "
                         "checkpoint it came from")
    dtype_name = np.dtype(resolve_dtype(dtype)).name
    _check_output(model_dir, output, overwrite)

    say(f"loading {model_dir} ({dtype_name}, pp={pp}, tp={tp}) ...")
    t0 = time.perf_counter()
    model = from_pretrained(model_dir, dtype=dtype_name, pp=pp, tp=tp)
    flat = {path_str(p): v.get_value() for p, v in nnx.to_flat_state(model.state)}
    load_s = time.perf_counter() - t0
    nbytes = sum(int(a.size) * a.dtype.itemsize for a in flat.values())
    say(f"  loaded {len(flat)} arrays, {model.num_params():,} values, {nbytes / 2**20:.1f} MiB in {load_s:.1f} s")

    plan = checkpoint.quant_plan(model_dir, model.config)
    parent = os.path.dirname(output) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.converting-", dir=parent)
    try:
        t1 = time.perf_counter()
        say(f"writing {len(flat)} arrays to {os.path.join(output, PARAMS_DIR)} (orbax) ...")
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, PARAMS_DIR), flat)
            ckptr.wait_until_finished()
        save_s = time.perf_counter() - t1
        copied = _files_to_copy(model_dir)
        for name in copied:
            shutil.copy2(os.path.join(model_dir, name), os.path.join(tmp, name))
        say(f"  saved in {save_s:.1f} s; copied {', '.join(copied)}")
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dtype": dtype_name,
            "source": model_dir,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "converted_with": {"pp": pp, "tp": tp},
            "versions": {"gemma4_jax": __version__, "jax": jax.__version__,
                         "orbax_checkpoint": getattr(ocp, "__version__", "unknown")},
            "quant_plan": plan_to_json(plan),
            "num_values": model.num_params(),
            "bytes": nbytes,
            "copied_files": copied,
            "parameters": {name: {"shape": list(a.shape), "dtype": a.dtype.name} for name, a in sorted(flat.items())},
        }
        with open(os.path.join(tmp, METADATA_FILE), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.isdir(output):
            if os.listdir(output):  # checked above: a previous conversion (or empty)
                shutil.rmtree(output)
            else:
                os.rmdir(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"done: {output} ({load_s + save_s:.1f} s); load it with gemma4_jax.from_pretrained({output!r}, pp=..., "
        "tp=...)")
    return meta
