"""Automatic prefix caching over the engine's two page pools (docs/prefix_caching.md).

The engine's K/V lives in pages of `page_size` tokens (serving/kv_cache.py): a full-attention pool, read through a
sequence's full page table, and a sliding-window pool, read through its windowed table whose pages before the
window are released as the sequence advances. This module owns both pools' pages and every sequence's tables:

- `BlockPool`: the pages of one pool with reference counts, a free list, and, when caching, a map from block hash
  to page and an LRU of cached pages nobody references. A released page whose block was hashed stays cached
  (readable by a later hit) until an allocation finds the free list empty and evicts the least recently used one.
- `KVBlocks`: per sequence, allocates and releases pages in both pools, hashes each block once it is fully
  computed (`commit`), and on admission (`admit`) finds the longest cached prefix: the longest P (a multiple of
  page_size, at most the prompt less one token) such that every block before P has a cached full-attention page
  and every block in the sliding window before P has a cached sliding page. The sequence then starts at P with
  those pages shared (reference counted, never written: a sequence writes only positions >= its context).

A block's hash chains its parent's hash, its token ids, and the content digest of the request's images / audio /
video (`media_digest`) from the first block holding a placeholder on, so equal hashes mean equal K/V in every
layer (the model's weights are fixed for an engine's lifetime). Counters follow vLLM's metrics: queries and hits in
tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict

import numpy as np

from gemma4_jax.serving.kv_cache import TRASH_PAGE, CacheLayout, pages_needed
from gemma4_jax.serving.mm_inputs import MediaInputs
from gemma4_jax.serving.requests import Request

_ROOT = b"gemma4-jax prefix cache v1"


def media_digest(media: MediaInputs | None) -> bytes | None:
    """Content digest of a request's media (placeholder positions and kinds, pixel values, audio features, or the
    encoded soft tokens when the tower inputs are gone); None without media."""
    if media is None:
        return None
    h = hashlib.blake2b(digest_size=16)
    for array in (media.positions, media.kinds):
        h.update(np.ascontiguousarray(array).tobytes())
    for pixels, positions, kind in media.frames:
        h.update(np.ascontiguousarray(pixels).tobytes())
        h.update(np.ascontiguousarray(positions).tobytes())
        h.update(int(kind).to_bytes(4, "little"))
    if media.audio is not None:
        for array in media.audio:
            h.update(np.ascontiguousarray(array).tobytes())
    if not media.frames and media.audio is None and media.soft is not None:
        h.update(np.ascontiguousarray(media.soft).tobytes())
    return h.digest()


def block_hash(parent: bytes, tokens: list[int], extra: bytes | None) -> bytes:
    """Hash of one full block: its parent's hash, its token ids and an extra key (the media digest)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(np.asarray(tokens, np.int32).tobytes())
    if extra is not None:
        h.update(extra)
    return h.digest()


@dataclasses.dataclass
class PrefixKey:
    """What a sequence's block hashes are made of, and those computed so far (Request.prefix)."""

    media_digest: bytes | None = None  # media_digest(request.media)
    first_media: int | None = None  # position of the first placeholder token
    hashes: list[bytes] = dataclasses.field(default_factory=list)  # hash of block i (full blocks of all_ids)
    num_registered: int = 0  # blocks of the sequence's current pages that are keyed in the pools

    @staticmethod
    def of(media: MediaInputs | None) -> PrefixKey:
        if media is None or not media.positions.size:
            return PrefixKey()
        return PrefixKey(media_digest(media), int(media.positions[0]))


def window_pool_pages(keep: int, page_size: int, max_num_seqs: int, max_num_batched_tokens: int, per_step: int,
                      cached_windows: int, num_pages: int, explicit: int | None = None) -> int:
    """Size of the sliding-window pool, trash page included: what running sequences can hold at once (each its
    window of `keep` keys plus one step's tokens: `per_step` decode / verify tokens, and one prefill budget over
    all), plus `cached_windows` windows kept for prefix hits; never more than the full pool's `num_pages`.
    explicit: a size given by the user, checked to hold one sequence's window and step."""
    per_seq = pages_needed(keep, page_size) + 2 + pages_needed(per_step, page_size)
    if explicit is not None:
        alone = pages_needed(keep + max(max_num_batched_tokens, per_step), page_size) + 2
        if explicit - 1 < alone:
            raise ValueError(f"num_window_pages={explicit} leaves fewer than the {alone} pages (besides the trash "
                             "page) one sequence's window and step need")
        return explicit
    if cached_windows < 0:
        raise ValueError(f"prefix_cache_windows must be >= 0, got {cached_windows}")
    running = max_num_seqs * per_seq + pages_needed(max_num_batched_tokens, page_size)
    cached = cached_windows * (pages_needed(keep, page_size) + 1)
    return min(running + cached, num_pages - 1) + 1


