"""JAX's persistent compilation cache, on by default for the engine, so a second start does not compile again.

Every jitted step shape is compiled the first time it runs; with the cache, XLA's executables are written to a
per-user directory and the next process loads them instead of compiling (keys include the program, the jax /
jaxlib versions and the device kind, so a stale entry is never used). Where it lives:

- `GEMMA4_JAX_COMPILATION_CACHE` names the directory, or disables it with `0` / `off` / `false` / `none`;
- else `$XDG_CACHE_HOME/gemma4-jax/jax-compilation` (default `~/.cache/gemma4-jax/jax-compilation`);
- `LLM(..., compilation_cache=...)` and the CLI's `--compilation-cache-dir DIR` / `--no-compilation-cache` override
  both.

JAX's own settings win: when the user already set `jax_compilation_cache_dir` we leave it alone. The cache is
bounded (8 GiB, least recently used entries evicted), which also makes JAX lock it across processes.
"""

from __future__ import annotations

import logging
import os

import jax
from jax.experimental.compilation_cache import compilation_cache as cc

log = logging.getLogger(__name__)

ENV = "GEMMA4_JAX_COMPILATION_CACHE"
_OFF = {"0", "off", "false", "none", "no", ""}
MAX_SIZE_BYTES = 8 * 2**30
# File names of one entry in JAX's size-bounded cache directory (jax/_src/lru_cache.py).
_CACHE_SUFFIX, _ATIME_SUFFIX = "-cache", "-atime"


def disable() -> None:
    """Turn the persistent cache off again (JAX's state included): tests that turned it on clean up with this."""
    jax.config.update("jax_compilation_cache_dir", None)
    cc.reset_cache()


def default_dir() -> str | None:
    """The directory the environment asks for (None: disabled)."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in _OFF else os.path.expanduser(value)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gemma4-jax", "jax-compilation")


def add_missing_access_times(directory: str) -> int:
    """Give every entry of the cache directory that lacks one an access-time file; returns how many were added.

    With a size bound JAX keeps `<key>-atime` beside each `<key>-cache` and, before every write, reads the access
    time of every entry to find what to evict; one entry without it (written by a process that ran without the
    bound: JAX's default, or a gemma4-jax before the bound) makes that read fail, and then every later write fails
    too (a warning per compile, nothing cached). The added time is the entry's modification time (8 bytes, little
    endian, nanoseconds: JAX's format), so old entries are evicted first."""
    try:
        names = set(os.listdir(directory))
    except OSError:
        return 0
    added = 0
    for name in names:
        if not name.endswith(_CACHE_SUFFIX):
            continue
        atime = name[: -len(_CACHE_SUFFIX)] + _ATIME_SUFFIX
        if atime in names:
            continue
        try:
            stamp = os.stat(os.path.join(directory, name)).st_mtime_ns
            with open(os.path.join(directory, atime), "wb") as f:
                f.write(stamp.to_bytes(8, "little"))
            added += 1
        except OSError:  # removed meanwhile by another process's eviction, or a read-only cache
            continue
    return added


def enable(path: str | bool | None = None) -> str | None:
    """Turn the persistent cache on (idempotent). path: a directory, False to leave it off, None for the
    environment's choice (`default_dir`). Returns the directory in use, or None when the cache is off."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current  # set by the user (or an earlier call): keep it
    if path is False:
        return None
    directory = default_dir() if path in (None, True) else os.path.expanduser(str(path))
    if directory is None:
        log.info("persistent compilation cache off (%s)", ENV)
        return None
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        log.warning("persistent compilation cache off: cannot create %s (%s)", directory, e)
        return None
    repaired = add_missing_access_times(directory)
    if repaired:
        log.info("persistent compilation cache: gave %d entries written without the size bound an access time",
                 repaired)
    jax.config.update("jax_compilation_cache_dir", directory)
    # JAX decides once, at its first compile, whether the cache is in use; start over so that turning it on after
    # something already compiled (e.g. a model built before the engine) still takes effect.
    cc.reset_cache()
    # Cache every compile: the engine's step shapes each take seconds, and the small ones add up at start-up.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # A size bound turns on JAX's LRU eviction, which takes a file lock around every read and write: without it a
    # process can read an entry another process is still writing, and deserialising a torn executable aborts.
    if not jax.config.jax_compilation_cache_max_size or jax.config.jax_compilation_cache_max_size < 0:
        jax.config.update("jax_compilation_cache_max_size", MAX_SIZE_BYTES)
    log.info("persistent compilation cache: %s (set %s=off to disable)", directory, ENV)
    return directory
