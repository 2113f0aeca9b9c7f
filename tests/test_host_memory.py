"""Weights on transparent huge pages (serving/host_memory.py: weights_on_huge_pages)."""

from __future__ import annotations

import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax.serving import host_memory

MB = 1 << 20


def test_spans_merge_across_small_gaps_and_keep_whole_huge_pages():
    h = host_memory.HUGE_PAGE
    spans = [(10 * h + 100, 12 * h), (12 * h + 4096, 15 * h + 7), (40 * h, 40 * h + h - 1), (3 * h, 3 * h + 10)]
    merged = host_memory.merged_spans(spans)
    assert merged == [(3 * h, 3 * h + 10), (10 * h + 100, 15 * h + 7), (40 * h, 40 * h + h - 1)]
    # Only whole 2 MB pages: the first and last spans hold none.
    assert host_memory.huge_page_ranges(merged) == [(11 * h, 15 * h)]
    assert host_memory.merged_spans(spans, gap=0) != merged


def _thp_setting() -> str:
    try:
        return host_memory.THP_ENABLED.read_text()
    except OSError:
        return ""


def _kernel_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _anon_huge_kb(address: int) -> int:
    """AnonHugePages of the mapping holding `address` (/proc/self/smaps)."""
    inside = False
    with open(f"/proc/{os.getpid()}/smaps") as f:
        lines = f.read().splitlines()
    for line in lines:
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            inside = int(m.group(1), 16) <= address < int(m.group(2), 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(not sys.platform.startswith("linux") or "[never]" in _thp_setting() or not _thp_setting(),
                    reason="needs Linux with transparent huge pages")
def test_weights_are_collapsed_onto_huge_pages_and_keep_their_values(monkeypatch):
    monkeypatch.setenv(host_memory.HUGE_PAGES_ENV, "1")
    rng = np.random.default_rng(0)
    host = [rng.standard_normal((2048, 1024)).astype(np.float32) for _ in range(3)]  # 8 MB each
    arrays = [jnp.asarray(a) for a in host]
    jax.block_until_ready(arrays)
    gone = jnp.ones((1024, 1024))
    gone.delete()
    result = host_memory.weights_on_huge_pages([*arrays, "not an array", gone], background=False)
    assert result.wait(0)
    assert not result.skipped
    assert result.weight_bytes == 3 * 8 * MB
    if _kernel_version() < (6, 1):
        pytest.skip(f"this kernel cannot collapse in place (MADV_COLLAPSE needs Linux 6.1+): {result!r}")
    # Each 8 MB buffer holds at least 3 whole 2 MB pages.
    assert result.advised_bytes >= 9 * MB
    assert result.collapsed_bytes >= 9 * MB, result
    assert all(_anon_huge_kb(a.unsafe_buffer_pointer() + 4 * MB) >= 2048 for a in arrays)
    for a, h in zip(arrays, host):
        np.testing.assert_array_equal(np.asarray(a), h)


def test_switch_and_skips(monkeypatch):
    monkeypatch.setenv(host_memory.HUGE_PAGES_ENV, "0")
    off = host_memory.weights_on_huge_pages([jnp.ones((1024, 1024))])
    assert off.skipped == f"{host_memory.HUGE_PAGES_ENV}=0" and off.wait(0) and off.collapsed_bytes == 0
    monkeypatch.setenv(host_memory.HUGE_PAGES_ENV, "yes")
    with pytest.raises(ValueError, match=host_memory.HUGE_PAGES_ENV):
        host_memory.weights_on_huge_pages([])
    monkeypatch.setenv(host_memory.HUGE_PAGES_ENV, "1")
    if _thp_setting() and "[never]" not in _thp_setting():
        small = host_memory.weights_on_huge_pages([jnp.ones((4,), jnp.float32)])
        assert small.skipped == "no buffer spans a whole 2 MB page"
    monkeypatch.setattr(host_memory, "THP_ENABLED", host_memory.Path("/nonexistent/thp"))
    assert host_memory.weights_on_huge_pages([]).skipped == "this kernel has no transparent huge pages"
