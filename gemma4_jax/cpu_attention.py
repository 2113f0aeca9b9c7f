"""The `cpu` attention backend: the CPU paged-attention custom call (kernels/cpu_attention) behind the seam.

XLA:CPU runs attention over a paged pool as a gather of every row's pages, a widening of the gathered keys and a
transpose into the batched dots' layout (`xla`, `xla-rows`); the custom call reads each row's visible keys straight
from the pool through its page table, on XLA's intra-op threads, and never touches the slots past a row's length.
A K/V view (kv_view.py) goes to it as one key source: a paged pool or a windowed ring as stored (uint16 bfloat16
bits included: nothing is bit-cast or copied outside the call), dense keys as their own pool.

`auto` picks it on CPU for both phases and both layer kinds: it skips the keys no query of a row sees (past the
row's length, after a prefill tile's last query, before the window), where XLA multiplies every key slot and masks
(bench-100m bfloat16, docs/benchmarks.md: a 64-row decode step 53-58 ms against 58-69 with `xla-rows`, a
2048-token prefill 409 against 907 ms). Where the kernel cannot be built (no C++ compiler, GEMMA4_JAX_CPU_KERNELS=0)
it reports itself unavailable with the reason: `auto` falls back to `xla-rows` and an explicit choice is refused at
start-up.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import PartitionSpec as P

from gemma4_jax.kernels.cpu_attention import cpu_paged_attention, load, supported_dtypes
from gemma4_jax.kernels.paged_attention import KVSource
from gemma4_jax.kv_view import AttentionBackend, DenseKV, KVView, PagedKV
from gemma4_jax.pallas_attention import head_sharded_mesh


def stored_source(kv: KVView, key_blocks: jax.Array | None) -> KVSource:
    """The view as the kernel's one key source, pools as stored (a uint16 pool is not bit-cast: on CPU that
    copies the whole pool)."""
    if isinstance(kv, PagedKV):
        return KVSource(kv.k_pages, kv.v_pages, kv.page_table, kv.key_positions(), key_blocks)
    if isinstance(kv, DenseKV):
        (src,) = kv.sources()
        return KVSource(src.k_pages, src.v_pages, src.page_table, src.positions, key_blocks)
    raise TypeError(f"the cpu attention backend takes a PagedKV or DenseKV view, got {type(kv).__name__}")


@dataclasses.dataclass(frozen=True)
class CpuAttention(AttentionBackend):
    name: str = "cpu"

    def unavailable(self, platform: str, phase: str, kind: str) -> str | None:
        if platform != "cpu":
            return f"the CPU attention kernel runs on CPU only, not on {platform}"
        return load()

    def auto_platforms(self) -> tuple[str, ...] | None:
        return ("cpu",)

    def __call__(self, q, kv, q_positions, *, sliding_window, blocks):
        q_blocks, key_blocks = (None, None) if blocks is None else blocks
        source = stored_source(kv, key_blocks)
        if not supported_dtypes(q.dtype, source.k_pages.dtype):
            raise ValueError(
                f"attention backend 'cpu' takes float32 or bfloat16 models (K/V pools in the model's dtype), got "
                f"queries in {q.dtype} over pools of {source.k_pages.dtype}; choose --attention-backend xla"
            )

        def attend(q, source, q_positions, q_blocks):
            return cpu_paged_attention(q, source, q_positions, sliding_window=sliding_window, q_blocks=q_blocks)

        mesh = head_sharded_mesh(q, [source])
        if mesh is None:
            return attend(q, source, q_positions, q_blocks)
        # As the Pallas backend: each device attends with its own query heads over its own slice of the pools.
        heads, whole = P(None, None, "tp", None), P()
        spec = KVSource(heads, heads, whole, whole, None if key_blocks is None else whole)
        return jax.shard_map(attend, mesh=mesh, in_specs=(heads, spec, whole, None if q_blocks is None else whole),
                             out_specs=heads, check_vma=False)(q, source, q_positions, q_blocks)
