"""What crosses the attention seam: the K/V a layer attends over, as a typed view, and the backend interface.

A K/V store (decoder.KVStore) writes a layer's new tokens and returns a *view* of everything the layer attends
over, instead of gathered arrays, so that a kernel can read the pools in place:

- `DenseKV`: keys already laid out per row (B, S, K, H) with their positions: the full-sequence forward (the
  identity store) and K/V that crossed a pipeline-stage boundary.
- `PagedKV`: a paged pool (num_pages, page_size, K, H) and each row's page table (B, P); the logical key index
  (page slot * page_size + offset) plus the row's `start` is the token position, keys at positions >= lengths[b]
  are empty. Full-attention layers start at 0; sliding-window layers read a *windowed* page table whose first
  column holds the first page still inside the window (serving/kv_cache.py), so S stays ~ window + chunk.

Every view has the same *logical key axis* S (the concatenation of its `sources()`), the layout that `dense()`
gathers and that `key_positions()` and vision key-block ids index. `dense()` gathers exactly what the stores
gathered before views existed, so the `xla` reference backend is unchanged bit for bit. KV-shared layers receive
their source layer's view. Views are pytrees (flax struct dataclasses): they live inside one jitted step.

`AttentionBackend` is here rather than in attention_backends.py so that a kernel backend module
(pallas_attention.py) can subclass it and attention_backends.py can still register that backend without a cycle.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

# Pools of bfloat16 K/V on CPU are stored as their uint16 bit patterns (serving/kv_cache.py `pool_dtype`): XLA:CPU
# writes a step's tokens into a bfloat16 pool by widening the whole pool to float32 and back, or, through bit casts
# of the pool, by copying it twice; a uint16 pool is written in place. Readers turn what they gather back into
# bfloat16 (`stored_values`), a bit cast of the gathered pages only.
BF16_BITS = jnp.uint16


def stored_values(x: jax.Array) -> jax.Array:
    """Pool contents (or pages gathered from a pool) in their float dtype: uint16 storage holds bfloat16 bits."""
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == BF16_BITS else x


@dataclasses.dataclass(frozen=True)
class KeySource:
    """One contiguous stretch of a view's logical key axis, as a kernel reads it: keys of row b at logical index
    i (0 <= i < P * page_size) live in pool page page_table[b, i // page_size], offset i % page_size.

    k_pages, v_pages: (num_pages, page_size, K, H) (a dense (B, S, K, H) is its own pool with one page per row);
    page_table: (B, P) int32; positions: (B, P * page_size) int32, -1 for empty slots."""

    k_pages: jax.Array
    v_pages: jax.Array
    page_table: jax.Array
    positions: jax.Array


@struct.dataclass
class DenseKV:
    """k, v: (B, S, K, H); positions: (B, S) int32 (negative: empty slot)."""

    k: jax.Array
    v: jax.Array
    positions: jax.Array

    def key_positions(self) -> jax.Array:
        return self.positions

    def dense(self) -> DenseKV:
        return self

    def sources(self, stored: bool = False) -> tuple[KeySource, ...]:
        # Dense keys are already in the model's dtype (never uint16 bits), so `stored` changes nothing here.
        b = self.k.shape[0]
        return (KeySource(self.k, self.v, jnp.arange(b, dtype=jnp.int32)[:, None], self.positions),)


@struct.dataclass
class PagedKV:
    """k_pages, v_pages: (num_pages, page_size, K, H) pools that already hold this step's tokens (uint16: bfloat16
    bits, see BF16_BITS); page_table:
    (B, P) int32; lengths: (B,) int32, one past the last position per row (context + this step's valid tokens).
    start: (B,) int32 position of each row's first key (a multiple of page_size; None: 0, logical index ==
    position): a windowed table leaves out the pages before the window. dtype: the compute dtype that `dense()`
    casts the pool's keys to (static)."""

    k_pages: jax.Array
    v_pages: jax.Array
    page_table: jax.Array
    lengths: jax.Array
    dtype: jnp.dtype = struct.field(pytree_node=False)
    start: jax.Array | None = None

    @property
    def num_keys(self) -> int:
        return self.page_table.shape[1] * self.k_pages.shape[1]

    def key_positions(self) -> jax.Array:
        pos = jnp.arange(self.num_keys, dtype=jnp.int32)[None, :]
        if self.start is not None:
            pos = pos + self.start[:, None]
        return jnp.where(pos < self.lengths[:, None], pos, -1)

    def dense(self) -> DenseKV:
        b = self.page_table.shape[0]
        all_k = stored_values(self.k_pages[self.page_table]).reshape(b, self.num_keys, *self.k_pages.shape[2:])
        all_v = stored_values(self.v_pages[self.page_table]).reshape(all_k.shape)
        return DenseKV(all_k.astype(self.dtype), all_v.astype(self.dtype), self.key_positions())

    def sources(self, stored: bool = False) -> tuple[KeySource, ...]:
        # Kernels read the pools in place. uint16 storage exists only on CPU: the Pallas kernel (interpret mode
        # there) takes it bit-cast to bfloat16, which copies the pool; stored=True hands the pools as they are
        # (the CPU custom call reads the bits itself).
        k, v = (self.k_pages, self.v_pages) if stored else (stored_values(self.k_pages), stored_values(self.v_pages))
        return (KeySource(k, v, self.page_table, self.key_positions()),)


KVView = DenseKV | PagedKV


class AttentionBackend:
    """One attention implementation. Subclasses are frozen dataclasses (hashable: they are static arguments of
    the jitted steps, so two backends never share a compiled program)."""

    name: str = "?"

    def unavailable(self, platform: str, phase: str, kind: str) -> str | None:
        """Why this backend cannot serve (platform, phase, layer kind), or None when it can."""
        return None

    def auto_platforms(self) -> tuple[str, ...] | None:
        """The platforms where `auto` may pick this backend (None: wherever it is available). A backend that is
        correct everywhere but only faster on some platforms names them; elsewhere it runs only when named."""
        return None

    def __call__(
        self,
        q: jax.Array,
        kv: KVView,
        q_positions: jax.Array,
        *,
        sliding_window: int | None,
        blocks: tuple[jax.Array, jax.Array] | None,
    ) -> jax.Array:
        """q: (B, T, N, H) (N a multiple of the view's K); kv: the layer's K/V view (logical key axis S);
        q_positions (B, T) int32 (negative: padding query). Causal by position, bounded by `sliding_window` when
        given; blocks: (query (B, T), key (B, S)) vision block ids (-1 none): a query also sees later keys of its
        block. Softmax scale 1 (Gemma 4 folds the scale into the q norm). Returns (B, T, N, H) in q's dtype."""
        raise NotImplementedError(f"attention backend {self.name!r} does not define __call__")
