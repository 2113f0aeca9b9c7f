"""Step assembly: the engine's scheduled rows -> padded device inputs of one jitted step, and the step's host
results back per row.

A row is (request, new token ids, start position). Rows are padded to power-of-two buckets (rows B, tokens T,
full page-table width P; the windowed sliding table's width follows from T and P, `CacheLayout.window_width`), so
a configuration compiles a finite set of shapes (serving/warmup.py enumerates them through `build_rows`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from gemma4_jax.serving.kv_cache import TRASH_PAGE, CacheLayout, StepBatch, bucket, pages_needed
from gemma4_jax.serving.requests import Request
from gemma4_jax.serving.sampling import MAX_LOGPROBS, SamplingBatch, SamplingParams

Row = tuple[Request, list[int], int]


def num_logprobs_for(params: Sequence[SamplingParams]) -> int:
    """Top logprobs to compute for a batch: none, or all MAX_LOGPROBS when any row asks for top logprobs. One
    static value for every request size, so logprobs=1..20 never compile another step (a top-20 over the vocabulary
    costs next to nothing beside the step); each row keeps the first `logprobs` of them."""
    return MAX_LOGPROBS if any(p.logprobs for p in params) else 0


def build_rows(
    rows: list[Row],
    num_tokens: int,
    layout: CacheLayout,
    max_rows: int,
    *,
    lookahead: int = 0,
    num_logprobs: int | None = None,
    verify: bool = False,
    counts_on: bool = False,
    grammars=None,
):
    """Pad rows into a StepBatch and its sampling inputs. Returns (batch, sampling, steps (B,), keep (B,),
    num_logprobs, shape key).

    lookahead: tokens a multi-step decode writes after the first (their pages are in the tables); verify: rows of a
    speculative verify step ([last token, drafts...]): T is exactly num_tokens (k + 1, one shape for every step)
    and every row's tokens are kept. counts_on: penalty counts exist (another program); grammars: the engine's
    structured.Grammars when a row has a matcher."""
    page = layout.page_size
    b = bucket(len(rows), 1, max_rows)
    t = num_tokens if verify else bucket(num_tokens, 1 if num_tokens == 1 else 16)
    p = bucket(max(pages_needed(start + len(ids) + lookahead, page) for _, ids, start in rows), 4)
    pw = layout.window_width(t + lookahead, p)
    tokens = np.zeros((b, t), np.int32)
    positions = np.full((b, t), -1, np.int32)
    context = np.zeros((b,), np.int32)
    slots = np.full((b,), layout.max_seqs, np.int32)
    table = np.full((b, p), TRASH_PAGE, np.int32)
    window = np.full((b, pw), TRASH_PAGE, np.int32)
    window_start = np.zeros((b,), np.int32)
    last = np.zeros((b,), np.int32)
    steps = np.zeros((b,), np.int32)
    keep = np.zeros((b,), bool)
    for i, (req, ids, start) in enumerate(rows):
        tokens[i, : len(ids)] = ids
        positions[i, : len(ids)] = np.arange(start, start + len(ids))
        context[i] = start
        slots[i] = req.slot
        table[i, : len(req.pages)] = req.pages
        if layout.sliding_layers:
            first = layout.first_window_page(start)
            live = req.window_pages[first : first + pw]
            window[i, : len(live)] = live
            window_start[i] = first * page
        last[i] = len(ids) - 1
        steps[i] = len(req.output_ids)
        keep[i] = verify or start + len(ids) == len(req.all_ids)
    params = [req.params for req, _, _ in rows]
    token_mask = None
    if any(req.matcher is not None for req, _, _ in rows):
        # Rows that sample a kept token this step follow their grammar; the rest (and padding) are free.
        matchers = [req.matcher if keep[i] else None for i, (req, _, _) in enumerate(rows)]
        if verify:  # one mask per position: the grammar's after the row's drafts before it
            token_mask = grammars.fill_drafts(matchers, [ids[1:] for _, ids, _ in rows], b, t)
        else:
            token_mask = grammars.fill(matchers + [None] * (b - len(rows)), b)
    sampling = SamplingBatch.from_params(params, [req.key for req, _, _ in rows], b, token_mask)
    if num_logprobs is None:
        num_logprobs = num_logprobs_for(params)
    batch = StepBatch(
        tokens=tokens,
        positions=positions,
        context_lens=context,
        slots=slots,
        page_table=table,
        last_index=last,
        window_table=window,
        window_start=window_start,
    )
    key = (b, t, p, num_logprobs, counts_on, token_mask is not None)
    return batch, sampling, steps, keep, num_logprobs, key


def join_results(results: list, groups: list[list[int]], axis: int):
    """Per-micro-batch host results (rows padded to buckets along `axis`) -> one result over all rows in order."""
    if len(results) == 1:
        return results[0]

    def trim(result, n):
        return jax.tree.map(lambda x: np.take(x, np.arange(n), axis=axis), result)

    trimmed = [trim(r, len(g)) for r, g in zip(results, groups, strict=True)]
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=axis), *trimmed)
