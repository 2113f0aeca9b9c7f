"""Host memory of the CPU backend: keep freed memory in the process instead of returning it to the kernel, and the
weights on huge pages.

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

`weights_on_huge_pages` asks Linux to back the model's weights with 2 MB pages (transparent huge pages). A
batch-1 decode step streams every weight once; on 4 KB pages its ~100 products each walk the page tables for
every 4 KB of weights, on 2 MB pages for every 2 MB. The weights are XLA buffers, allocated by malloc on
4 KB pages (this machine's THP setting is "madvise": only advised ranges get huge pages), so when it starts the
engine advises their ranges (MADV_HUGEPAGE) and collapses them in place (MADV_COLLAPSE, Linux 6.1+: a copy into
huge pages, 0.3-0.5 s for bench-100m's 205 MB, on a daemon thread; older kernels leave it to khugepaged).
Measured on the 2-core bench machine (docs/benchmarks.md, "Weights on huge pages"): bench-100m's batch-1
bfloat16 decode step 4-19% faster in 4 of 4 interleaved pairs, its products alone 2-11% in 3 of 3; the
engine's whole batch-1 run within its noise (7 pairs, -5% to +13%).
GEMMA4_JAX_HUGE_PAGE_WEIGHTS=0 leaves the weights on the pages they have.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
import threading
import time
from pathlib import Path

import jax

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

HUGE_PAGES_ENV = "GEMMA4_JAX_HUGE_PAGE_WEIGHTS"
MADV_HUGEPAGE = 14  # asm-generic/mman-common.h
MADV_COLLAPSE = 25
HUGE_PAGE = 2 << 20  # x86-64 and arm64 (4 KB base pages) PMD size
# Weight buffers closer than this are advised as one range (malloc puts headers and small blocks between them).
MERGE_GAP = 64 << 10
COLLAPSE_PASSES = 3
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def enabled_by_env(env: str = ENV) -> bool:
    """An on/off switch of this module's environment: unset or "1" on, "0" off; anything else is refused with
    ValueError naming the variable."""
    value = os.environ.get(env, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{env} must be 0 or 1, got {value!r}")
    return value == "1"


class HugePages:
    """What `weights_on_huge_pages` did, or is doing in the background. weight_bytes: bytes of the CPU buffers
    given; advised_bytes: bytes of the 2 MB-aligned ranges inside them advised MADV_HUGEPAGE; collapsed_bytes: of
    those, collapsed so far (MADV_COLLAPSE); seconds: the collapse's time; errors: the kernel's refusals by advice
    and reason; skipped: why nothing was advised ("" when something was)."""

    def __init__(self, skipped: str = "", weight_bytes: int = 0):
        self.skipped = skipped
        self.weight_bytes = weight_bytes
        self.advised_bytes = self.collapsed_bytes = 0
        self.seconds = 0.0
        self.errors: dict[str, int] = {}
        self._done = threading.Event()
        if skipped:
            self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the collapse has ended (True) or `timeout` seconds passed (False)."""
        return self._done.wait(timeout)

    def __repr__(self) -> str:
        if self.skipped:
            return f"HugePages(skipped={self.skipped!r})"
        return (f"HugePages({self.collapsed_bytes / 1e6:.0f} of {self.weight_bytes / 1e6:.0f} MB collapsed, "
                f"{self.advised_bytes / 1e6:.0f} advised, {self.seconds:.2f} s, errors={self.errors})")


def merged_spans(spans: list[tuple[int, int]], gap: int = MERGE_GAP) -> list[tuple[int, int]]:
    """(start, end) address ranges, sorted, with ranges less than `gap` bytes apart joined."""
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1] + gap:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def huge_page_ranges(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The whole 2 MB pages inside each range (ranges shorter than one page give none)."""
    out = []
    for start, end in spans:
        first, last = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
        if last > first:
            out.append((first, last))
    return out


def _cpu_buffer_spans(arrays) -> list[tuple[int, int]]:
    spans = []
    for array in arrays:
        if not isinstance(array, jax.Array) or array.is_deleted():
            continue
        for shard in array.addressable_shards:
            data = shard.data
            if shard.device.platform != "cpu" or not data.nbytes:
                continue
            ptr = data.unsafe_buffer_pointer()
            spans.append((ptr, ptr + data.nbytes))
    return spans


def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)  # a CDLL call releases the GIL: the collapse runs beside Python
    madvise = libc.madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return madvise


def _collapse(madvise, ranges: list[tuple[int, int]], result: HugePages) -> None:
    t0 = time.perf_counter()
    try:
        # One call per 2 MB page (a range's call goes on past a page it cannot collapse but answers for the whole
        # range), and the refused pages asked again a second later: on this machine's kernel (6.18) a first pass
        # over a freshly advised model was refused (EINVAL) for ~40% of its pages, at once again as well, but a
        # second later they were huge (presumably khugepaged, woken by the advice, had taken them meanwhile).
        pages = [page for start, end in ranges for page in range(start, end, HUGE_PAGE)]
        for attempt in range(COLLAPSE_PASSES):
            if attempt:
                time.sleep(1.0)
            refused = []
            for page in pages:
                if madvise(page, HUGE_PAGE, MADV_COLLAPSE) == 0:
                    result.collapsed_bytes += HUGE_PAGE
                else:
                    refused.append((page, os.strerror(ctypes.get_errno())))
            pages = [page for page, _ in refused]
            if not pages:
                break
        for _, reason in refused:
            key = f"MADV_COLLAPSE: {reason}"
            result.errors[key] = result.errors.get(key, 0) + 1
        result.seconds = time.perf_counter() - t0
        log.info("weights on huge pages: %r", result)
    finally:
        result._done.set()


def weights_on_huge_pages(arrays, background: bool = True) -> HugePages:
    """Advise the whole 2 MB pages inside the CPU buffers of `arrays` (jax.Arrays; others ignored) as transparent
    huge pages, then collapse them (a copy: ~0.3 s per 100 MB here), by default on a daemon thread so that loading
    does not wait (`HugePages.wait()` does). The kernel's refusals are counted in the result, never raised: the
    weights work the same on small pages."""
    if not enabled_by_env(HUGE_PAGES_ENV):
        return HugePages(skipped=f"{HUGE_PAGES_ENV}=0")
    if not sys.platform.startswith("linux"):
        return HugePages(skipped="not Linux")
    try:
        setting = THP_ENABLED.read_text()
    except OSError:
        return HugePages(skipped="this kernel has no transparent huge pages")
    if "[never]" in setting:
        return HugePages(skipped="transparent huge pages are off on this host ('never')")
    spans = _cpu_buffer_spans(arrays)
    total = sum(b - a for a, b in spans)
    ranges = huge_page_ranges(merged_spans(spans))
    if not ranges:
        return HugePages(skipped="no buffer spans a whole 2 MB page", weight_bytes=total)
    result = HugePages(weight_bytes=total)
    madvise = _madvise()
    advised = []
    for start, end in ranges:
        if madvise(start, end - start, MADV_HUGEPAGE) == 0:
            result.advised_bytes += end - start
            advised.append((start, end))
        else:
            key = f"MADV_HUGEPAGE: {os.strerror(ctypes.get_errno())}"
            result.errors[key] = result.errors.get(key, 0) + 1
    if background:
        threading.Thread(target=_collapse, args=(madvise, advised, result), name="gemma4-huge-pages",
                         daemon=True).start()
    else:
        _collapse(madvise, advised, result)
    return result


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
