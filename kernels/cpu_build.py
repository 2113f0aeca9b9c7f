"""Building and registering the CPU custom calls (kernels/cpu_attention, kernels/cpu_matmul, kernels/cpu_sampler).

Each kernel is one C++ source written against the XLA FFI headers that jaxlib ships (`jax.ffi.include_dir()`), plus
the shared cpu_ffi_common.h. It is compiled on first use with the machine's C++ compiler (`$CXX`, else g++, c++ or
clang++) and `-march=native`, into a cache folder (`$GEMMA4_JAX_KERNEL_CACHE`, else `~/.cache/gemma4_jax/kernels`)
under a name that hashes the source and the shared header, jaxlib's version, the flags and the CPU's feature flags:
a changed source, jaxlib or machine gets its own build, and a second process reuses the first one's (a build takes
~3 s). Where no compiler exists or the build fails, `load` returns the reason and the code that would use the
kernel keeps to XLA (the attention backend reports itself unavailable with that reason); GEMMA4_JAX_CPU_KERNELS=0
switches every CPU kernel off the same way.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax

SWITCH_ENV = "GEMMA4_JAX_CPU_KERNELS"
CACHE_ENV = "GEMMA4_JAX_KERNEL_CACHE"
# The headers every source includes (cpu_ffi_common.h): part of each build's hash, with those beside the source.
HEADERS = Path(__file__).parent
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC")


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_path(source: Path) -> Path:
    """Where this machine's build of `source` lives (it may not exist yet)."""
    import jaxlib

    key = hashlib.sha256()
    # The shared headers and the kernel's own (kernels/cpu_matmul/few_rows.h).
    headers = [h.read_bytes() for folder in (HEADERS, source.parent) for h in sorted(folder.glob("*.h"))]
    for part in (source.read_bytes(), *headers, jaxlib.__version__.encode(), " ".join(FLAGS).encode(),
                 cpu_flags().encode()):
        key.update(part)
    folder = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gemma4_jax" / "kernels")
    return folder / f"{source.stem}-{key.hexdigest()[:16]}.so"


def build(source: Path) -> Path:
    """Compile `source` (if this machine has no build of it yet) and return the library's path. Raises
    RuntimeError naming what failed."""
    path = library_path(source)
    if path.exists():
        return path
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX, or install g++)")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes building at once never load a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(source), "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"building {source.name} failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def switched_off() -> str | None:
    value = os.environ.get(SWITCH_ENV, "").strip().lower()
    return f"switched off by {SWITCH_ENV}={os.environ[SWITCH_ENV]}" if value in ("0", "false", "no", "off") else None


@functools.cache
def load(source: Path, symbol: str, target: str) -> str | None:
    """Build `source` and register its handler `symbol` as the CPU custom call `target`, once per process.
    Returns None when it is ready, else why it is not."""
    reason = switched_off()
    if reason is not None:
        return reason
    try:
        lib = ctypes.CDLL(str(build(source)))
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (RuntimeError, OSError, AttributeError, subprocess.SubprocessError) as err:
        return f"the CPU kernel {source.name} could not be built: {err}"
    return None
