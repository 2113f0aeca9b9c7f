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

from gemma4_jax.kernels.cpu_attention import cpu_paged_attention, load
from gemma4_jax.kv_view import AttentionBackend
from gemma4_jax.pallas_attention import attend_by_head, kernel_sources


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
        # Pools as stored: a uint16 pool bit-cast to bfloat16 would be copied whole on CPU.
        sources = kernel_sources(kv, key_blocks, stored=True)

        def attend(q, sources, q_positions, q_blocks):
            (source,) = sources  # views have one key source (kv_view.py)
            return cpu_paged_attention(q, source, q_positions, sliding_window=sliding_window, q_blocks=q_blocks)

        return attend_by_head(attend, q, sources, q_positions, q_blocks)
