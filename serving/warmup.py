"""Warm-up: compile every step shape the engine's scheduler can produce before the first request arrives.

JAX compiles a jitted step once per static shape. The engine pads each step to buckets (rows B, tokens T, pages
of context P; `step_builder.build_rows`), plus whether any row wants top logprobs, so a configuration has a finite
set of shapes; without a warm-up each one compiles on the request that first meets it (seconds to a minute each). Here:

- `plan(engine)` lists that set from the engine's configuration (max_num_seqs, max_num_batched_tokens,
  max_model_len, page_size, num_scheduler_steps), one `WarmupShape` per distinct shape key. The bucket values are
  not written down here: representatives of every possible row count, chunk length and context length are passed
  through the engine's own `build_rows`, and the keys it returns are deduplicated, so the list follows the scheduler's
  buckets wherever they change;
- `warm_up(engine)` runs each shape once through the engine's own step path (`Engine._run`, `_run_multi`) on
  dummy rows that write only the trash pages, with a progress bar and the time per shape at
  INFO, then the prompt-logprob forward (`echo` with `logprobs`) at each of its prompt buckets.

What a request may vary without a compile after this: the prompt length, `n`, `echo`, tools (chat templates only),
streaming, any sampling value, `logprobs` 0..20 (one static count, `step_builder.num_logprobs_for`). What still
compiles on first use, and is logged as it does: penalties (the first request with one allocates the token counts, a
second family of shapes), structured outputs (a token mask), images and audio (their encoders and soft-token counts), a
draft model's own programs. Speculative verify steps (k + 1 tokens per row) are warmed when speculation is on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator

import jax

from gemma4_jax.serving.async_engine import score_prompt
from gemma4_jax.serving.engine import Engine
from gemma4_jax.serving.kv_cache import TRASH_PAGE, pages_needed
from gemma4_jax.serving.requests import Request, Status
from gemma4_jax.serving.sampling import MAX_LOGPROBS, SamplingParams, request_key

log = logging.getLogger(__name__)

# async_engine.score_prompt pads a prompt to a power of two of at least this many tokens (a smaller floor there
# would leave short echo prompts to compile after the warm-up: tests/test_warmup.py sends one).
PROMPT_LOGPROBS_MIN_PAD = 16


@dataclasses.dataclass(frozen=True)
class WarmupShape:
    """One compiled program to warm: a step `kind` ("prefill", "decode", "multi", "verify" or "prompt_logprobs")
    over `rows` rows whose longest new chunk is `num_tokens` tokens spanning `pages` KV pages, with or without top
    logprobs. `key` is the engine's shape key (what `Engine._timed` counts compiles by)."""

    kind: str
    rows: int
    num_tokens: int
    pages: int
    logprobs: bool
    key: tuple

    def describe(self) -> str:
        if self.kind == "prompt_logprobs":
            return f"prompt logprobs, {self.num_tokens} tokens"
        return (
            f"{self.kind} B={self.key[0][0] if self.key else self.rows} rows={self.rows} tokens={self.num_tokens} "
            f"pages={self.pages}{' +logprobs' if self.logprobs else ''}"
        )


@dataclasses.dataclass
class WarmupReport:
    """What `warm_up` did: shapes run, new compiles among them (the rest were already compiled), wall seconds."""

    shapes: int
    compiles: int
    seconds: float


def _powers_of_two_up_to(limit: int) -> list[int]:
    """1, 2, 4, ... <= limit, and limit itself: one representative of every power-of-two bucket of 1..limit (a
    bucket is the smallest power of two >= n, so it is reached by the power of two just below it, or by limit)."""
    values = {1 << k for k in range(max(limit, 1).bit_length()) if 1 << k <= limit}
    return sorted(values | {limit})


def _dummy_request(engine: Engine, start: int, num_tokens: int, logprobs: bool, decoding: bool) -> Request:
    """A request whose next step feeds `num_tokens` tokens at positions [start, start + num_tokens), parked on the
    trash ring row and the trash page: its step writes nothing any real request reads."""
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=1 if logprobs else None)
    total = start + num_tokens
    prompt = [0] * (total - 1 if decoding else total)
    req = Request("warmup", None, prompt, params, arrival=-1, key=request_key(0), status=Status.RUNNING)
    if decoding:
        req.output_ids = [0]
    req.slot = engine.layout.max_seqs  # the trash slot
    req.pages = [TRASH_PAGE] * pages_needed(total, engine.layout.page_size)
    req.window_pages = list(req.pages)
    req.num_computed = start
    return req


