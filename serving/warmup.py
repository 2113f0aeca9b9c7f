"""Warm-up: compile every step shape the engine's scheduler can produce before the first request arrives.

JAX compiles a jitted step once per static shape. The engine pads each step to buckets (rows B, tokens T, pages
of context P; `step_builder.build_rows`), plus top logprobs or not and the constrained program (penalty counts and a
token mask), so a configuration has a finite set of shapes; without a warm-up each one compiles on the request that
first meets it (seconds to a minute each). The bucket policy keeps that set small (709 shapes -> 218 at the
defaults, docs/server.md "Warm-up"): one-token prefill chunks run as decode steps, a prefill program pads to at most
the token budget (`step_builder.prefill_groups`) and always computes top logprobs, page tables are at least 256
tokens wide (`kv_cache.page_bucket`), and penalties and grammars share one decode-shaped program family
(`Engine._microbatches`, `Engine._prefill_chunk`). Here:

- `plan(engine)` lists that set from the engine's configuration (max_num_seqs, max_num_batched_tokens,
  max_model_len, page_size, num_scheduler_steps, speculative decoding), one `WarmupShape` per distinct shape key.
  The bucket values are not written down here: representatives of every possible row count, chunk length and
  context length are passed through the engine's own `build_rows`, and the keys it returns are deduplicated, so the
  list follows the scheduler's buckets wherever they change;
- `warm_up(engine)` lowers each shape with the exact inputs the engine's step passes (dummy rows on the trash slot
  and page) and compiles the programs in a thread pool (XLA's compile releases the GIL); the step's later calls
  find the compiled executables in JAX's in-memory cache, and a second process finds them in the persistent
  compilation cache (serving/compilation_cache.py). A progress bar moves per compiled shape and each shape's time
  is logged at INFO. The prompt-logprob forward (`echo` with `logprobs`, one per prompt bucket) runs whole in the
  same pool, the MTP drafter's programs (drafting, recording hidden states) after it; the penalty counts are
  allocated and their reset program compiled first. A pipeline-parallel engine (or threads=1) runs each shape
  through the engine's step path instead, one at a time.

What a request may vary without a compile after this: the prompt length, `n`, `echo`, tools (chat templates only),
streaming, any sampling value, `logprobs` 0..20 (one static count, `step_builder.num_logprobs_for`), penalties,
structured outputs (their grammar's token mask; building a grammar is host work), speculative verify steps and the
MTP drafter when configured. What still compiles on first use, and is logged as it does: images and audio (their
encoders and the chunks that carry soft tokens).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed

import jax
import numpy as np

from gemma4_jax.serving.async_engine import score_prompt
from gemma4_jax.serving.engine import Engine
from gemma4_jax.serving.kv_cache import TRASH_PAGE, bucket, pages_needed
from gemma4_jax.serving.requests import FREE_GRAMMAR, Request, Status
from gemma4_jax.serving.runner import Runner
from gemma4_jax.serving.sampling import MAX_LOGPROBS, SamplingParams, request_key
from gemma4_jax.serving.speculative import AssistantProposer
from gemma4_jax.serving.step_builder import token_bucket

log = logging.getLogger(__name__)

# async_engine.score_prompt pads a prompt to a power of two of at least this many tokens (a smaller floor there
# would leave short echo prompts to compile after the warm-up: tests/test_warmup.py sends one).
PROMPT_LOGPROBS_MIN_PAD = 16


@dataclasses.dataclass(frozen=True)
class WarmupShape:
    """One compiled program to warm: a step `kind` ("prefill", "decode", "multi", "verify", "prompt_logprobs" or
    "draft")
    over `rows` rows whose longest new chunk is `num_tokens` tokens spanning `pages` KV pages, with or without top
    logprobs. `key` is the engine's shape key (what `Engine._timed` counts compiles by)."""

    kind: str
    rows: int
    num_tokens: int
    pages: int
    logprobs: bool
    key: tuple
    constrained: bool = False  # the full family: penalty counts, a token mask and top logprobs (Engine._microbatches)
    grammar: bool = False  # the grammar family: a token mask only

    def describe(self) -> str:
        if self.kind == "prompt_logprobs":
            return f"prompt logprobs, {self.num_tokens} tokens"
        extra = (" +penalties/grammar" if self.constrained else " +grammar" if self.grammar
                 else " +logprobs" if self.logprobs else "")
        return (
            f"{self.kind} B={self.key[0][0] if self.key else self.rows} rows={self.rows} tokens={self.num_tokens} "
            f"pages={self.pages}{extra}"
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


def _dummy_request(
    engine: Engine,
    start: int,
    num_tokens: int,
    logprobs: bool,
    decoding: bool,
    constrained: bool = False,
    grammar: bool = False,
) -> Request:
    """A request whose next step feeds `num_tokens` tokens at positions [start, start + num_tokens), parked on the
    trash slot and the trash page: its step writes nothing any real request reads. constrained: it has a penalty
    (its steps are the full family's programs); grammar: it has an allow-all grammar (the grammar family's)."""
    params = SamplingParams(
        temperature=0.0, max_tokens=1, logprobs=1 if logprobs else None, presence_penalty=0.5 if constrained else 0.0
    )
    total = start + num_tokens
    prompt = [0] * (total - 1 if decoding else total)
    req = Request("warmup", None, prompt, params, arrival=-1, key=request_key(0), status=Status.RUNNING)
    if decoding:
        req.output_ids = [0]
    if grammar:
        req.matcher = FREE_GRAMMAR
    req.slot = engine.layout.max_seqs  # the trash slot
    req.pages = [TRASH_PAGE] * pages_needed(total, engine.layout.page_size)
    req.window_pages = list(req.pages)
    req.num_computed = start
    return req


def _rows(
    engine: Engine,
    rows: int,
    num_tokens: int,
    pages: int,
    logprobs: bool,
    decoding: bool,
    lookahead: int = 0,
    constrained: bool = False,
    grammar: bool = False,
) -> list[tuple[Request, list[int], int]]:
    """`rows` dummy rows ending in their `pages`-th page (less `lookahead` tokens): the first feeds num_tokens
    tokens, the others one each (one shared record: the step only reads them). Every row spans the same pages, so
    the micro-batches of a pipeline get the same shape too."""
    end = min(pages * engine.layout.page_size, engine.max_model_len) - lookahead
    first = _dummy_request(engine, max(0, end - num_tokens), num_tokens, logprobs, decoding, constrained, grammar)
    out = [(first, [0] * num_tokens, first.num_computed)]
    if rows > 1:
        other = _dummy_request(engine, end - 1, 1, logprobs, decoding, constrained, grammar)
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
    padded_cap = engine.prefill_padded_tokens

    def key_of(rows, num_tokens, pages, logprobs, decoding, lookahead=0, verify=False, constrained=False,
               grammar=False):
        built = _rows(engine, rows, num_tokens, pages, logprobs, decoding, lookahead, constrained, grammar)
        # A prefill program always computes top logprobs (Engine._run); decode, multi and verify ask the rows.
        num_logprobs = MAX_LOGPROBS if not decoding else None
        return engine._microbatches(built, num_tokens, lookahead, verify=verify, num_logprobs=num_logprobs)[3]

    # Chunk lengths > 1 grouped by their token bucket (smallest of each: the most rows fit beside it), and context
    # lengths by their page bucket (largest of each: the longest chunk fits in it). One-token chunks run as
    # decode-shaped steps (Engine._run_group).
    chunks = [
        lo
        for lo, _ in _representatives(
            range(2, min(budget, max_len) + 1), lambda n: key_of(1, n, max_pages, False, False)[0][1]
        )
    ]
    page_counts = [
        hi for _, hi in _representatives(range(1, max_pages + 1), lambda m: key_of(1, 1, m, False, True)[0][2])
    ]
    # A prefill program pads to bucket(rows) x token_bucket(longest chunk) <= the padded budget
    # (step_builder.prefill_groups); a decode batch has any number of rows up to max_num_seqs (micro-batched under a
    # pipeline: keys differ per count).
    prefill_rows = [r for r in _powers_of_two_up_to(max_seqs) if r & (r - 1) == 0]
    decode_rows = list(range(1, max_seqs + 1)) if engine.runner.microbatches > 1 else _powers_of_two_up_to(max_seqs)
    # Decode steps come plain, with top logprobs, in the grammar family (a token mask) and in the full family
    # (penalties, or a grammar beside logprobs: counts, mask and top logprobs in one program); a constrained
    # request's first token is sampled by a one-token step (Engine._prefill_chunk), so prefill programs are never
    # constrained.
    families = ((False, False, False), (True, False, False), (False, False, True), (True, True, False))
    candidates = []
    for m in page_counts:
        for logprobs, constrained, grammar in families:
            candidates += [("decode", r, 1, m, logprobs, constrained, grammar) for r in decode_rows]
        for n in chunks:
            if n > m * page:
                continue
            candidates += [
                ("prefill", r, n, m, True, False, False)
                for r in prefill_rows
                if r - 1 + n <= budget and r * token_bucket(n) <= padded_cap
            ]
    steps = config.num_scheduler_steps
    # Speculative decoding: a decode batch with drafts runs as a verify step of exactly k + 1 tokens per row.
    verify_tokens = engine.speculative.num_speculative_tokens + 1 if engine.speculative is not None else 0
    shapes: dict[tuple, WarmupShape] = {}
    for kind, rows, n, m, logprobs, constrained, grammar in candidates:
        key = (kind, key_of(rows, n, m, logprobs, kind == "decode", constrained=constrained, grammar=grammar))
        shapes.setdefault(key, WarmupShape(kind, rows, n, m, logprobs, key[1], constrained, grammar))
        # Rows with a grammar never decode several steps per call (Engine._multi_step_size).
        if kind == "decode" and steps > 1 and m * page >= steps and not grammar:
            multi = ("multi", key_of(rows, 1, m, logprobs, True, steps - 1, constrained=constrained))
            shapes.setdefault(multi, WarmupShape("multi", rows, 1, m, logprobs, multi[1], constrained))
        if kind == "decode" and engine.speculative is not None and m * page >= verify_tokens:
            verify = ("verify", key_of(rows, verify_tokens, m, logprobs, True, verify=True, constrained=constrained,
                                       grammar=grammar))
            shapes.setdefault(verify, WarmupShape("verify", rows, verify_tokens, m, logprobs, verify[1], constrained,
                                                  grammar))
    out = sorted(shapes.values(),
                 key=lambda s: (s.pages, s.num_tokens, s.rows, s.kind, s.logprobs, s.constrained, s.grammar))
    # Echo with logprobs: one full forward of the prompt, padded to a power of two of at least 16 tokens
    # (async_engine.score_prompt): one representative per padded length.
    lengths = [n for n in _powers_of_two_up_to(max_len) if n >= min(PROMPT_LOGPROBS_MIN_PAD, max_len)]
    out += [WarmupShape("prompt_logprobs", 1, n, pages_needed(n, page), True, ()) for n in lengths]
    if isinstance(engine.proposer, AssistantProposer):
        # The MTP drafter's own program (AssistantProposer.propose_from: rows x its context bucket, bucket(pages, 4)).
        draft_pages = [hi for _, hi in _representatives(range(1, max_pages + 1), lambda m: bucket(m, 4))]
        out += [WarmupShape("draft", r, 1, m, False, ()) for m in draft_pages for r in _powers_of_two_up_to(max_seqs)]
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


def _run_whole(engine: Engine, shape: WarmupShape) -> None:
    """Run a program that holds no engine state: the prompt-logprob forward or the MTP drafter (no donation)."""
    if shape.kind == "prompt_logprobs":
        score_prompt(engine.model, [0] * shape.num_tokens, MAX_LOGPROBS)
        return
    proposer = engine.proposer
    rows = _rows(engine, shape.rows, 1, shape.pages, False, True)
    proposer.propose_from(engine.cache, [req for req, _, _ in rows], [0] * len(rows))
    # The drafter also keeps each step's hidden states by slot (one small program per row bucket): the trash slot's.
    hidden = jax.device_put(np.zeros((shape.rows, proposer.hidden.shape[1]), proposer.hidden.dtype),
                            proposer.hidden.sharding)
    proposer.record(np.full((shape.rows,), engine.layout.max_seqs, np.int32), hidden)


_WHOLE = ("prompt_logprobs", "draft")


def _run_shape(engine: Engine, shape: WarmupShape) -> None:
    if shape.kind in _WHOLE:
        _run_whole(engine, shape)
        return
    steps = engine.config.num_scheduler_steps
    if shape.kind == "multi":
        rows = _rows(engine, shape.rows, 1, shape.pages, shape.logprobs, True, steps - 1, shape.constrained)
        engine._run_multi([req for req, _, _ in rows], steps)
        return
    rows = _rows(
        engine, shape.rows, shape.num_tokens, shape.pages, shape.logprobs, shape.kind != "prefill", 0,
        shape.constrained, shape.grammar,
    )
    if shape.kind == "prefill":  # one program, as Engine._run runs each group of a prefill
        engine._run_group(rows, shape.num_tokens, "prefill", MAX_LOGPROBS)
        return
    if shape.kind == "verify":  # as Engine._run_verify runs it, without appending the sampled tokens
        _, built, num_logprobs, key = engine._microbatches(rows, shape.num_tokens, verify=True)
        engine._timed(("verify", key), engine.runner.verify, built, num_logprobs)
        return
    engine._run(rows, shape.num_tokens, shape.kind)


def _engine_inputs(engine: Engine, shape: WarmupShape):
    """(runner method, micro-batches, num_logprobs, keyword arguments, the engine's shape key) of a step shape,
    as Engine._run_group / _run_multi / _run_verify build them (their shape keys are the ones `_timed` counts)."""
    steps = engine.config.num_scheduler_steps
    lookahead = steps - 1 if shape.kind == "multi" else 0
    rows = _rows(
        engine, shape.rows, shape.num_tokens, shape.pages, shape.logprobs, shape.kind != "prefill", lookahead,
        shape.constrained, shape.grammar,
    )
    runner = engine.runner
    if shape.kind == "prefill":
        _, built, num_logprobs, key = engine._microbatches(rows, shape.num_tokens, num_logprobs=MAX_LOGPROBS)
        media = engine._step_media(rows, built)  # an empty StepMedia on a model with towers, as Engine._run_group
        return (runner.step, built, num_logprobs, dict(phase="prefill", media=media),
                engine._step_key("prefill", key, media))
    if shape.kind == "decode":
        _, built, num_logprobs, key = engine._microbatches(rows, 1)
        return runner.step, built, num_logprobs, dict(phase="decode", media=None), ("step", "decode", key)
    if shape.kind == "multi":
        _, built, num_logprobs, key = engine._microbatches(rows, 1, lookahead=lookahead)
        return runner.multi, built, num_logprobs, dict(num_steps=steps), ("multi", steps, key)
    _, built, num_logprobs, key = engine._microbatches(rows, shape.num_tokens, verify=True)
    return runner.verify, built, num_logprobs, {}, ("verify", key)


def _lower_shape(engine: Engine, shape: WarmupShape) -> list:
    """The jax.stages.Lowered programs of one step shape (one per micro-batch of the single-program runner)."""
    method, built, num_logprobs, kwargs, _ = _engine_inputs(engine, shape)
    lowered: list = []
    with engine.runner.lowering(lowered):  # the counts go in only for constrained programs, as in Engine._timed
        method(engine.cache, engine.counts if shape.constrained else None, built, num_logprobs, **kwargs)
    return lowered


def _compile_in_parallel(engine: Engine, shapes: list[WarmupShape], threads: int, on_done) -> None:
    """Lower every step shape (Python tracing, one at a time), then compile them in `threads` threads (XLA's
    compile releases the GIL). The prompt-logprob forwards, which hold no engine state, run whole in the threads; the
    MTP drafter's programs run after them, one at a time.
    Marks each step shape as compiled in the engine (so its first real use is not counted as a compile)."""
    t0 = time.perf_counter()
    work = []
    for shape in shapes:
        if shape.kind == "draft":
            continue  # after the pool: the drafter's hidden-state buffer is donated from call to call
        if shape.kind in _WHOLE:
            work.append((shape, None, None))
        else:
            work.append((shape, _lower_shape(engine, shape), _engine_inputs(engine, shape)[4]))
    log.info("warm-up: %d programs lowered in %.1f s; compiling in %d threads", len(work),
             time.perf_counter() - t0, threads)

    def compile_one(item):
        shape, lowered, _ = item
        c0 = time.perf_counter()
        if lowered is None:
            _run_whole(engine, shape)
        else:
            for program in lowered:
                program.compile()
        return item, time.perf_counter() - c0

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="warmup") as pool:
        for (shape, _, engine_key), seconds in (f.result() for f in as_completed([pool.submit(compile_one, w)
                                                                                   for w in work])):
            if engine_key is not None and engine_key not in engine._shapes_seen:
                engine._shapes_seen.add(engine_key)
                engine.stats["compiles"] += 1
                engine.stats["compile_time_s"] += seconds
            on_done(shape, seconds)
    for shape in shapes:
        if shape.kind == "draft":
            c0 = time.perf_counter()
            _run_whole(engine, shape)
            on_done(shape, time.perf_counter() - c0)


