"""Step assembly: the engine's scheduled rows -> padded device inputs of one jitted step, and the step's host
results back per row.

A row is (request, new token ids, start position). Rows are padded to power-of-two buckets (rows B, tokens T,
full page-table width P; the windowed sliding table's width follows from T and P, `CacheLayout.window_width`), so
a configuration compiles a finite set of shapes (serving/warmup.py enumerates them through `build_rows`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from gemma4_jax.serving.kv_cache import TRASH_PAGE, CacheLayout, StepBatch, bucket, page_bucket, pages_needed
from gemma4_jax.serving.requests import FREE_GRAMMAR, Request
from gemma4_jax.serving.sampling import MAX_LOGPROBS, SamplingBatch, SamplingParams

Row = tuple[Request, list[int], int]


@dataclasses.dataclass
class DeferredMask:
    """The grammar masks of a step, filled later: `Runner.step` dispatches the forward first and calls `fill()`
    while the device runs it (the mask needs only the matchers' states, which the previous step's tokens set).

    matchers: one per padded row (None: free; no row is FREE_GRAMMAR here); words: ceil(V / 32)."""

    grammars: Any  # structured.Grammars, or None when no row has a real grammar (the warm-up's FREE_GRAMMAR rows)
    matchers: list[Any]
    words: int

    def allow_all(self) -> np.ndarray:
        """A (B, words) mask of the same shape allowing every token."""
        return np.full((len(self.matchers), self.words), -1, np.int32)

    def fill(self) -> np.ndarray:
        """(B, words) int32 bitmask, as structured.Grammars.fill gives it."""
        if self.grammars is None:
            return self.allow_all()
        return self.grammars.fill(self.matchers, len(self.matchers))


def num_logprobs_for(params: Sequence[SamplingParams], always: bool = False) -> int:
    """Top logprobs to compute for a batch: none, or all MAX_LOGPROBS when any row asks for top logprobs (or
    `always`). One static value for every request size, so logprobs=1..20 never compile another step; each row
    keeps the first `logprobs` of them. Prefill steps pass always=True: their top-20 costs a few percent of a
    chunk of >= 16 tokens per row and saves a second family of prefill shapes; a decode step keeps both programs
    (on CPU a top-20 over a 262k vocabulary adds ~22 ms to a 150 ms batch-64 step: docs/server.md, "Warm-up")."""
    return MAX_LOGPROBS if always or any(p.logprobs for p in params) else 0


def token_bucket(num_tokens: int) -> int:
    """A step's padded T for its longest chunk: 1 (a decode-shaped step), else a power of two >= 16."""
    return bucket(num_tokens, 1 if num_tokens == 1 else 16)


