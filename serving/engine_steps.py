"""How the engine runs what its scheduler picked: rows (request, new token ids, start position) -> runner calls.

`EngineSteps` is the part of `Engine` (serving/engine.py) that turns a step's scheduled rows into programs:
- prefill rows split into groups whose padded rows x tokens stay within the token budget (one-token chunks run as
  decode-shaped steps), decode rows into the runner's micro-batches (pipeline stages), every batch padded to the
  buckets of `step_builder.build_rows` (so all shapes are known to the warm-up, serving/warmup.py);
- constrained steps (a sampled row with penalties or a grammar) as their own program family (counts, token mask,
  top logprobs), the penalty counts kept per sequence slot;
- multi-step decode (`num_scheduler_steps`) and the speculative round: drafts from the proposer, cut by the row's
  limits, grammar and free pages, then one verify step whose accepted tokens go through the engine's `_append`;
- compile events (a shape key seen for the first time) counted with their times in `stats`.

It reads the engine's state (config, layout, runner, cache, counts, scheduler, proposer, stats) and is not used
on its own.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax.serving import media_chunks
from gemma4_jax.serving.kv_cache import bucket
from gemma4_jax.serving.requests import Request, Status
from gemma4_jax.serving.runner import StepMedia, reset_slot_counts
from gemma4_jax.serving.sampling import MAX_LOGPROBS, SamplingParams
from gemma4_jax.serving.speculative import AssistantProposer
from gemma4_jax.serving.step_builder import build_rows, join_results, num_logprobs_for, prefill_groups
from gemma4_jax.serving.structured import grammar_prefix

log = logging.getLogger("gemma4_jax.serving.engine")


@dataclasses.dataclass
class InFlight:
    """A plain decode step dispatched and not yet collected (async scheduling, `EngineSteps._launch`).

    rows: the decode rows in batch order; results: the runner's SampleResults (one micro-batch), still on the
    device; groups: the micro-batch's row indices; t0: dispatch time."""

    rows: list[Request]
    results: list
    groups: list[list[int]]
    shape_key: tuple
    t0: float