def _warm_counts(engine: Engine) -> None:
    """Allocate the penalty counts and compile the program that resets a slot's counts (one shape: histories
    are padded to max_model_len), on the trash slot."""
    engine.allocate_counts()
    engine._reset_counts(_dummy_request(engine, 0, 1, False, False, constrained=True))


def default_threads() -> int:
    """Compile threads: one per CPU core (XLA:CPU compiles each program mostly on one core), at most 16."""
    return max(1, min(16, os.cpu_count() or 1))


def tower_programs(engine: Engine, max_audio_seconds: float = 30.0) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The tower programs a multimodal model's requests run, as (kind, a, b) inputs of `towers.soft_tokens`: the
    vision tower at the image processor's and the video processor's patch budgets (one image or frame per call,
    mm_inputs._vision_tokens), the audio tower at every padded clip length up to `max_audio_seconds`
    (mm_inputs._audio_tokens pads a clip's frames to a power of two >= 64). Empty for a text-only model. Budgets
    other than the checkpoint's processor config compile on first use."""
    from gemma4_jax import multimodal
    from gemma4_jax.processor import Processor

    model = engine.model
    cfg = model.config
    if not multimodal.has_towers(cfg):
        return []
    processor = Processor.from_dir(model.path, None, cfg)
    out = []
    if cfg.vision is not None:
        budgets = {processor.image_processor.patcher.max_patches, processor.video_processor.patcher.max_patches}
        for p in sorted(budgets):
            out.append(("vision", np.zeros((1, p, cfg.vision.patch_dim), np.float32), np.zeros((1, p, 2), np.int32)))
    if getattr(cfg, "audio", None) is not None:
        extractor = processor.audio_extractor
        features, _ = extractor([np.zeros(int(max_audio_seconds * extractor.sampling_rate), np.float32)])
        longest = bucket(features.shape[1], 64)
        t = 64
        while t <= longest:
            out.append(("audio", np.zeros((1, t, features.shape[2]), np.float32), np.ones((1, t), bool)))
            t *= 2
    return out


def _warm_towers(engine: Engine, max_audio_seconds: float) -> None:
    """Compile the tower programs (`tower_programs`) by lowering them with the inputs' shapes as the requests'
    calls pass them: the in-memory cache then serves those calls. A pipelined model's towers (on its first stage)
    are run once on the zero inputs instead."""
    from gemma4_jax import towers

    model = engine.model
    for kind, a, b in tower_programs(engine, max_audio_seconds):
        t0 = time.perf_counter()
        if model.pipeline is not None:
            towers.soft_tokens(model, kind, a, b)
        else:
            towers.compile_tower(model, kind, a, b)
        log.info("warm-up: %s tower for inputs %s in %.2f s", kind, tuple(a.shape), time.perf_counter() - t0)


def warm_up(engine: Engine, progress: bool = True, threads: int | None = None,
            max_audio_seconds: float = 30.0) -> WarmupReport:
    """Compile (or load from the persistent compilation cache) every shape of `plan(engine)`. Run it before the
    engine takes requests: it uses the engine's step inputs on dummy rows and must not interleave with real steps.
    progress: a tqdm bar on stderr, moving per compiled shape. threads: compile threads (default one per core);
    1, or a pipeline-parallel engine, runs each shape once through the engine's step path instead, one at a time.
    Logs the plan, the time of each shape and a summary at INFO. A multimodal model's towers are compiled too
    (`tower_programs`; audio clips up to max_audio_seconds)."""
    if engine.has_unfinished():
        raise RuntimeError("warm up the engine before adding requests")
    t_counts = time.perf_counter()
    _warm_counts(engine)
    log.info("warm-up: penalty counts allocated and their reset program compiled in %.2f s",
             time.perf_counter() - t_counts)
    shapes = plan(engine)
    threads = default_threads() if threads is None else threads
    parallel = threads > 1 and isinstance(engine.runner, Runner)
    families = {}
    for s in shapes:
        families[s.kind] = families.get(s.kind, 0) + 1
    log.info(
        "warm-up: %d shapes to compile (%s) for max_num_seqs %d, max_num_batched_tokens %d, max_model_len %d, %s; "
        "fewer with smaller limits, none with --enforce-eager (compile on first use instead)",
        len(shapes),
        ", ".join(f"{n} {k}" for k, n in families.items()),
        engine.config.max_num_seqs,
        engine.config.max_num_batched_tokens,
        engine.max_model_len,
        f"{threads} compile threads" if parallel else "one at a time",
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(shapes), desc="warm-up", unit="shape")
    done = 0

    def on_done(shape: WarmupShape, seconds: float) -> None:
        nonlocal done
        done += 1
        log.info("warm-up %d/%d: %s in %.2f s", done, len(shapes), shape.describe(), seconds)
        if bar is not None:
            bar.update(1)

    compiles_before = engine.stats["compiles"]
    t_start = time.perf_counter()
    try:
        with _engine_log_quiet():
            if parallel:
                _compile_in_parallel(engine, shapes, threads, on_done)
            else:
                for shape in shapes:
                    t0 = time.perf_counter()
                    _run_shape(engine, shape)
                    on_done(shape, time.perf_counter() - t0)
    finally:
        if bar is not None:
            bar.close()
    if engine.async_scheduling:  # the hand-off of each decode batch size's sampled tokens to the next step
        for rows in sorted({shape.key[0][0] for shape in shapes if shape.kind == "decode"}):
            engine.next_token_program(rows)
    _warm_towers(engine, max_audio_seconds)
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