class BlockPool:
    """Pages 1 .. num_pages - 1 of one pool (page 0 is the trash page, never handed out). A page is in use
    (reference count > 0), cached (count 0, hashed, in the LRU) or free."""

    def __init__(self, num_pages: int, caching: bool):
        self.num_pages = num_pages
        self.caching = caching
        self._refs = [0] * num_pages
        self._free = list(range(num_pages - 1, 0, -1))  # popped from the end: lowest page first
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached pages, least recently used first
        self._hash_of: dict[int, bytes] = {}
        self._page_of: dict[bytes, int] = {}
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Pages an allocation can take: free ones plus cached ones (evicted on demand)."""
        return len(self._free) + len(self._lru)

    @property
    def num_used(self) -> int:
        return self.num_pages - 1 - self.num_free

    @property
    def num_cached(self) -> int:
        """Pages holding a hashed block (in use or not)."""
        return len(self._hash_of)

    def allocate(self, n: int) -> list[int] | None:
        """n pages with reference count 1, evicting least recently used cached pages when the free list runs out;
        None (and nothing taken) when fewer than n can be had."""
        if n > self.num_free:
            return None
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.pop()
            else:
                page, _ = self._lru.popitem(last=False)
                del self._page_of[self._hash_of.pop(page)]
                self.evictions += 1
            self._refs[page] = 1
            pages.append(page)
        return pages

    def lookup(self, block: bytes) -> int | None:
        return self._page_of.get(block)

    def share(self, page: int) -> None:
        """One more reference to a cached page (a prefix hit)."""
        if self._refs[page] == 0:
            del self._lru[page]
        self._refs[page] += 1

    def release(self, pages: list[int]) -> None:
        """Drop one reference to each page (trash entries skipped); a page nobody references becomes cached (most
        recently used last) if its block is hashed, else free."""
        for page in pages:
            if page == TRASH_PAGE:
                continue
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._hash_of:
                    self._lru[page] = None
                else:
                    self._free.append(page)

    def register(self, page: int, block: bytes) -> None:
        """Key a fully computed page by its block hash (no-op when caching is off, the page is already keyed, or
        another page holds the same block: the duplicate is freed, not cached, when released)."""
        if not self.caching or page in self._hash_of or block in self._page_of:
            return
        self._hash_of[page] = block
        self._page_of[block] = page

    def reset(self) -> None:
        """Forget every hash: cached pages become free; pages in use stay with their sequences, unshareable."""
        self._free.extend(self._lru)
        self._lru.clear()
        self._hash_of.clear()
        self._page_of.clear()


class KVBlocks:
    """Pages of both pools for every sequence (Request.pages: full table; Request.window_pages: sliding table,
    TRASH_PAGE before the window) and the prefix cache over them. Host-side only."""

    def __init__(self, layout: CacheLayout, caching: bool):
        self.layout = layout
        self.caching = caching
        self.page_size = layout.page_size
        self.full = BlockPool(layout.num_pages, caching)
        self.has_window = bool(layout.sliding_layers)
        self.window = BlockPool(layout.num_window_pages, caching)
        self.queries = 0  # prompt tokens looked up (vLLM: prefix_cache_queries)
        self.hits = 0  # of them found cached (vLLM: prefix_cache_hits)

    # -- accounting -----------------------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return self.full.num_free

    @property
    def num_used(self) -> int:
        """Full-attention pages in use (the sliding pool's are `window.num_used`)."""
        return self.full.num_used

    def _missing(self, req: Request, num_tokens: int) -> tuple[int, int]:
        need = pages_needed(num_tokens, self.page_size)
        full = max(0, need - len(req.pages))
        if not self.has_window:
            return full, 0
        # Entries before the window are TRASH_PAGE, not allocated.
        have = max(len(req.window_pages), min(self.layout.first_window_page(req.num_computed), need))
        return full, max(0, need - have)

    def fits(self, wants: list[tuple[Request, int]]) -> bool:
        """Whether every (sequence, tokens) can get its pages at once."""
        full = window = 0
        for req, num_tokens in wants:
            f, w = self._missing(req, num_tokens)
            full, window = full + f, window + w
        return full <= self.full.num_free and window <= self.window.num_free

    def max_tokens(self, req: Request) -> int:
        """Tokens the sequence could hold with its pages plus every page an allocation could take now."""
        pages = len(req.pages) + self.full.num_free
        if self.has_window:
            pages = min(pages, len(req.window_pages) + self.window.num_free)
        return pages * self.page_size

    # -- pages ----------------------------------------------------------------------------------------------------

    def ensure(self, req: Request, num_tokens: int) -> bool:
        """Pages for positions < num_tokens in both tables (all or nothing). Sliding pages are taken only from the
        first page still inside the window; earlier entries stay TRASH_PAGE."""
        full, window = self._missing(req, num_tokens)
        if full > self.full.num_free or window > self.window.num_free:
            return False
        req.pages.extend(self.full.allocate(full) or [])
        if self.has_window:
            need = pages_needed(num_tokens, self.page_size)
            skip = max(0, min(self.layout.first_window_page(req.num_computed), need) - len(req.window_pages))
            req.window_pages.extend([TRASH_PAGE] * skip + (self.window.allocate(window) or []))
        return True

    def release(self, req: Request) -> None:
        """Give back all of a sequence's pages, last block first: the LRU then evicts a prefix's tail before its
        head (the head is what other requests share)."""
        self.full.release(req.pages[::-1])
        self.window.release(req.window_pages[::-1])
        req.pages, req.window_pages = [], []

    def commit(self, req: Request) -> None:
        """After a step: hash and register the blocks the sequence has now fully computed, then release the
        sliding pages that fell out of its window (cached when registered)."""
        done, key = req.num_computed // self.page_size, req.prefix
        if self.caching and done > key.num_registered:
            self._hash_blocks(req, done)
            for i in range(key.num_registered, done):
                self.full.register(req.pages[i], key.hashes[i])
                if self.has_window and req.window_pages[i] != TRASH_PAGE:
                    self.window.register(req.window_pages[i], key.hashes[i])
            key.num_registered = done
        if self.has_window:
            first = min(self.layout.first_window_page(req.num_computed), len(req.window_pages))
            out = [p for p in req.window_pages[:first] if p != TRASH_PAGE]
            if out:
                self.window.release(out[::-1])
                req.window_pages[:first] = [TRASH_PAGE] * first

    def _hash_blocks(self, req: Request, num_blocks: int) -> None:
        ids, ps, key = req.all_ids, self.page_size, req.prefix
        parent = key.hashes[-1] if key.hashes else _ROOT
        for i in range(len(key.hashes), num_blocks):
            # The media digest joins from the first block holding a placeholder; the chain carries it on.
            extra = key.media_digest if key.first_media is not None and (i + 1) * ps > key.first_media else None
            parent = block_hash(parent, ids[i * ps : (i + 1) * ps], extra)
            key.hashes.append(parent)

    # -- prefix cache ---------------------------------------------------------------------------------------------

    def admit(self, req: Request, runs: np.ndarray | None = None) -> int:
        """A sequence without pages starts: find its longest cached prefix, share those pages and set num_computed
        to its length. runs: (R, 2) [start, end) of vision blocks that must be computed in one chunk (a hit never
        ends inside one). Returns the tokens hit. `count_query` once the sequence really starts; `release` if not."""
        total, key = req.num_tokens, req.prefix
        key.num_registered = 0
        if not self.caching:
            return 0
        ps = self.page_size
        usable = (total - 1) // ps  # at least the last token is computed: its logits are needed
        self._hash_blocks(req, usable)
        num_full = 0
        for block in key.hashes[:usable]:
            if self.full.lookup(block) is None:
                break
            num_full += 1
        hit = self._usable(req, num_full, runs)
        if hit == 0:
            return 0
        req.pages = [self.full.lookup(b) for b in key.hashes[:hit]]
        for page in req.pages:
            self.full.share(page)
        if self.has_window:
            first = self.layout.first_window_page(hit * ps)
            window = [self.window.lookup(b) for b in key.hashes[first:hit]]
            for page in window:
                self.window.share(page)
            req.window_pages = [TRASH_PAGE] * first + window
        req.num_computed = hit * ps
        key.num_registered = hit
        return hit * ps

    def count_query(self, req: Request) -> None:
        """Count an admitted sequence: its tokens were queried, num_computed of them hit (vLLM counts tokens)."""
        self.queries += req.num_tokens
        self.hits += req.num_computed

    def _usable(self, req: Request, num_full: int, runs: np.ndarray | None) -> int:
        """The longest hit of <= num_full blocks whose sliding window is cached and that ends outside every
        vision block."""
        ps = self.page_size
        for n in range(num_full, 0, -1):
            end = n * ps
            if runs is not None and runs.size and ((runs[:, 0] < end) & (end < runs[:, 1])).any():
                continue
            if self.has_window:
                first = self.layout.first_window_page(end)
                if any(self.window.lookup(b) is None for b in req.prefix.hashes[first:n]):
                    continue
            return n
        return 0

    def reset(self) -> None:
        """Drop every cached block (vLLM's reset_prefix_cache); sequences keep their pages. Counters stay."""
        self.full.reset()
        self.window.reset()
