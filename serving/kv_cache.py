"""KV pools outside the model (DESIGN.md decision 3), and the KV store a jitted step hands to the decoder.

Every layer that owns K/V stores it in pages of `page_size` tokens; KV-shared layers store nothing (they read
their source layer's K/V inside the step).

- Full-attention layers: one pool per layer, k/v (num_pages, page_size, K, H). A sequence's page table maps its
  logical pages to physical ones, for its whole length.
- Sliding-window layers: one pool per layer, k/v (num_window_pages, page_size, K, H), with a second page table per
  sequence (the *window* table) in which only the pages that can still be read are live: once a page falls
  wholly before the window of the sequence's next token (`window_keep` keys before it) it is released, either to
  the free list or, when prefix caching keeps it, to the cache (serving/prefix_cache.py). A step reads each row's
  windowed table from its first live page (`window_start`), so a sliding layer attends over ~window + chunk keys
  and memory per token is still set by the full-attention layers alone.

Page 0 of each pool is a trash page that padding tokens write to. Both K and V are stored also for keys-as-values
layers: there V = v_norm(raw key) and K = rope(k_norm(raw key)), so they differ. Rejected speculative drafts write
at positions past the context, into pages the sequence owns; later tokens overwrite them (no spare slots needed).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from gemma4_jax.config import TextConfig
from gemma4_jax.kv_view import BF16_BITS, KVView, PagedKV

TRASH_PAGE = 0


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Static facts of the pools (hashable: part of the jitted step's static arguments)."""

    page_size: int
    num_pages: int  # full-attention pool, including the trash page
    num_window_pages: int  # sliding-window pool, including the trash page
    max_seqs: int  # sequence slots (rows of the sampler's penalty counts); slot max_seqs is trash
    window_keep: int  # keys before a sequence's next position that sliding readers may still need
    full_layers: tuple[int, ...]  # layers with a full-attention pool
    sliding_layers: tuple[int, ...]  # layers with a sliding-window pool

    @staticmethod
    def for_config(cfg: TextConfig, page_size: int, num_pages: int, max_seqs: int, num_window_pages: int,
                   window_keep: int | None = None) -> CacheLayout:
        """window_keep: default sliding_window - 1 (a query at p sees keys > p - W); a reader that looks further
        back (the MTP assistant drafter: speculative.assistant_window_keep) asks for more."""
        owners = [s for s in cfg.layers if not s.is_kv_shared]
        return CacheLayout(
            page_size=page_size,
            num_pages=num_pages,
            num_window_pages=num_window_pages,
            max_seqs=max_seqs,
            window_keep=cfg.sliding_window - 1 if window_keep is None else window_keep,
            full_layers=tuple(s.index for s in owners if not s.is_sliding),
            sliding_layers=tuple(s.index for s in owners if s.is_sliding),
        )

    def first_window_page(self, num_computed: int) -> int:
        """The first logical page a sequence with `num_computed` cached tokens may still read in sliding layers."""
        return max(0, num_computed - self.window_keep) // self.page_size

    def window_width(self, num_tokens: int, full_width: int) -> int:
        """Columns of the windowed page table of a step feeding up to `num_tokens` tokens per row (lookahead
        included) whose full tables have `full_width` columns: a function of the step's shape alone (no new compiled
        shapes). Bound: a row at context c spans pages (c - keep) // ps .. (c + n - 1) // ps. Not rounded up to a
        power of two: being a function of (T, P) it adds no compiled shape whatever its value, and every column is
        read by the xla backend (window 128, page 16, decode: 10 pages instead of 16, ~40% less sliding attention)."""
        return min(full_width, pages_needed(self.window_keep + num_tokens, self.page_size) + 1)


def allocate(cfg: TextConfig, layout: CacheLayout, dtype, sharding=None, layers=None) -> dict[str, jax.Array]:
    """Zeroed pools, stored in `pool_dtype`: {"k{l}", "v{l}"} for every layer that owns K/V (among `layers`,
    default all: a pipeline stage allocates its own). sharding: one Sharding for all pools, or a function pool
    shape -> Sharding (per layer kind: a pool is sharded by KV head only where the tensor axis divides its head
    count)."""
    cache = {}
    wanted = set(range(cfg.num_hidden_layers) if layers is None else layers)
    for spec in cfg.layers:
        if spec.is_kv_shared or spec.index not in wanted:
            continue
        pages = layout.num_window_pages if spec.is_sliding else layout.num_pages
        shape = (pages, layout.page_size, spec.num_kv_heads, spec.head_dim)
        where = sharding(shape) if callable(sharding) else sharding
        platform = next(iter(where.device_set)).platform if where is not None else jax.default_backend()
        for kind in ("k", "v"):
            cache[f"{kind}{spec.index}"] = jnp.zeros(shape, pool_dtype(dtype, platform), device=where)
    return cache


@struct.dataclass
class StepBatch:
    """Device inputs of one step over B rows of T tokens (padded). Shapes in comments.

    A row is one sequence: its new tokens occupy positions [context_lens[b], context_lens[b] + T) where valid.
    """

    tokens: jax.Array  # (B, T) int32
    positions: jax.Array  # (B, T) int32, -1 on padding tokens
    context_lens: jax.Array  # (B,) int32: tokens already in the cache before this step
    slots: jax.Array  # (B,) int32: sequence slot (penalty counts, drafter state; max_seqs for padding rows)
    page_table: jax.Array  # (B, P) int32: physical page of each logical page (TRASH_PAGE when unused)
    last_index: jax.Array  # (B,) int32: index in T of the token whose logits are wanted
    window_table: jax.Array  # (B, Pw) int32: sliding pool pages of logical pages window_start // page_size ...
    window_start: jax.Array  # (B,) int32: first position the window table covers (a multiple of page_size)


