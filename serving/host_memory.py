"""Host memory of the CPU backend: keep freed memory in the process instead of returning it to the kernel.

XLA:CPU allocates each execution's temporaries as one block with the host's malloc. A decode step's block is
larger than glibc's largest mmap threshold (32 MB: bench-100m's batch-64 step has 59 MB of temporaries, mostly the
sampler's (rows, vocab) arrays), so glibc maps it fresh on every step and unmaps it afterwards, and every page the
step writes (~18 MB) is a page fault, zeroed by the kernel, ~4,500 per step. Measured on the 2-core bench machine
(docs/benchmarks.md, "Page faults of the step's temporaries"): a batch-64 step went from 4,545 faults to 25-178
and its decode steps 5-15% faster in bfloat16 and float32; batch 1 (1 MB of temporaries, reused) is unchanged.

`keep_freed_memory` sets glibc's malloc to never map large blocks separately (M_MMAP_MAX = 0), never give the top
of a heap back (M_TRIM_THRESHOLD = 1 GiB), not unmap an emptied per-thread heap (those are mapped 64 MB regions,
deleted when free unless M_TOP_PAD covers them: 64 MiB) and give threads started later the main arena
(M_ARENA_MAX = 1; XLA's threads already have theirs when the engine starts). The cost is the usual one of
serving allocators (tcmalloc, jemalloc, which vLLM's CPU backend asks to preload): memory freed after the peak
stays in the process for reuse. The engine applies it once per process when its devices are CPUs;
GEMMA4_JAX_KEEP_FREED_MEMORY=0 leaves malloc alone (other platforms, or glibc missing: nothing to do).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys

log = logging.getLogger(__name__)

ENV = "GEMMA4_JAX_KEEP_FREED_MEMORY"
# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS: tuple[tuple[str, int, int], ...] = (
    ("M_MMAP_MAX", M_MMAP_MAX, 0),
    ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, 1 << 30),
    ("M_TOP_PAD", M_TOP_PAD, 64 << 20),
    ("M_ARENA_MAX", M_ARENA_MAX, 1),
)

def enabled_by_env() -> bool:
    """GEMMA4_JAX_KEEP_FREED_MEMORY: unset or "1" on, "0" off; anything else is refused with ValueError."""
    value = os.environ.get(ENV, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{ENV} must be 0 or 1, got {value!r}")
    return value == "1"


@functools.cache
def keep_freed_memory() -> bool:
    """Apply the malloc settings above once per process (later calls return the first call's result). True when
    they are in effect; False when switched off by the environment or when the C library is not glibc."""
    if not enabled_by_env() or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        version, mallopt = libc.gnu_get_libc_version, libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt settings to speak of)
        return False
    version.restype = ctypes.c_char_p
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    failed = [name for name, param, value in SETTINGS if mallopt(param, value) != 1]
    if failed:
        log.warning("glibc %s refused mallopt %s; freed host memory may be returned to the kernel",
                    version().decode(), ", ".join(failed))
        return False
    log.info("host malloc keeps freed memory (glibc %s: %s)", version().decode(),
             ", ".join(f"{name}={value}" for name, _, value in SETTINGS))
    return True