def _rows(
    engine: Engine, rows: int, num_tokens: int, pages: int, logprobs: bool, decoding: bool, lookahead: int = 0
) -> list[tuple[Request, list[int], int]]:
    """`rows` dummy rows ending in their `pages`-th page (less `lookahead` tokens): the first feeds num_tokens
    tokens, the others one each (one shared record: the step only reads them). Every row spans the same pages, so
    the micro-batches of a pipeline get the same shape too."""
    end = min(pages * engine.layout.page_size, engine.max_model_len) - lookahead
    first = _dummy_request(engine, max(0, end - num_tokens), num_tokens, logprobs, decoding)
    out = [(first, [0] * num_tokens, first.num_computed)]
    if rows > 1:
        other = _dummy_request(engine, end - 1, 1, logprobs, decoding)
        out += [(other, [0], other.num_computed)] * (rows - 1)
    return out


def _representatives(values: range, key_of) -> list[int]:
    """For each distinct key_of(v), v ascending: the smallest and the largest v giving it -> [(smallest, largest)]."""
    groups: dict = {}
    for v in values:
        k = key_of(v)
        lo, hi = groups.get(k, (v, v))
        groups[k] = (min(lo, v), max(hi, v))
    return sorted(groups.values())


def plan(engine: Engine) -> list[WarmupShape]:
    """Every step shape the scheduler can produce with this engine's configuration, deduplicated by shape key,
    smallest first; then the prompt-logprob buckets. See the module docstring for what is left out."""
    config, page = engine.config, engine.layout.page_size
    max_len, budget, max_seqs = engine.max_model_len, config.max_num_batched_tokens, config.max_num_seqs
    max_pages = pages_needed(max_len, page)

    def key_of(rows, num_tokens, pages, logprobs, decoding, lookahead=0, verify=False):
        built = _rows(engine, rows, num_tokens, pages, logprobs, decoding, lookahead)
        return engine._microbatches(built, num_tokens, lookahead, verify=verify)[3]

    # Chunk lengths grouped by their token bucket (smallest of each: the most rows fit beside it in the budget), and
    # context lengths by their page bucket (largest of each: the longest chunk fits in it).
    chunks = [
        lo
        for lo, _ in _representatives(
            range(1, min(budget, max_len) + 1), lambda n: key_of(1, n, max_pages, False, False)[0][1]
        )
    ]
    page_counts = [
        hi for _, hi in _representatives(range(1, max_pages + 1), lambda m: key_of(1, 1, m, False, True)[0][2])
    ]
    # A prefill keeps a power-of-two number of rows (Engine._schedule_prefill), each with at least one token; a
    # decode batch has any number of rows up to max_num_seqs (micro-batched under a pipeline: keys differ per count).
    prefill_rows = [r for r in _powers_of_two_up_to(max_seqs) if r & (r - 1) == 0 and r <= budget]
    decode_rows = list(range(1, max_seqs + 1)) if engine.runner.microbatches > 1 else _powers_of_two_up_to(max_seqs)
    candidates = []
    for logprobs in (False, True):
        for m in page_counts:
            for r in decode_rows:
                candidates.append(("decode", r, 1, m, logprobs))
            for n in chunks:
                if n > m * page:
                    continue
                for r in prefill_rows:
                    if r - 1 + n <= budget:
                        candidates.append(("prefill", r, n, m, logprobs))
    steps = config.num_scheduler_steps
    # Speculative decoding: a decode batch with drafts runs as a verify step of exactly k + 1 tokens per row.
    verify_tokens = engine.speculative.num_speculative_tokens + 1 if engine.speculative is not None else 0
    shapes: dict[tuple, WarmupShape] = {}
    for kind, rows, n, m, logprobs in candidates:
        key = (kind, key_of(rows, n, m, logprobs, kind == "decode"))
        shapes.setdefault(key, WarmupShape(kind, rows, n, m, logprobs, key[1]))
        if kind == "decode" and steps > 1 and m * page >= steps:
            multi = ("multi", key_of(rows, 1, m, logprobs, True, steps - 1))
            shapes.setdefault(multi, WarmupShape("multi", rows, 1, m, logprobs, multi[1]))
        if kind == "decode" and engine.speculative is not None and m * page >= verify_tokens:
            verify = ("verify", key_of(rows, verify_tokens, m, logprobs, True, verify=True))
            shapes.setdefault(verify, WarmupShape("verify", rows, verify_tokens, m, logprobs, verify[1]))
    out = sorted(shapes.values(), key=lambda s: (s.pages, s.num_tokens, s.rows, s.kind, s.logprobs))
    # Echo with logprobs: one full forward of the prompt, padded to a power of two of at least 16 tokens
    # (async_engine.score_prompt): one representative per padded length.
    lengths = [n for n in _powers_of_two_up_to(max_len) if n >= min(PROMPT_LOGPROBS_MIN_PAD, max_len)]
    out += [WarmupShape("prompt_logprobs", 1, n, pages_needed(n, page), True, ()) for n in lengths]
    return out


