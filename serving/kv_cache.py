"""KV pools outside the model (DESIGN.md decision 3), and the KV store a jitted step hands to the decoder.

- Full-attention layers that own K/V: one paged pool per layer, k/v (num_pages, page_size, K, H). A sequence's
  page table maps its logical pages to physical ones; page 0 is a trash page that padding tokens write to.
- Sliding layers that own K/V: a ring of R = `sliding_window` (+ optional spare) slots per sequence slot, k/v
  (max_seqs + 1, R, K, H); the token at position p lives in ring slot p % R, so a sequence never holds more than R
  tokens there. The attention mask, not the ring, enforces the window. Row max_seqs is a trash row.
- KV-shared layers: nothing; they read their source layer's K/V inside the step.

Both K and V are stored also for keys-as-values layers: there V = v_norm(raw key) and K = rope(k_norm(raw key)),
so they differ. Memory per token is set by the full-attention layers alone (the windows are bounded).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from gemma4_jax.config import TextConfig
from gemma4_jax.kv_view import DenseKV, KVView, PagedKV, RingKV

TRASH_PAGE = 0


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Static facts of the pools (hashable: part of the jitted step's static arguments)."""

    page_size: int
    num_pages: int  # including the trash page
    max_seqs: int  # sequence slots (ring rows); row max_seqs is trash
    ring_len: int  # ring slots per sequence in sliding layers: the window plus spare slots (see for_config)
    full_layers: tuple[int, ...]  # layers with a paged pool
    sliding_layers: tuple[int, ...]  # layers with a ring

    @staticmethod
    def for_config(cfg: TextConfig, page_size: int, num_pages: int, max_seqs: int,
                   spare_ring_slots: int = 0) -> CacheLayout:
        """spare_ring_slots: extra ring slots beyond the window, so that tokens written and then rolled back (the
        rejected drafts of a speculative verify step) never overwrite keys still inside the window."""
        owners = [s for s in cfg.layers if not s.is_kv_shared]
        return CacheLayout(
            page_size=page_size,
            num_pages=num_pages,
            max_seqs=max_seqs,
            ring_len=cfg.sliding_window + spare_ring_slots,
            full_layers=tuple(s.index for s in owners if not s.is_sliding),
            sliding_layers=tuple(s.index for s in owners if s.is_sliding),
        )


def allocate(cfg: TextConfig, layout: CacheLayout, dtype, sharding=None, layers=None) -> dict[str, jax.Array]:
    """Zeroed pools: {"k{l}", "v{l}"} for every layer that owns K/V (among `layers`, default all: a pipeline stage
    allocates its own). sharding: one Sharding for all pools, or a function pool shape -> Sharding (per layer
    kind: a pool is sharded by KV head only where the tensor axis divides its head count)."""
    cache = {}
    wanted = set(range(cfg.num_hidden_layers) if layers is None else layers)
    for spec in cfg.layers:
        if spec.is_kv_shared or spec.index not in wanted:
            continue
        if spec.is_sliding:
            shape = (layout.max_seqs + 1, layout.ring_len, spec.num_kv_heads, spec.head_dim)
        else:
            shape = (layout.num_pages, layout.page_size, spec.num_kv_heads, spec.head_dim)
        where = sharding(shape) if callable(sharding) else sharding
        for kind in ("k", "v"):
            cache[f"{kind}{spec.index}"] = jnp.zeros(shape, dtype, device=where)
    return cache


@struct.dataclass
class StepBatch:
    """Device inputs of one step over B rows of T tokens (padded). Shapes in comments.

    A row is one sequence: its new tokens occupy positions [context_lens[b], context_lens[b] + T) where valid.
    """

    tokens: jax.Array  # (B, T) int32
    positions: jax.Array  # (B, T) int32, -1 on padding tokens
    context_lens: jax.Array  # (B,) int32: tokens already in the cache before this step
    slots: jax.Array  # (B,) int32: ring row of each sequence (max_seqs for padding rows)
    page_table: jax.Array  # (B, P) int32: physical page of each logical page (TRASH_PAGE when unused)
    last_index: jax.Array  # (B,) int32: index in T of the token whose logits are wanted


