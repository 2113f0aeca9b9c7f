"""Media in the engine's scheduler and steps: what a request with media may ask, where its prefill chunks may end,
and the soft tokens of a step's chunks.

1. `check_request` (Engine.add_request): placeholder counts against the media, and what the engine can serve.
2. `clamp_chunk` (the scheduler): bidirectional vision attention (text_config.use_bidirectional_attention ==
   "vision") needs each image's (or video frame's) run of soft tokens inside one prefill chunk, since its first
   token attends to its last: a chunk ends before a run that does not fit, and a run longer than
   `max_num_batched_tokens` is refused at admission.
3. `chunk_media` (each prefill step): the first time a chunk of a request runs, its towers run once
   (`MediaInputs.encode`, serving/mm_inputs.py); every chunk that holds placeholders passes its slice of soft
   tokens to the step as `StepMedia`, which the one forward splices into the embeddings (placeholder ids become pad
   for the token and PLE lookups, as HF). On a model with towers every prefill step (T > 1) carries a StepMedia of
   one slot per token of its (B, T) batch, empty or not, so a text chunk and a media chunk of the same shape run
   the same program and the warm-up's prefill programs cover both; a one-token chunk holding a placeholder runs in
   the 16-token prefill shape (`holds_placeholders`). Decode steps carry no media.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from gemma4_jax import multimodal
from gemma4_jax.forward import MediaTokens
from gemma4_jax.processing import MediaError
from gemma4_jax.serving.mm_inputs import MediaInputs
from gemma4_jax.serving.runner import StepMedia


def check_request(engine: Any, ids: Sequence[int], media: MediaInputs | None) -> None:
    """Refuse what the engine cannot serve: media on a text-only or pipelined model, placeholder ids without media,
    counts that do not match, a vision block longer than a prefill chunk can hold (bidirectional attention)."""
    cfg = engine.model.config
    if media is None:
        if not multimodal.has_towers(cfg):
            return
        ids_arr = np.asarray(ids)
        for name, token_id in (("image", cfg.image_token_id), ("video", cfg.video_token_id),
                               ("audio", cfg.audio_token_id)):
            if np.any(ids_arr == token_id):
                raise MediaError(f"the prompt holds {name} placeholder tokens (id {token_id}) but no {name} was "
                                 "given")
        return
    if not multimodal.has_towers(cfg):
        raise MediaError("this model has no vision or audio tower; media need a Gemma4ForConditionalGeneration "
                         "checkpoint")
    ids_arr = np.asarray(ids)
    kinds = {multimodal.IMAGE_TYPE: cfg.image_token_id, multimodal.VIDEO_TYPE: cfg.video_token_id,
             multimodal.AUDIO_TYPE: cfg.audio_token_id}
    placed = np.zeros(ids_arr.shape, np.int32)
    for kind, token_id in kinds.items():
        placed[ids_arr == token_id] = kind
    if media.positions.size != np.count_nonzero(placed) or not np.array_equal(placed[media.positions], media.kinds):
        raise MediaError("the media do not match the prompt's placeholder tokens (build them from these ids)")
    budget = engine.config.max_num_batched_tokens
    if media.runs.size and int((media.runs[:, 1] - media.runs[:, 0]).max()) > budget:
        longest = int((media.runs[:, 1] - media.runs[:, 0]).max())
        raise MediaError(f"an image of {longest} soft tokens does not fit in one prefill chunk "
                         f"(max_num_batched_tokens={budget}); bidirectional vision attention needs the whole image "
                         "in one chunk: raise max_num_batched_tokens or lower the image's max_soft_tokens")


def clamp_chunk(media: MediaInputs, start: int, size: int) -> int:
    """Shorten a prefill chunk [start, start + size) so that it does not end inside a vision block (bidirectional
    attention needs the whole block in one chunk). 0 when the chunk would start with a block it cannot hold."""
    if not media.runs.size:
        return size
    end = start + size
    inside = (media.runs[:, 0] < end) & (end < media.runs[:, 1])
    if not inside.any():
        return size
    return max(0, int(media.runs[inside, 0][0]) - start)


def _placeholders(media: MediaInputs, start: int, num_tokens: int) -> tuple[int, int]:
    """[lo, hi): the indices of media.positions inside the chunk [start, start + num_tokens)."""
    lo, hi = np.searchsorted(media.positions, [start, start + num_tokens])
    return int(lo), int(hi)


def holds_placeholders(rows: Sequence[tuple[Any, list[int], int]]) -> bool:
    """Whether any row's chunk (request, new token ids, start position) holds a media placeholder."""
    for req, ids, start in rows:
        media = getattr(req, "media", None)
        if media is not None:
            lo, hi = _placeholders(media, start, len(ids))
            if hi > lo:
                return True
    return False


def chunk_media(model: Any, rows: Sequence[tuple[Any, list[int], int]], tokens_shape: tuple[int, int]
                ) -> StepMedia | None:
    """The media of a prefill step's rows (request, new token ids, start position) over a (B, T) token batch:
    None on a model without towers, else a StepMedia of B * T slots,
    possibly all padding. Runs the towers of requests seen first. Slots are flat indices into the (B*T) chunk
    tokens; padding slots point one past them (B * T: the splice drops them) with zero soft tokens."""
    if not multimodal.has_towers(model.config):
        return None
    slots, soft, block_rows = [], [], {}
    t = tokens_shape[1]
    bidirectional = model.config.vision_bidirectional
    for i, (req, ids, start) in enumerate(rows):
        media = getattr(req, "media", None)
        if media is None:
            continue
        lo, hi = _placeholders(media, start, len(ids))
        if hi > lo:
            tokens = media.encode(model)
            slots.append(i * t + media.positions[lo:hi] - start)
            soft.append(tokens[lo:hi])
        if bidirectional and media.blocks is not None:
            block_rows[i] = media.blocks[start: start + len(ids)]
    m = tokens_shape[0] * t
    slots_all = np.full((m,), m, np.int32)
    soft_all = np.zeros((m, model.config.text.hidden_size), jnp.dtype(model.dtype))
    if slots:
        used = np.concatenate(slots).astype(np.int32)
        slots_all[: used.size] = used
        soft_all[: used.size] = np.concatenate(soft)
    blocks = None
    if bidirectional:
        blocks = np.full(tokens_shape, -1, np.int32)
        for i, row in block_rows.items():
            blocks[i, : row.size] = row
    return StepMedia(MediaTokens(slots=slots_all, soft=soft_all), blocks)