@contextlib.contextmanager
def _engine_log_quiet() -> Iterator[None]:
    """The engine logs each new shape it compiles; during the warm-up this module logs them itself (once each)."""
    engine_log = logging.getLogger("gemma4_jax.serving.engine")
    level = engine_log.level
    engine_log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        engine_log.setLevel(level)


def _run_shape(engine: Engine, shape: WarmupShape) -> None:
    if shape.kind == "prompt_logprobs":
        score_prompt(engine.model, [0] * shape.num_tokens, MAX_LOGPROBS)
        return
    steps = engine.config.num_scheduler_steps
    if shape.kind == "multi":
        rows = _rows(engine, shape.rows, 1, shape.pages, shape.logprobs, True, steps - 1)
        engine._run_multi([req for req, _, _ in rows], steps)
        return
    rows = _rows(engine, shape.rows, shape.num_tokens, shape.pages, shape.logprobs, shape.kind != "prefill")
    if shape.kind == "verify":  # as Engine._run_verify runs it, without appending the sampled tokens
        _, built, num_logprobs, key = engine._microbatches(rows, shape.num_tokens, verify=True)
        engine._timed(("verify", key), engine.runner.verify, built, num_logprobs)
        return
    engine._run(rows, shape.num_tokens, shape.kind)


def warm_up(engine: Engine, progress: bool = True) -> WarmupReport:
    """Compile (or load from the persistent compilation cache) every shape of `plan(engine)`. Run it before the
    engine takes requests: it uses the engine's step path on dummy rows and must not interleave with real steps.
    progress: a tqdm bar on stderr. Logs the plan, the time of each shape and a summary at INFO."""
    if engine.has_unfinished():
        raise RuntimeError("warm up the engine before adding requests")
    shapes = plan(engine)
    families = {}
    for s in shapes:
        families[s.kind] = families.get(s.kind, 0) + 1
    log.info(
        "warm-up: %d shapes to compile (%s) for max_num_seqs %d, max_num_batched_tokens %d, max_model_len %d; "
        "fewer with smaller limits, none with --enforce-eager (compile on first use instead)",
        len(shapes),
        ", ".join(f"{n} {k}" for k, n in families.items()),
        engine.config.max_num_seqs,
        engine.config.max_num_batched_tokens,
        engine.max_model_len,
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(shapes), desc="warm-up", unit="shape")
    compiles_before = engine.stats["compiles"]
    t_start = time.perf_counter()
    try:
        with _engine_log_quiet():
            for i, shape in enumerate(shapes, 1):
                t0 = time.perf_counter()
                _run_shape(engine, shape)
                log.info("warm-up %d/%d: %s in %.2f s", i, len(shapes), shape.describe(), time.perf_counter() - t0)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t_start
    report = WarmupReport(len(shapes), engine.stats["compiles"] - compiles_before, seconds)
    cache = (
        "compiled or loaded from the persistent compilation cache"
        if jax.config.jax_compilation_cache_dir
        else "compiled; the persistent compilation cache is off"
    )
    log.info(
        "warm-up done: %d shapes in %.1f s (%s; %d engine step shapes new to this process)",
        report.shapes,
        seconds,
        cache,
        report.compiles,
    )
    return report