class PagedKVStore:
    """The decoder's KV store during a step: writes each layer's new tokens into its pool and returns a view
    (kv_view.py) of the keys the layer attends over: a `PagedKV` of the updated pool for full layers, a `RingKV`
    for sliding layers (the updated ring in decode; the ring before the chunk plus the chunk in a prefill chunk).

    Mutates `self.cache` (a dict of traced arrays) functionally; the step returns it.
    """

    def __init__(self, cache: dict[str, jax.Array], batch: StepBatch, layout: CacheLayout):
        self.cache = dict(cache)
        self.batch = batch
        self.layout = layout

    def _paged(self, layer: int, k: jax.Array, v: jax.Array, positions: jax.Array) -> PagedKV:
        b = self.batch
        page = self.layout.page_size
        kc, vc = self.cache[f"k{layer}"], self.cache[f"v{layer}"]
        num_p = b.page_table.shape[1]
        # Write the new tokens first (padding goes to the trash page), then attend over the pool in place: pages
        # never evict, so the pool holds exactly the context plus this step's tokens.
        valid = positions >= 0
        safe = jnp.maximum(positions, 0)
        phys = jnp.take_along_axis(b.page_table, jnp.minimum(safe // page, num_p - 1), axis=1)
        phys = jnp.where(valid, phys, TRASH_PAGE)
        off = safe % page
        kc = kc.at[phys, off].set(k.astype(kc.dtype))
        vc = vc.at[phys, off].set(v.astype(vc.dtype))
        self.cache[f"k{layer}"], self.cache[f"v{layer}"] = kc, vc
        end = b.context_lens + jnp.sum(valid, axis=1)
        return PagedKV(kc, vc, b.page_table, end, dtype=k.dtype)

    def _ring(self, layer: int, k: jax.Array, v: jax.Array, positions: jax.Array) -> RingKV:
        b = self.batch
        w = self.layout.ring_len
        kc, vc = self.cache[f"k{layer}"], self.cache[f"v{layer}"]
        valid = positions >= 0
        end = b.context_lens[:, None] + jnp.sum(valid, axis=1, keepdims=True)
        # Only the last R tokens of the chunk survive in the ring: earlier ones would collide with them.
        keep = valid & (positions >= end - w)
        rows = jnp.where(keep, b.slots[:, None], self.layout.max_seqs)
        cols = jnp.where(keep, positions % w, 0)
        new_kc = kc.at[rows, cols].set(k.astype(kc.dtype))
        new_vc = vc.at[rows, cols].set(v.astype(vc.dtype))
        self.cache[f"k{layer}"], self.cache[f"v{layer}"] = new_kc, new_vc
        if k.shape[1] == 1:
            # Decode: writing first evicts only a key outside every window, so attend over the updated ring alone.
            return RingKV(new_kc, new_vc, b.slots, end[:, 0], chunk=None, dtype=k.dtype)
        # A chunk may evict keys its own earlier tokens still need: attend over the old ring plus the chunk.
        return RingKV(kc, vc, b.slots, b.context_lens, chunk=DenseKV(k, v, positions), dtype=k.dtype)

    def update(self, layer: int, k: jax.Array, v: jax.Array, positions: jax.Array) -> KVView:
        """Write this step's k, v (B, T, K, H) at positions (B, T) and return the view the layer attends over."""
        if layer in self.layout.sliding_layers:
            return self._ring(layer, k, v, positions)
        return self._paged(layer, k, v, positions)


def context_view(cache: dict[str, jax.Array], layout: CacheLayout, layer: int, page_table: jax.Array,
                 slots: jax.Array, lengths: jax.Array, dtype) -> KVView:
    """A read-only view of one owner layer's pool as it stands, for a reader outside a step's forward (the MTP
    assistant drafter reads the target's last full and sliding layer). Writes nothing.

    page_table: (B, P) int32; slots: (B,) int32 ring rows; lengths: (B,) int32 keys per row (the context after a
    verify step's rollback: positions >= lengths[b], e.g. rejected drafts still in the pool, are outside the view).
    Full layers -> PagedKV; sliding layers -> RingKV (its slot labels come from lengths, so the ring must hold the
    reader's window plus the rejected writes: CacheLayout.for_config(spare_ring_slots=...))."""
    k, v = cache[f"k{layer}"], cache[f"v{layer}"]
    if layer in layout.sliding_layers:
        return RingKV(k, v, slots, lengths, chunk=None, dtype=dtype)
    if layer not in layout.full_layers:
        raise ValueError(f"layer {layer} owns no K/V pool (a KV-shared layer reads its source's)")
    return PagedKV(k, v, page_table, lengths, dtype=dtype)


class PageAllocator:
    """Host-side free list of physical pages (page 0 is the trash page and never handed out)."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - 1 - len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


def pages_needed(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


def bucket(n: int, minimum: int = 1, maximum: int | None = None) -> int:
    """Smallest power of two >= n (and >= minimum), capped at maximum."""
    b = max(minimum, 1 << max(0, int(np.ceil(np.log2(max(n, 1))))))
    return min(b, maximum) if maximum is not None else b
