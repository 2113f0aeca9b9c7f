"""Paged attention: one Pallas flash-attention kernel over K/V pools read in place through a page table, for
decode (ragged lengths, T >= 1 query tokens per row for speculative verify, the key axis split across programs:
flash-decoding) and prefill (causal, sliding window, bidirectional vision blocks, chunks against cached context,
key blocks outside each query tile's reach skipped). A kernel folder: kernel.py (Pallas), reference.py (pure jnp),
test_paged_attention.py (interpret mode vs the reference, the reference vs the model's attention).

Key sources (reference.KVSource): a paged pool (num_pages, page_size, K, H) with a page table (B, P), a sliding
window ring (rows, R, K, H) read at each sequence's row, or dense keys (B, S, K, H), each with the position of
every logical key; several sources are concatenated on the key axis. docs/kernels.md describes the tiling.
"""

from gemma4_jax.kernels.paged_attention.kernel import (
    combine,
    default_splits,
    default_tiles,
    paged_attention,
    tile_ranges,
)
from gemma4_jax.kernels.paged_attention.reference import (
    KVSource,
    dense_source,
    gather_source,
    paged_attention_reference,
    visible,
)

__all__ = [
    "KVSource",
    "combine",
    "default_splits",
    "default_tiles",
    "dense_source",
    "gather_source",
    "paged_attention",
    "paged_attention_reference",
    "tile_ranges",
    "visible",
]