class EngineSteps:
    """The step-running half of `Engine` (a base class: it uses the engine's attributes, see the module doc)."""

    # Constrained steps. A step whose sampled rows include one with penalties or a grammar ("constrained") runs
    # one of two program families instead of the plain ones:
    # - the grammar family (a grammar row and no row asking for penalties or logprobs): a token mask (all tokens
    #   allowed for rows without a grammar), no counts, no top logprobs. The usual structured-output step, kept
    #   lean: at batch 64 x V 32768 the counts and top-20 logprobs cost ~8 ms of a ~120 ms step on this CPU, and
    #   top-20 grows with the vocabulary (Gemma 4's 262,144 ids);
    # - the full family (penalties, or a grammar beside logprobs): the penalty counts, a token mask and all top
    #   logprobs in one program.
    # So a configuration has four decode families (plain, top logprobs, grammar, full; warmup.plan warms them all),
    # not every combination. Only a penalty request's counts are kept (reset when it starts, advanced by its full
    # steps); other slots' counts are unused.

    @staticmethod
    def _uses_penalties(params: SamplingParams) -> bool:
        return bool(params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty)

    def _constrained(self, req: Request) -> bool:
        return self._uses_penalties(req.params) or req.matcher is not None

    def _prefill_chunk(self, req: Request, num_tokens: int) -> int:
        """A constrained request's chunk that would end its prompt stops one token short: its first token is then
        sampled by a one-token (decode-shaped) constrained step, so no prefill program needs counts or a mask.
        Costs such a request one step of latency. Media prompts keep their chunks (an image stays in one)."""
        ends_prompt = req.num_computed + num_tokens == req.num_tokens
        if num_tokens > 1 and ends_prompt and req.media is None and self._constrained(req):
            return num_tokens - 1
        return num_tokens

    def allocate_counts(self) -> None:
        """The penalty counts, {"output": (S+1, V) int32, "prompt": (S+1, V) bool} by sequence slot (idempotent;
        the warm-up allocates them so that the first penalty request compiles nothing)."""
        if self.counts is None:
            s, v = self.layout.max_seqs + 1, self.text_config.vocab_size
            where = self.runner.counts_sharding  # with the sampler (the last stage's devices under pp)
            self.counts = {"output": jnp.zeros((s, v), jnp.int32, device=where),
                           "prompt": jnp.zeros((s, v), bool, device=where)}

    def _init_counts(self, req: Request) -> None:
        if self._uses_penalties(req.params):
            self.allocate_counts()
            self._reset_counts(req)

    def _reset_counts(self, req: Request) -> None:
        """Rebuild a slot's counts from the request's history, both padded to max_model_len (one program)."""
        width = bucket(self.max_model_len, 16)
        p = np.zeros(width, np.int32)
        p[: len(req.prompt_ids)] = req.prompt_ids
        o = np.zeros(width, np.int32)
        o[: len(req.output_ids)] = req.output_ids
        self.counts = reset_slot_counts(self.counts, req.slot, p, len(req.prompt_ids), o, len(req.output_ids))

    def _timed(self, shape_key: tuple, fn, microbatches: list, num_logprobs: int, **kwargs):
        """Run a runner call over micro-batches; a shape seen for the first time counts as a compile event with
        its time. The counts go in when the shape key says so (constrained steps). Returns the per-micro-batch
        SampleResults on the host."""
        t0 = time.perf_counter()
        results = self._dispatch(shape_key, fn, microbatches, num_logprobs, **kwargs)
        return self._fetch(shape_key, results, t0)

    def _dispatch(self, shape_key: tuple, fn, microbatches: list, num_logprobs: int, **kwargs) -> list:
        """Start a runner call (the device runs it asynchronously); the per-micro-batch results stay on the device.
        The cache and counts are the call's outputs from here on."""
        counts_on = self._key_counts_on(shape_key)
        results, self.cache, counts = fn(self.cache, self.counts if counts_on else None, microbatches, num_logprobs,
                                         **kwargs)
        if counts_on:
            self.counts = counts
        if isinstance(self.proposer, AssistantProposer):
            # The drafter's next input, by slot, without leaving the device.
            for (batch, *_), hidden in zip(microbatches, self.runner.hidden, strict=False):
                self.proposer.record(batch.slots, hidden)
        return results

    def _fetch(self, shape_key: tuple, results: list, t0: float) -> list:
        """Wait for a dispatched call's results and bring them to the host; a shape key seen for the first time
        counts as a compile event, timed from t0 (its dispatch)."""
        results = jax.device_get(results)
        if shape_key not in self._shapes_seen:
            self._shapes_seen.add(shape_key)
            self.stats["compiles"] += 1
            took = time.perf_counter() - t0
            self.stats["compile_time_s"] += took
            log.info("compiled step shape %s in %.1f s (%d shapes so far)", shape_key, took, self.stats["compiles"])
        if self.runner.num_stages > 1:
            self.stats["pipeline_bubble"] = self.runner.bubble
        return results

    @staticmethod
    def _key_counts_on(shape_key: tuple) -> bool:
        """Whether a step's shape key (Engine._run_group / _run_multi / _run_verify) is a constrained program's:
        the last element of each form is the micro-batches' step_builder keys, (B, T, P, logprobs, counts, mask)."""
        return bool(shape_key[-1][0][4]) if shape_key[0] != "media" else bool(shape_key[1][0][4])

    def _microbatches(self, rows: list[tuple[Request, list[int], int]], num_tokens: int, lookahead: int = 0,
                      verify: bool = False, num_logprobs: int | None = None, ahead: int = 0):
        """Split rows into the runner's decode micro-batches (a prefill runs as one) and build each.
        num_logprobs: None = what the rows ask for (step_builder.num_logprobs_for). A constrained step (a sampled
        row with penalties or a grammar) has a token mask (per position in a verify step; none in a multi-step
        decode, whose rows have no grammar), and in the full family the counts and all top logprobs (see above).
        Returns (row groups, [(batch, sampling, steps, keep)], num_logprobs, shape key)."""
        m = self.runner.microbatches if num_tokens == 1 or verify else 1
        groups = [list(g) for g in np.array_split(np.arange(len(rows)), max(1, min(m, len(rows))))]
        sampled = [req for req, ids, start in rows if verify or start + len(ids) == req.num_tokens + ahead]
        penalties = any(self._uses_penalties(req.params) for req in sampled)
        grammar = any(req.matcher is not None for req in sampled)
        if num_logprobs is None:
            num_logprobs = num_logprobs_for([req.params for req, _, _ in rows])
        full = penalties or (grammar and num_logprobs > 0)  # else the grammar family: no counts, no logprobs
        if full:
            self.allocate_counts()
            num_logprobs = MAX_LOGPROBS
        free_mask = (self.text_config.vocab_size + 31) // 32 if (full or grammar) and not lookahead else 0
        # The grammar family's masks are filled while the forward runs (Runner.step splits the step); the full
        # family, which rows without a grammar also enter (penalties), stays one program with the mask filled first.
        defer = grammar and not full and getattr(self.runner, "splits_sampling", False)
        built, keys = [], []
        for group in groups:
            batch, sampling, steps, keep, _, key = build_rows(
                [rows[i] for i in group], num_tokens, self.layout, self.config.max_num_seqs, lookahead=lookahead,
                num_logprobs=num_logprobs, verify=verify, counts_on=full, grammars=self._grammars,
                free_mask_words=free_mask, defer_mask=defer, ahead=ahead)
            built.append((batch, sampling, steps, keep))
            keys.append(key)
        return groups, built, num_logprobs, tuple(keys)

    def _run(self, rows: list[tuple[Request, list[int], int]], num_tokens: int, phase: str):
        """One step over rows (request, new token ids, start position). phase: "prefill" | "decode" (which
        attention backends run). Returns the SampleResult on the host.

        A prefill runs as one or more programs whose padded rows x tokens stay within the token budget
        (step_builder.prefill_groups), all with top logprobs; one-token chunks run as decode-shaped steps. So the
        prefill shapes are few, and all of them are in the warm-up's plan (serving/warmup.py)."""
        if phase == "decode":
            return self._run_group(rows, num_tokens, phase)
        # A one-token chunk holding a media placeholder counts as two tokens: it runs in the 16-token prefill shape,
        # which carries media (media_chunks), not as a decode-shaped step.
        lens = [2 if len(row[1]) == 1 and media_chunks.holds_placeholders([row]) else len(row[1]) for row in rows]
        groups = prefill_groups(lens, self.prefill_padded_tokens)
        # One top-logprob count for all of the step's groups (their results are joined).
        num_logprobs = MAX_LOGPROBS if max(lens) > 1 else None
        results = [self._run_group([rows[i] for i in g], max(lens[i] for i in g), phase, num_logprobs)
                   for g in groups]
        return join_results(results, groups, axis=0)

    @property
    def prefill_padded_tokens(self) -> int:
        """The most rows x tokens a prefill program pads to: the token budget rounded up to a power of two."""
        return bucket(self.config.max_num_batched_tokens, 16)

    def _run_group(self, rows: list[tuple[Request, list[int], int]], num_tokens: int, phase: str,
                   num_logprobs: int | None = None):
        groups, built, num_logprobs, key = self._microbatches(rows, num_tokens, num_logprobs=num_logprobs)
        media = self._step_media(rows, built)
        if media is None and num_tokens == 1:
            phase = "decode"  # one token per row: the decode program (same shapes, decode attention backends)
        results = self._timed(self._step_key(phase, key, media), self.runner.step, built, num_logprobs, phase=phase,
                              media=media)
        return join_results(results, groups, axis=0)

    def _step_media(self, rows: list[tuple[Request, list[int], int]], built: list) -> StepMedia | None:
        """A prefill step's media (T > 1, one micro-batch): on a model with towers always a StepMedia, the soft
        tokens of the chunks' placeholders spliced into the embeddings (media_chunks.chunk_media); else None."""
        shape = built[0][0].tokens.shape
        if len(built) != 1 or shape[1] == 1:
            return None
        return media_chunks.chunk_media(self.model, rows, shape)

    @staticmethod
    def _step_key(phase: str, key: tuple, media: StepMedia | None) -> tuple:
        """The shape key `_timed` counts compiles by (the warm-up marks the ones it compiled)."""
        return ("step", phase, key) if media is None else ("media", key, media.shape_key)

    def _run_multi(self, decode: list[Request], num_steps: int):
        rows = [(req, [req.last_id], req.num_computed) for req in decode]
        groups, built, num_logprobs, key = self._microbatches(rows, 1, lookahead=num_steps - 1)
        results = self._timed(("multi", num_steps, key), self.runner.multi, built, num_logprobs,
                              num_steps=num_steps)
        return join_results(results, groups, axis=1)

    def _propose(self, decode: list[Request]) -> list[list[int]] | None:
        """Drafts for each decode row (possibly none), or None when no row has any (plain decoding runs then).

        A row drafts at most k tokens and at most one fewer than it may still generate (max_tokens, max_model_len),
        so the verify step never writes past the request's last position. A row with a grammar keeps the drafts
        its grammar accepts (structured.grammar_prefix); the verify step masks each position by the grammar's
        state after the drafts before it (structured.Grammars.fill_drafts). Drafts get pages when the pool has
        them; otherwise a row drafts only what its pages hold: a draft never preempts another request."""
        k = self.speculative.num_speculative_tokens
        limits = []
        for req in decode:
            left = min(req.params.max_tokens - len(req.output_ids), self.max_model_len - req.num_tokens)
            limits.append(max(0, min(k, left - 1)))
        if not any(limits):
            return None
        vocab, page = self.text_config.vocab_size, self.layout.page_size
        if isinstance(self.proposer, AssistantProposer):
            proposals = self.proposer.propose_from(self.cache, decode, limits)
        else:
            proposals = self.proposer.propose(decode, limits)
        drafts = []
        for req, limit, proposed in zip(decode, limits, proposals, strict=True):
            draft = []
            for token in list(proposed)[:limit]:
                if not 0 <= int(token) < vocab:
                    break
                draft.append(int(token))
            if req.matcher is not None:  # a constrained row's drafts stop at the first its grammar rejects
                draft = grammar_prefix(req.matcher, draft)
            if draft and not self.scheduler.ensure_pages(req, req.num_computed + 1 + len(draft)):
                draft = draft[: len(req.pages) * page - req.num_computed - 1]
            drafts.append(draft)
        return drafts if any(drafts) else None

    def _run_verify(self, decode: list[Request], drafts: list[list[int]]) -> None:
        """One verify step over the decode rows; each emits its accepted drafts plus one token, in order, through
        the same `_append` as plain decoding (stop tokens and strings, max_tokens, logprobs, routed experts)."""
        rows = [(req, [req.last_id, *draft], req.num_computed) for req, draft in zip(decode, drafts, strict=True)]
        num_tokens = self.speculative.num_speculative_tokens + 1
        groups, built, num_logprobs, key = self._microbatches(rows, num_tokens, verify=True)
        results = self._timed(("verify", key), self.runner.verify, built, num_logprobs)
        result = join_results(results, groups, axis=0)
        positions = [jax.tree.map(lambda x, j=j: x[:, j], result.sample) for j in range(num_tokens)]
        self.stats["verify_steps"] += 1
        for i, (req, draft) in enumerate(zip(decode, drafts, strict=True)):
            accepted = int(result.num_accepted[i])
            if draft:
                req.spec.record(len(draft), accepted)
                self.spec_stats.record(len(draft), accepted)
            # The fed token and the accepted drafts are now in the cache; the rejected ones are dead (their
            # positions are past the context, in pages the request owns, and are rewritten later).
            self.scheduler.computed(req, accepted + 1)
            for j in range(accepted + 1):
                self._append(req, positions[j], i)
        self.stats.update(spec_num_drafts=self.spec_stats.num_drafts,
                          spec_num_draft_tokens=self.spec_stats.num_draft_tokens,
                          spec_num_accepted_tokens=self.spec_stats.num_accepted_tokens)

    def _multi_step_size(self, decode: list[Request]) -> int:
        """Decode steps to run in one call: >1 only when nothing else waits and every row has pages for them."""
        k = self.config.num_scheduler_steps
        # A waiting request that could start now (a free slot) gets its prefill at the next step; one that waits
        # for a slot cannot start before a running row finishes, and finishing rows take single steps (below).
        if k <= 1 or (self.waiting and self.free_slots) or any(not r.in_decode for r in self.running):
            return 1
        if isinstance(self.proposer, AssistantProposer):
            return 1  # the drafter needs each step's hidden states, which the multi-step scan does not return
        if any(r.matcher is not None for r in decode):
            return 1  # each token of a constrained row needs its grammar's mask from the host
        if any(r.params.max_tokens - len(r.output_ids) < k for r in decode):
            return 1  # finishing rows: single steps waste nothing
        if not self.blocks.fits([(r, r.num_computed + k) for r in decode]):
            return 1  # check first: a failed attempt would leave some rows with pages they do not use yet
        for req in decode:
            self.scheduler.ensure_pages(req, req.num_computed + k)
        return k

    # Async scheduling (EngineConfig.async_scheduling; SGLang's overlap scheduler, vLLM's --async-scheduling).
    # A plain decode step is dispatched and left in flight: `step()` returns, and the next `step()` first dispatches
    # the step after it, whose input tokens are the in-flight step's sampled tokens still on the device, and only
    # then collects the in-flight results (tokens, detokenizing, stop checks). So the host's bookkeeping and the
    # next step's inputs are prepared while the device computes, and the device does not wait for the host between
    # steps. A row that ends in the collected step (a stop token or string) has computed one more token for
    # nothing; its result is dropped. Whenever the next step is not the same rows' plain decode (a request could
    # start, a row reaches its limits or has a grammar, pages run short), the in-flight step is collected first
    # and the engine schedules as usual: tokens and finish reasons are those of synchronous scheduling.

    def _async_decode(self, decode: list[Request]) -> bool:
        """Whether this decode batch may be left in flight: async scheduling on and no row with a grammar (its
        mask needs the host's state after every token)."""
        return self.async_scheduling and bool(decode) and all(r.matcher is None for r in decode)

    def _launch(self, decode: list[Request], after: InFlight | None = None) -> InFlight:
        """Dispatch one plain decode step of `decode` (whose pages cover its token) and leave it in flight. With
        `after` (in flight for the same rows, not collected yet) the step is the one after it: its input tokens
        are `after`'s sampled tokens on the device, and the RNG counters and kept rows count them."""
        ahead = 0 if after is None else 1
        rows = [(req, [0 if ahead else req.last_id], req.num_computed + ahead) for req in decode]
        groups, built, num_logprobs, key = self._microbatches(rows, 1, ahead=ahead)
        if after is not None:
            (batch, *rest), = built  # one micro-batch: async scheduling runs with the single-program Runner
            tokens = after.results[0].tokens
            built = [(batch.replace(tokens=self.next_token_program(tokens.shape[0])(tokens)), *rest)]
        shape_key = self._step_key("decode", key, None)
        t0 = time.perf_counter()
        results = self._dispatch(shape_key, self.runner.step, built, num_logprobs, phase="decode", media=None)
        return InFlight(list(decode), results, groups, shape_key, t0)

    def _chain(self, done: InFlight) -> InFlight | None:
        """The step after `done` for the same rows, dispatched before `done` is collected; None when the next step
        must be scheduled after collecting."""
        rows = done.rows
        if (self.waiting and self.free_slots) or len(self.running) != len(rows) or not self._async_decode(rows):
            return None
        for req in rows:
            if req.status is not Status.RUNNING or not req.in_decode:
                return None
            # After `done` a row has one more token; this step adds another, within max_tokens and the model length.
            if req.params.max_tokens - len(req.output_ids) < 2 or req.num_tokens + 2 > self.max_model_len:
                return None
        if not self.blocks.fits([(r, r.num_computed + 2) for r in rows]):
            return None  # check first: a failed attempt would leave some rows with pages they do not use yet
        for req in rows:
            self.scheduler.ensure_pages(req, req.num_computed + 2)
        self.stats["chained_steps"] += 1
        return self._launch(rows, after=done)

    def next_token_program(self, rows: int) -> jax.stages.Compiled:
        """The compiled `next_tokens` for a decode batch of `rows` (padded) rows, its input replicated as every
        step's sampled tokens are; compiled once (the warm-up does it for every decode batch size)."""
        program = self.next_token_programs.get(rows)
        if program is None:
            spec = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=self.runner.replicated)
            program = self.next_token_programs[rows] = next_tokens.lower(spec).compile()
        return program

    def _collect(self, done: InFlight) -> list[Request]:
        """Wait for an in-flight step and append each still-running row's token (a row aborted meanwhile gets
        none). Returns the rows that got one."""
        result = join_results(self._fetch(done.shape_key, done.results, done.t0), done.groups, axis=0)
        touched = []
        for i, req in enumerate(done.rows):
            if req.status is Status.RUNNING:
                self.scheduler.computed(req, 1)
                self._append(req, result, i)
                touched.append(req)
        return touched


@jax.jit
def next_tokens(tokens: jax.Array) -> jax.Array:
    """(B,) sampled tokens -> (B, 1) int32 input tokens of the next decode step, on the device (a program per
    decode batch size, held by the engine: `EngineSteps.next_token_program`)."""
    return tokens[:, None].astype(jnp.int32)
