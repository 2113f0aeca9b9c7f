"""The engine's scheduler: which requests run in the next step, and the bookkeeping of their slots and pages.

- decode first: every running request whose prompt is fully cached gets one token. A request that needs a new page
  when none is free preempts the most recently arrived running request (its pages are released to the prefix
  cache and it is resumed later by recomputing its prompt + generated tokens, usually from its own cached blocks);
- prefill: partially prefilled requests, then the waiting queue first come first served, get chunks of their
  prompt within the step's token budget and the free pages and sequence slots. A waiting request starts after its
  longest cached prefix (prefix_cache.KVBlocks.admit) and is counted as a prefix-cache query when it starts.

Pages of both pools are owned by `KVBlocks` (serving/prefix_cache.py); the scheduler asks it for pages and tells
it when tokens were computed (`computed`), so that full blocks are cached and pages that left a sequence's sliding
window are released.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from gemma4_jax.serving import media_chunks
from gemma4_jax.serving.prefix_cache import KVBlocks
from gemma4_jax.serving.requests import Request, Status


class Scheduler:
    """Waiting queue, running set and sequence slots over `blocks`. `on_start(req)` runs when a request gets its
    slot (the engine resets its penalty counts). Counters go to `stats` (the engine's dict)."""

    def __init__(self, blocks: KVBlocks, max_num_seqs: int, vision_bidirectional: bool, stats: dict,
                 on_start: Callable[[Request], None]):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.vision_bidirectional = vision_bidirectional
        self.stats = stats
        self.on_start = on_start
        self.free_slots = list(range(max_num_seqs - 1, -1, -1))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def release(self, req: Request) -> None:
        """Give back the request's pages and slot."""
        self.blocks.release(req)
        if req.slot >= 0:
            self.free_slots.append(req.slot)
            req.slot = -1

    def finish(self, req: Request, reason: str) -> None:
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self.release(req)
        req.status = Status.FINISHED
        req.finish_reason = reason

    def preempt(self, victim: Request) -> None:
        self.running.remove(victim)
        self.release(victim)
        victim.status = Status.WAITING
        victim.num_computed = 0
        victim.num_preemptions += 1
        self.stats["preemptions"] += 1
        self.waiting.appendleft(victim)

    def ensure_pages(self, req: Request, num_tokens: int) -> bool:
        return self.blocks.ensure(req, num_tokens)

    def computed(self, req: Request, num_tokens: int) -> None:
        """num_tokens more of the request's tokens have their K/V in the pools: register the blocks it completed
        with the prefix cache and release the sliding pages that left its window."""
        req.num_computed += num_tokens
        self.blocks.commit(req)

    def _admit(self, req: Request) -> None:
        """A waiting request (no pages) starts after its longest cached prefix (prefix_cache.KVBlocks.admit)."""
        runs = req.media.runs if req.media is not None and self.vision_bidirectional else None
        self.blocks.admit(req, runs)

    def _unadmit(self, req: Request) -> None:
        """Undo `_admit` for a request that could not start after all."""
        self.blocks.release(req)
        req.num_computed = 0

    # -- one step -------------------------------------------------------------------------------------------------

    def schedule_decode(self) -> list[Request]:
        batch = []
        for req in sorted((r for r in self.running if r.in_decode), key=lambda r: r.arrival):
            while req.status is Status.RUNNING and not self.ensure_pages(req, req.num_computed + 1):
                victims = [r for r in self.running if r is not req and r not in batch]
                victim = max(victims, key=lambda r: r.arrival) if victims else req
                self.preempt(victim)
            if req.status is Status.RUNNING:
                batch.append(req)
        return batch

    def schedule_prefill(self, budget: int) -> list[tuple[Request, int]]:
        chunks: list[tuple[Request, int]] = []
        # Partially prefilled running requests first (oldest first), then the queue in arrival order.
        partial = [r for r in self.running if not r.in_decode and r.num_computed < r.num_tokens]
        candidates = sorted(partial, key=lambda r: r.arrival) + list(self.waiting)
        for req in candidates:
            if budget <= 0:
                break
            if req.status is Status.WAITING:
                if not self.free_slots or len(chunks) >= self.max_num_seqs:
                    break  # FIFO: later arrivals do not overtake
                self._admit(req)
            size = min(req.num_tokens - req.num_computed, budget)
            if req.media is not None:  # an image with bidirectional attention stays inside one chunk
                size = media_chunks.clamp_chunk(req.media, req.num_computed, size)
            if size > 0 and not self.ensure_pages(req, req.num_computed + size):
                size = min(size, self.blocks.max_tokens(req) - req.num_computed)
                if req.media is not None:
                    size = media_chunks.clamp_chunk(req.media, req.num_computed, size)
                if size > 0 and not self.ensure_pages(req, req.num_computed + size):
                    size = 0
            if size <= 0:
                if req.status is Status.WAITING:
                    self._unadmit(req)
                break
            if req.status is Status.WAITING:
                self.blocks.count_query(req)
                self.stats.update(prefix_cache_queries=self.blocks.queries, prefix_cache_hits=self.blocks.hits)
                self.waiting.remove(req)
                req.status = Status.RUNNING
                req.slot = self.free_slots.pop()
                self.running.append(req)
                self.on_start(req)
            chunks.append((req, size))
            budget -= size
        # Rows are padded to a power of two: 5 chunks would compute 8 rows. Defer the excess to the next step
        # (the deferred requests keep their slot and pages) rather than compute padding rows.
        return chunks[: 1 << (len(chunks).bit_length() - 1)] if chunks else chunks