def prefill_groups(chunk_lens: Sequence[int], max_padded_tokens: int) -> list[list[int]]:
    """Split a prefill's rows into steps whose padded size B x T stays within `max_padded_tokens` (a power of two:
    the step's token budget rounded up), longest chunks first. Returns row indices per step, ascending in each.

    Without the cap a prefill of r rows whose longest chunk has n tokens pads to bucket(r) x bucket(n) (up to
    64 x 512 for a 512-token budget), so every (rows, tokens) pair would be a shape to warm and most of such a
    step would be padding. With it, T = 512 has one row, T = 256 two, ... and the warm-up lists ~log2 shapes per
    token bucket. Rows of one token each (T = 1) are a decode-shaped step of any row count up to max_num_seqs."""
    order = sorted(range(len(chunk_lens)), key=lambda i: -chunk_lens[i])
    groups = []
    while order:
        t = token_bucket(chunk_lens[order[0]])
        size = len(order) if t == 1 else max(1, max_padded_tokens // t)
        groups.append(sorted(order[:size]))
        order = order[size:]
    return groups


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
    free_mask_words: int = 0,
    defer_mask: bool = False,
    ahead: int = 0,
):
    """Pad rows into a StepBatch and its sampling inputs. Returns (batch, sampling, steps (B,), keep (B,),
    num_logprobs, shape key).

    lookahead: tokens a multi-step decode writes after the first (their pages are in the tables); verify: rows of a
    speculative verify step ([last token, drafts...]): T is exactly num_tokens (k + 1, one shape for every step)
    and every row's tokens are kept. counts_on: the step takes the penalty counts (another program); grammars: the
    engine's structured.Grammars when a row has a matcher; free_mask_words: > 0 gives the step a token mask of that
    many words per row even when no sampled row has a grammar (all tokens allowed: the constrained program);
    defer_mask: a (non-verify) step whose rows have grammars gets a `DeferredMask` instead of the filled mask (the
    runner fills it while the forward runs; FREE_GRAMMAR rows count as grammars there, so the warm-up lowers the
    same split programs); ahead: tokens each row has in a step still in flight, not yet in its `output_ids`
    (async scheduling: the rows' ids are placeholders, the engine passes the in-flight step's tokens instead)."""
    page = layout.page_size
    b = bucket(len(rows), 1, max_rows)
    t = num_tokens if verify else token_bucket(num_tokens)
    p = page_bucket(max(pages_needed(start + len(ids) + lookahead, page) for _, ids, start in rows), page)
    pw = layout.window_width(t + lookahead, p)
    n = len(rows)
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
    # The per-row columns as lists first, then one numpy assignment each: a batch-64 decode step built them with
    # ~10 small numpy writes per row (~0.5 ms of host work per step, on a core the step's kernels share).
    starts = [start for _, _, start in rows]
    lens = [len(ids) for _, ids, _ in rows]
    context[:n] = starts
    slots[:n] = [req.slot for req, _, _ in rows]
    last[:n] = [m - 1 for m in lens]
    steps[:n] = [len(req.output_ids) + ahead for req, _, _ in rows]
    keep[:n] = [verify or start + m == req.num_tokens + ahead for (req, _, start), m in zip(rows, lens)]
    if all(m == 1 for m in lens):  # decode rows: one token each
        tokens[:n, 0] = [ids[0] for _, ids, _ in rows]
        positions[:n, 0] = starts
    else:
        for i, (_, ids, start) in enumerate(rows):
            tokens[i, : len(ids)] = ids
            positions[i, : len(ids)] = np.arange(start, start + len(ids))
    for i, (req, _, start) in enumerate(rows):
        table[i, : len(req.pages)] = req.pages
        if layout.sliding_layers:
            first = layout.first_window_page(start)
            live = req.window_pages[first : first + pw]
            window[i, : len(live)] = live
            window_start[i] = first * page
    params = [req.params for req, _, _ in rows]
    token_mask = None
    # Rows that sample a kept token this step follow their grammar; the rest (and padding) are free.
    matchers = [req.matcher if keep[i] and req.matcher is not FREE_GRAMMAR else None
                for i, (req, _, _) in enumerate(rows)]
    if defer_mask and not verify and any(req.matcher is not None and keep[i] for i, (req, _, _) in enumerate(rows)):
        words = free_mask_words or grammars.words
        token_mask = DeferredMask(grammars, matchers + [None] * (b - len(rows)), words)
    elif any(m is not None for m in matchers):
        if verify:  # one mask per position: the grammar's after the row's drafts before it
            token_mask = grammars.fill_drafts(matchers, [ids[1:] for _, ids, _ in rows], b, t)
        else:
            token_mask = grammars.fill(matchers + [None] * (b - len(rows)), b)
    elif free_mask_words:  # per position in a verify step, as Grammars.fill_drafts gives
        token_mask = np.full((b, t, free_mask_words) if verify else (b, free_mask_words), -1, np.int32)
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
    """Per-group host results (rows padded to buckets along `axis`) -> one result over all rows, row i of the
    result being row i of the step (`groups` hold each result's row indices, in any order)."""
    if len(results) == 1:
        return results[0]

    def trim(result, n):
        return jax.tree.map(lambda x: np.take(x, np.arange(n), axis=axis), result)

    trimmed = [trim(r, len(g)) for r, g in zip(results, groups, strict=True)]
    joined = jax.tree.map(lambda *xs: np.concatenate(xs, axis=axis), *trimmed)
    order = np.concatenate([np.asarray(g, np.int64) for g in groups])
    if np.array_equal(order, np.arange(len(order))):
        return joined
    inverse = np.argsort(order)
    return jax.tree.map(lambda x: np.take(x, inverse, axis=axis), joined)