class PagedKVStore:
    """The decoder's KV store during a step: writes each layer's new tokens into its pool and returns a `PagedKV`
    view (kv_view.py) of the updated pool: through the full page table for full layers, through the windowed table
    for sliding layers. Every position has its own slot, so a chunk's writes never evict keys its own earlier
    tokens still read, and attending over the updated pool is exact.

    Mutates `self.cache` (a dict of traced arrays) functionally; the step returns it.
    """

    def __init__(self, cache: dict[str, jax.Array], batch: StepBatch, layout: CacheLayout):
        self.cache = dict(cache)
        self.batch = batch
        self.layout = layout

    def update(self, layer: int, k: jax.Array, v: jax.Array, positions: jax.Array) -> KVView:
        """Write this step's k, v (B, T, K, H) at positions (B, T) and return the view the layer attends over."""
        b, page = self.batch, self.layout.page_size
        sliding = layer in self.layout.sliding_layers
        table, start = (b.window_table, b.window_start) if sliding else (b.page_table, None)
        kc, vc = self.cache[f"k{layer}"], self.cache[f"v{layer}"]
        valid = positions >= 0
        column = jnp.maximum(positions, 0) // page
        if start is not None:
            column = column - (start // page)[:, None]
        phys = jnp.take_along_axis(table, jnp.clip(column, 0, table.shape[1] - 1), axis=1)
        phys = jnp.where(valid, phys, TRASH_PAGE)  # padding goes to the trash page
        off = jnp.maximum(positions, 0) % page
        kc, vc = write_slots(kc, phys, off, k), write_slots(vc, phys, off, v)
        self.cache[f"k{layer}"], self.cache[f"v{layer}"] = kc, vc
        end = b.context_lens + jnp.sum(valid, axis=1)
        return PagedKV(kc, vc, table, end, dtype=k.dtype, start=start)


def pool_dtype(dtype, platform: str) -> jnp.dtype:
    """The dtype K/V pools of a `dtype` model are stored in on `platform`: bfloat16 as its uint16 bits on CPU
    (kv_view.BF16_BITS), where XLA:CPU cannot scatter into a bfloat16 array in place: it widened the whole pool to
    float32 and back around each layer's write (~240 ms of a 516 ms bench-100m batch-64 decode step), and through
    bit casts of the pool it still copied it twice (~13 ms of thread time per step, ~6x the write itself)."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(BF16_BITS) if dtype == jnp.bfloat16 and platform == "cpu" else dtype


def write_slots(pool: jax.Array, pages: jax.Array, offsets: jax.Array, values: jax.Array) -> jax.Array:
    """pool.at[pages, offsets].set(values): (num_pages, page_size, K, H) <- values (B, T, K, H) at (B, T) slots,
    rounded to the pool's dtype (a uint16 pool takes the bits of the values rounded to bfloat16)."""
    if pool.dtype == BF16_BITS:
        return pool.at[pages, offsets].set(jax.lax.bitcast_convert_type(values.astype(jnp.bfloat16), BF16_BITS))
    return pool.at[pages, offsets].set(values.astype(pool.dtype))


def context_view(cache: dict[str, jax.Array], layout: CacheLayout, layer: int, page_table: jax.Array,
                 window_table: jax.Array, window_start: jax.Array, lengths: jax.Array, dtype) -> KVView:
    """A read-only view of one owner layer's pool as it stands, for a reader outside a step's forward (the MTP
    assistant drafter reads the target's last full and sliding layer). Writes nothing.

    page_table: (B, P) int32; window_table: (B, Pw) int32 and window_start: (B,) int32 (sliding layers, see
    StepBatch); lengths: (B,) int32 keys per row (the context after a verify step's rollback: positions >=
    lengths[b], e.g. rejected drafts still in the pool, are outside the view)."""
    k, v = cache[f"k{layer}"], cache[f"v{layer}"]
    if layer in layout.sliding_layers:
        return PagedKV(k, v, window_table, lengths, dtype=dtype, start=window_start)
    if layer not in layout.full_layers:
        raise ValueError(f"layer {layer} owns no K/V pool (a KV-shared layer reads its source's)")
    return PagedKV(k, v, page_table, lengths, dtype=dtype)


def pages_needed(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


# Page tables are at least this many tokens wide: attention over a few hundred padded keys costs next to nothing
# beside a step's weights, and two fewer context buckets (4 and 8 pages at page size 16) mean ~30% fewer step shapes
# to compile at start-up (serving/warmup.py; measured in docs/server.md, "Warm-up").
MIN_CONTEXT_TOKENS = 256


def page_bucket(num_pages: int, page_size: int) -> int:
    """Padded page-table width (P) of a step whose longest row spans `num_pages` pages: a power of two, at least
    MIN_CONTEXT_TOKENS tokens' worth of pages (and 4)."""
    return bucket(num_pages, bucket(pages_needed(MIN_CONTEXT_TOKENS, page_size), 4))


def bucket(n: int, minimum: int = 1, maximum: int | None = None) -> int:
    """Smallest power of two >= n (and >= minimum), capped at maximum."""
    b = max(minimum, 1 << max(0, int(np.ceil(np.log2(max(n, 1))))))
    return min(b, maximum) if maximum is not None else b
