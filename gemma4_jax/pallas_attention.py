"""The `pallas` attention backend: the paged-attention kernel (kernels/paged_attention) behind the backend seam.

The K/V view a layer receives (kv_view.py) is handed to the kernel as key sources read in place: a paged
full-attention pool through its page table, a sliding-window ring through each sequence's ring row (plus a
prefill chunk's own keys after it), dense keys as their own pool. Nothing is gathered outside the kernel. The
same kernel serves both phases: decode rows (T >= 1 tokens, speculative verify included) split the key axis when
the batch is small, prefill chunks are tiled by query and skip key blocks no query of a tile can see.

Two registered names:
- `pallas`: the kernel compiled for the GPU (Triton lowering). `auto` prefers it on GPU for both phases and both
  layer kinds. Elsewhere it is unavailable unless GEMMA4_JAX_PALLAS_INTERPRET=1, which runs it in interpret mode.
- `pallas-interpret`: the kernel in Pallas interpret mode on any platform (tests: the engine with the kernel gives
  the tokens of `xla`). Slow; never picked by `auto`.

The kernel is a plain `pallas_call`, which XLA does not partition: on a mesh whose tensor axis splits the heads
(tp dividing the query and KV heads) the backend runs it under `shard_map`, each device on its own heads and its
own slice of the pools; otherwise on whole heads.
"""

from __future__ import annotations

import dataclasses
import os

import jax
from jax.sharding import PartitionSpec as P

from gemma4_jax.kernels.paged_attention import KVSource, paged_attention
from gemma4_jax.kv_view import AttentionBackend, KVView

INTERPRET_ENV = "GEMMA4_JAX_PALLAS_INTERPRET"


def interpret_requested() -> bool:
    """GEMMA4_JAX_PALLAS_INTERPRET=1 (or true/yes): run `pallas` in interpret mode where there is no GPU."""
    return os.environ.get(INTERPRET_ENV, "").strip().lower() in ("1", "true", "yes")


def kernel_sources(kv: KVView, key_blocks: jax.Array | None, stored: bool = False) -> list[KVSource]:
    """The view's key sources as the kernel takes them, with the vision key-block ids (B, S) of the view's logical
    key axis cut into each source's stretch. stored: pools as stored (uint16 bfloat16 bits not bit-cast)."""
    sources, offset = [], 0
    for src in kv.sources(stored):
        width = src.positions.shape[1]
        blocks = None if key_blocks is None else key_blocks[:, offset : offset + width]
        sources.append(KVSource(src.k_pages, src.v_pages, src.page_table, src.positions, blocks))
        offset += width
    return sources


@dataclasses.dataclass(frozen=True)
class PallasAttention(AttentionBackend):
    """interpret: always run the kernel in Pallas interpret mode (any platform); otherwise the GPU kernel, or
    interpret mode off GPU when GEMMA4_JAX_PALLAS_INTERPRET is set."""

    name: str = "pallas"
    interpret: bool = False

    def unavailable(self, platform: str, phase: str, kind: str) -> str | None:
        if self.interpret or platform == "gpu" or interpret_requested():
            return None
        return (
            f"the Pallas kernels need a GPU (Triton lowering); on {platform} use 'pallas-interpret' or set "
            f"{INTERPRET_ENV}=1 to run them in interpret mode"
        )

    def __call__(self, q, kv, q_positions, *, sliding_window, blocks):
        interpret = self.interpret or jax.default_backend() != "gpu"
        if interpret and not (self.interpret or interpret_requested()):
            raise ValueError(
                f"attention backend {self.name!r} needs a GPU; set {INTERPRET_ENV}=1 or choose "
                "'pallas-interpret' to run it in interpret mode"
            )
        q_blocks, key_blocks = (None, None) if blocks is None else blocks
        sources = kernel_sources(kv, key_blocks)

        def attend(q, sources, q_positions, q_blocks):
            out, _ = paged_attention(q, sources, q_positions, sliding_window=sliding_window, q_blocks=q_blocks,
                                     interpret=interpret)
            return out

        return attend_by_head(attend, q, sources, q_positions, q_blocks)


def attend_by_head(attend, q: jax.Array, sources: list[KVSource], q_positions: jax.Array,
                   q_blocks: jax.Array | None) -> jax.Array:
    """attend(q, sources, q_positions, q_blocks) -> (B, T, N, H): a kernel call (a plain `pallas_call` or custom
    call, which XLA does not partition). On a mesh whose tensor axis splits the heads (`head_sharded_mesh`) each
    device runs it on its own query heads and the KV heads they read (the pools are split by KV head,
    sharding.kv_pool_sharding): no pool crosses devices. Left to XLA, a kernel is handed whole (gathered)
    operands. Otherwise it runs on whole heads."""
    mesh = head_sharded_mesh(q, sources)
    if mesh is None:
        return attend(q, sources, q_positions, q_blocks)
    heads, whole = P(None, None, "tp", None), P()
    specs = [KVSource(heads, heads, whole, whole, None if s.blocks is None else whole) for s in sources]
    return jax.shard_map(attend, mesh=mesh, in_specs=(heads, specs, whole, None if q_blocks is None else whole),
                         out_specs=heads, check_vma=False)(q, sources, q_positions, q_blocks)


def head_sharded_mesh(q: jax.Array, sources: list[KVSource]):
    """The mesh in context if the kernel should run split by head over its tensor axis: tp > 1 dividing both the
    query heads and every source's KV heads (then each device's query heads read exactly its KV heads: query head
    n reads KV head n // G, and contiguous blocks of N / tp query heads map onto blocks of K / tp KV heads).
    Otherwise None: the kernel runs on whole heads (one device, or KV heads that tp does not divide, whose pools
    are replicated)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "tp" not in mesh.axis_names:
        return None
    tp = mesh.shape["tp"]
    if tp == 1 or q.shape[2] % tp or any(src.k_pages.shape[2] % tp for src in sources):
        return None
    return mesh
