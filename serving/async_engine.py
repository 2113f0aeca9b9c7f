"""The engine beside an asyncio event loop: one thread owns the `Engine`, the loop talks to it through commands.

`Engine` is not thread-safe, so exactly one thread (started here) calls `add_request`, `step` and `release`. The
event loop sends commands (`AddRequests`, `Abort`, `AbortAll`, `Stop`, `Score`) through a thread-safe queue,
drained between steps (so an abort frees its KV pages before the next step runs), and receives outputs through
`loop.call_soon_threadsafe`, one batch per step. Routes hand requests over as `EngineRequest`s.

A `RequestGroup` is what one HTTP request waits on: its n (or prompts x n) engine requests, added atomically
(all or none). Outputs are cumulative, so a slow reader only ever sees the latest one per request; nothing
queues up behind a client that reads slowly.

Admission is bounded here, on the loop thread: at most `max_active` unfinished requests and (optionally)
`max_active_tokens` prompt + max_tokens tokens; beyond that `add` raises `QueueFull` (HTTP 429: retry later). A
request that alone needs more engine requests than `max_active`, or more tokens than `max_active_tokens`, can never
be admitted, not even by an idle server, and raises `NeverAdmitted` (HTTP 400: retrying cannot help).

`abort_all` (the end of a drain) ends every in-flight request on the loop thread at once, with `Aborted`, without
waiting for the engine thread, whose current step may be long (a first-time compile); the engine thread frees the
requests' KV pages when that step is over.

Prompt logprobs (`echo` with `logprobs` on /v1/completions) are one full-sequence forward of the prompt, run on the
engine thread between steps (`prompt_logprobs`): the paged step computes logits only for each row's last token.
An exception from `Engine.step` fails every in-flight request with `EngineError` (HTTP 500, or an error event in
a stream), aborts them to free their pages, and the thread keeps serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax.serving.engine import Engine, RequestOutput, Status, TokenLogprob
from gemma4_jax.serving.metrics import ServerMetrics
from gemma4_jax.serving.mm_inputs import MediaInputs
from gemma4_jax.serving.sampling import MAX_LOGPROBS, SamplingParams

log = logging.getLogger(__name__)

_IDLE_POLL_S = 0.5  # how long the idle engine thread blocks on the command queue before looking at `_stopping`
# The longest the engine thread waits for the loop to take a step's outputs while its next step is in flight.
DELIVERY_WAIT_S = 0.002


class EngineError(RuntimeError):
    """The engine failed while running a request (a server fault, not the client's)."""


class EngineStopped(RuntimeError):
    """The engine thread is not running (still loading, shutting down, or dead)."""


class QueueFull(RuntimeError):
    """Admission refused for now: too many unfinished requests or tokens."""


class NeverAdmitted(ValueError):
    """Admission refused for good: the request alone is over a bound. `bound` is "requests" (engine requests, i.e.
    prompts x n) or "tokens" (prompts + max_tokens, times n)."""

    def __init__(self, message: str, bound: str):
        super().__init__(message)
        self.bound = bound


class Aborted(RuntimeError):
    """The request was ended by `abort_all` (the server is shutting down)."""


class RequestGroup:
    """The outputs of the engine requests behind one HTTP request, delivered on the event loop."""

    def __init__(self, request_ids: Sequence[str], prompt_lens: Sequence[int]):
        self.request_ids = list(request_ids)
        self.prompt_lens = list(prompt_lens)
        self.final: dict[int, RequestOutput] = {}
        self._latest: dict[int, RequestOutput] = {}
        self._error: BaseException | None = None
        self._event = asyncio.Event()

    @property
    def finished(self) -> bool:
        return len(self.final) == len(self.request_ids)

    def _put(self, index: int, out: RequestOutput) -> None:
        self._latest[index] = out
        self._event.set()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._event.set()

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Yield (index, latest cumulative output) until every request finished; raise `EngineError` on a fault."""
        while not self.finished:
            await self._event.wait()
            self._event.clear()
            updates, self._latest = self._latest, {}
            for index, out in sorted(updates.items()):
                if out.finished:
                    self.final[index] = out
                yield index, out
            if self._error is not None:
                raise self._error

    async def result(self) -> list[RequestOutput]:
        async for _ in self:
            pass
        return [self.final[i] for i in range(len(self.request_ids))]


@dataclasses.dataclass(frozen=True)
class EngineRequest:
    """One engine request as a route hands it over: its id, prompt ids and sampling params; with `media`, the
    soft tokens of the prompt's images / audio (the n copies of one chat share them)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    media: MediaInputs | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens it may hold at most (prompt + max_tokens): what admission reserves for it."""
        return len(self.prompt_ids) + self.params.max_tokens


# Commands, sent from the event loop to the engine thread (which dispatches them by type).


@dataclasses.dataclass(frozen=True)
class AddRequests:
    """Add `requests` as one group, all or none; `done` resolves (on the loop) with None or the refusal."""

    requests: list[EngineRequest]
    group: RequestGroup
    arrival: float  # time.monotonic() when the HTTP request arrived
    done: asyncio.Future


@dataclasses.dataclass(frozen=True)
class Abort:
    """Abort and forget these requests (their clients are gone, or they were refused)."""

    request_ids: list[str]


@dataclasses.dataclass(frozen=True)
class AbortAll:
    """Abort every in-flight request, delivering each as finished with finish_reason "abort" (end of a drain)."""


@dataclasses.dataclass(frozen=True)
class Stop:
    """Abort every in-flight request as `AbortAll` does, then end the engine thread."""


@dataclasses.dataclass(frozen=True)
class Score:
    """Prompt logprobs of `prompt_ids` with the top `k`; `done` resolves with them or with an `EngineError`."""

    prompt_ids: list[int]
    k: int
    done: asyncio.Future


@dataclasses.dataclass(frozen=True)
class ResetPrefixCache:
    """Forget every cached prefix block (Engine.reset_prefix_cache); `done` resolves with None."""

    done: asyncio.Future


Command = AddRequests | Abort | AbortAll | Stop | Score | ResetPrefixCache


@dataclasses.dataclass
class _Tracked:
    """Engine-thread bookkeeping of one request (for delivery and latency metrics)."""

    group: RequestGroup
    index: int
    arrival: float  # time.monotonic() when the HTTP request arrived
    scheduled: bool = False
    num_tokens: int = 0
    last_token_time: float = 0.0


class AsyncEngine:
    """Runs `engine` in a dedicated thread; `add` / `abort` are called from the event loop."""

    def __init__(
        self,
        engine: Engine,
        metrics: ServerMetrics | None = None,
        max_active: int = 1024,
        max_active_tokens: int | None = None,
    ):
        self.engine = engine
        self.metrics = metrics or ServerMetrics()
        self.max_active = max_active
        self.max_active_tokens = max_active_tokens
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self._active: dict[str, int] = {}  # loop thread only: unfinished request id -> its token reservation
        self._groups: dict[str, RequestGroup] = {}  # loop thread only: unfinished request id -> its group
        self._waiting: set[asyncio.Future] = set()  # loop thread only: answers the engine thread still owes
        self._active_tokens = 0
        self.metrics.kv_pages_total.set(engine.num_free_pages + engine.num_used_pages)

    # -- lifecycle (event loop thread) ------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._main, name="gemma4-jax-engine", daemon=True)
        self._thread.start()

    @property
    def max_model_len(self) -> int:
        """Prompt + completion tokens one request may hold."""
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.text_config.vocab_size

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def stop(self, timeout: float = 30.0) -> None:
        """Abort whatever is still in flight and join the engine thread (blocking: call it off the loop)."""
        if self._thread is None:
            return
        self._commands.put(Stop())
        self._thread.join(timeout)

    def abort_all(self) -> None:
        """End every in-flight request now (the end of a drain; event loop thread): their groups and pending adds
        and scores fail with `Aborted` at once, whatever the engine thread is doing; it frees their pages when its
        current step is over."""
        error = Aborted("the request was aborted: the server is shutting down")
        rids = list(self._active)
        groups = {id(g): g for g in self._groups.values()}
        for rid in rids:
            self._release(rid)
        for group in groups.values():
            group._fail(error)
        for future in list(self._waiting):
            _resolve(future, error)
        if rids:
            self._commands.put(Abort(rids))  # after any AddRequests of these: FIFO
        self._commands.put(AbortAll())

    @property
    def num_active(self) -> int:
        return len(self._active)

    # -- requests (event loop thread) -------------------------------------------------------------------------------

    async def add(self, requests: Sequence[EngineRequest], arrival: float) -> RequestGroup:
        """Add `requests` atomically; returns their group.

        Raises QueueFull (over the admission bounds), EngineStopped, or ValueError (the engine refused one; none
        of them is added then).
        """
        if not self.alive or self._loop is None:
            raise EngineStopped("the engine is not running")
        tokens = sum(r.num_tokens for r in requests)
        if self.max_active_tokens is not None and tokens > self.max_active_tokens:
            raise NeverAdmitted(
                f"the request needs {tokens} tokens (prompts + max_tokens, times n), over this server's token "
                f"budget of {self.max_active_tokens}; lower max_tokens or n, or shorten the prompt",
                "tokens",
            )
        if len(requests) > self.max_active:
            raise NeverAdmitted(
                f"the request needs {len(requests)} sequences (prompts x n), over this server's limit of "
                f"{self.max_active} unfinished requests; lower n or send fewer prompts at once",
                "requests",
            )
        if self.num_active + len(requests) > self.max_active:
            raise QueueFull(f"the server has {self.num_active} unfinished requests (limit {self.max_active})")
        if self.max_active_tokens is not None and self._active_tokens + tokens > self.max_active_tokens:
            raise QueueFull(
                f"the server has {self._active_tokens} tokens reserved by unfinished requests; "
                f"{tokens} more would pass the limit of {self.max_active_tokens}"
            )
        group = RequestGroup([r.request_id for r in requests], [len(r.prompt_ids) for r in requests])
        for r in requests:
            self._active_tokens += r.num_tokens
            self._active[r.request_id] = r.num_tokens
            self._groups[r.request_id] = group
        done = self._loop.create_future()
        self._commands.put(AddRequests(list(requests), group, arrival, done))
        try:
            await self._answer(done)
        except BaseException:
            # Refused, or the client went away while waiting: the abort (queued after the add) undoes the add.
            self.abort(group)
            raise
        return group

    async def _answer(self, future: asyncio.Future):
        """Wait for the engine thread's answer; `abort_all` may answer it first."""
        self._waiting.add(future)
        try:
            return await future
        finally:
            self._waiting.discard(future)

    async def prompt_logprobs(self, ids: Sequence[int], k: int) -> list[TokenLogprob]:
        """Logprobs of each prompt token given the ones before it, with the top `k`; the first token has none
        (`logprob` and `top` None). Raises EngineStopped, or EngineError when the forward fails."""
        if not self.alive or self._loop is None:
            raise EngineStopped("the engine is not running")
        done = self._loop.create_future()
        self._commands.put(Score(list(ids), k, done))
        return await self._answer(done)

    async def reset_prefix_cache(self) -> None:
        """Forget every cached prefix block, between two engine steps."""
        if not self.alive or self._loop is None:
            raise EngineStopped("the engine is not running")
        done = self._loop.create_future()
        self._commands.put(ResetPrefixCache(done))
        await self._answer(done)

    def abort(self, group: RequestGroup) -> None:
        """Abort the group's unfinished requests (no-op for finished ones); their pages are freed before the next
        engine step. Safe to call more than once, and from `finally` blocks of cancelled tasks."""
        rids = [rid for rid in group.request_ids if rid in self._active]
        for rid in rids:
            self._release(rid)
        if rids:
            self._commands.put(Abort(rids))

    def _release(self, rid: str) -> None:
        self._active_tokens -= self._active.pop(rid, 0)
        self._groups.pop(rid, None)

    def _deliver(self, batch: list[tuple[RequestGroup, int, RequestOutput]],
                 delivered: threading.Event | None = None) -> None:
        for group, index, out in batch:
            if out.finished:
                self._release(out.request_id)
            group._put(index, out)
        if delivered is not None:
            delivered.set()

    def _fail(self, groups: list[RequestGroup], error: BaseException) -> None:
        for group in groups:
            for rid in group.request_ids:
                self._release(rid)
            group._fail(error)

    # -- the engine thread ------------------------------------------------------------------------------------------

    def _call_loop(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _main(self) -> None:
        try:
            while not self._stopping:
                self._drain(block=not self.engine.has_unfinished())
                if not self._stopping and self.engine.has_unfinished():
                    self._step()
                self._update_gauges()
        except BaseException as e:  # a bug in this loop: fail everyone rather than hang them
            log.exception("engine thread died")
            self._fail_all(EngineError(f"the engine thread died: {e!r}"))
            raise
        finally:
            self._stopping = True

    def _drain(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=_IDLE_POLL_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _handle(self, command: Command) -> None:
        match command:
            case AddRequests():
                self._add(command)
            case Score():
                self._score_prompt(command)
            case ResetPrefixCache():
                self.engine.reset_prefix_cache()
                self._call_loop(_resolve, command.done, None)
            case Abort():
                for rid in command.request_ids:
                    if self._tracked.pop(rid, None) is not None:
                        self.metrics.request_success.labels("abort").inc()
                    self.engine.release(rid)
            case AbortAll() | Stop():
                self._stopping = self._stopping or isinstance(command, Stop)
                self._abort_tracked()

    def _add(self, command: AddRequests) -> None:
        added = []
        try:
            for r in command.requests:
                self.engine.add_request(r.prompt_ids, r.params, request_id=r.request_id, media=r.media)
                added.append(r.request_id)
        except Exception as e:
            for rid in added:
                self.engine.release(rid)
            self._call_loop(_resolve, command.done, e)
            return
        for index, r in enumerate(command.requests):
            self._tracked[r.request_id] = _Tracked(command.group, index, command.arrival)
            self.metrics.prompt_tokens.inc(len(r.prompt_ids))
        self._call_loop(_resolve, command.done, None)

    def _score_prompt(self, command: Score) -> None:
        try:
            result = score_prompt(self.engine.model, command.prompt_ids, command.k)
        except Exception as e:
            log.exception("prompt logprobs failed")
            self.metrics.engine_errors.inc()
            self._call_loop(_resolve, command.done, EngineError(f"computing the prompt logprobs failed: {e!r}"))
        else:
            self._call_loop(_resolve_value, command.done, result)

    def _abort_tracked(self) -> None:
        """Abort every tracked request and deliver each as finished (finish_reason "abort")."""
        batch = []
        for rid, tracked in list(self._tracked.items()):
            self.metrics.request_success.labels("abort").inc()
            out = self.engine.release(rid)
            if out is not None:
                batch.append((tracked.group, tracked.index, out))
        self._tracked.clear()
        if batch:
            self._call_loop(self._deliver, batch)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            log.exception("engine step failed; failing the in-flight requests and carrying on")
            self.metrics.engine_errors.inc()
            self._fail_all(EngineError(f"the engine failed while running this request: {type(e).__name__}: {e}"))
            return
        now = time.monotonic()
        batch = []
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue
            self._observe(tracked, out, now)
            batch.append((tracked.group, tracked.index, out))
            if out.finished:
                del self._tracked[out.request_id]
                self.engine.release(out.request_id)
        for rid, tracked in self._tracked.items():
            if not tracked.scheduled:
                req = self.engine.get(rid)
                if req is not None and req.status is not Status.WAITING:
                    tracked.scheduled = True
                    self.metrics.queue_time.observe(now - tracked.arrival)
        if batch:
            if not self.engine.has_step_in_flight:
                self._call_loop(self._deliver, batch)
                return
            # Async scheduling: the device computes the next step meanwhile, so wait (briefly, GIL released) for the
            # loop to take this step's outputs. Otherwise, when steps are as short as their host work, this thread
            # holds the GIL from step to step and streams reach their readers in one piece at the end.
            delivered = threading.Event()
            self._call_loop(self._deliver, batch, delivered)
            delivered.wait(DELIVERY_WAIT_S)

    def _observe(self, tracked: _Tracked, out: RequestOutput, now: float) -> None:
        m = self.metrics
        new = len(out.token_ids) - tracked.num_tokens
        if new > 0:
            if not tracked.scheduled:
                tracked.scheduled = True
                m.queue_time.observe(now - tracked.arrival)
            if tracked.num_tokens == 0:
                m.ttft.observe(now - tracked.arrival)
            else:  # several tokens in one output (multi-step decode) share the gap
                gap = (now - tracked.last_token_time) / new
                for _ in range(new):
                    m.itl.observe(gap)
            m.generation_tokens.inc(new)
            tracked.num_tokens = len(out.token_ids)
            tracked.last_token_time = now
        if out.finished:
            m.e2e.observe(now - tracked.arrival)
            m.request_success.labels(out.finish_reason or "unknown").inc()

    def _fail_all(self, error: BaseException) -> None:
        groups = {}
        for rid, tracked in list(self._tracked.items()):
            groups[id(tracked.group)] = tracked.group
            try:
                self.engine.release(rid)
            except Exception:
                log.exception("abort of %s failed", rid)
        self._tracked.clear()
        if groups:
            self._call_loop(self._fail, list(groups.values()), error)

    def _update_gauges(self) -> None:
        m, e = self.metrics, self.engine
        m.requests_running.set(len(e.running))
        m.requests_waiting.set(len(e.waiting))
        used, total = e.num_used_pages, e.num_used_pages + e.num_free_pages
        m.kv_pages_used.set(used)
        m.kv_usage.set(used / total if total else 0.0)
        m.compiles.set(e.stats.get("compiles", 0))
        m.update_spec_decode(e.spec_stats)
        m.update_prefix_cache(e.stats["prefix_cache_queries"], e.stats["prefix_cache_hits"])


def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _resolve_value(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


@functools.partial(jax.jit, static_argnames=("k",))
def _score(logits: jax.Array, ids: jax.Array, *, k: int):
    """logits (T, V) float32, ids (T,) -> for t < T: the logprob of ids[t + 1] under position t's logits (T,), and
    the top k logprobs (T, k) with their ids."""
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, jnp.roll(ids, -1)[:, None], axis=-1)[:, 0]
    top_values, top_ids = jax.lax.top_k(logprobs, k)
    return chosen, top_values, top_ids


def score_prompt(model, ids: Sequence[int], k: int) -> list[TokenLogprob]:
    """Prompt logprobs (vLLM's semantics: the first token has None) with the top `k` per token, from one
    `Model.logits` forward over the prompt (its (T, V) float32 logits are materialised once).

    The prompt is padded to a power of two (at least 16; padding positions are -1, attended by nothing) so that
    prompt lengths share compiled shapes.
    """
    length = len(ids)
    padded = max(16, 1 << (length - 1).bit_length())
    tokens = np.zeros((1, padded), np.int32)
    tokens[0, :length] = ids
    positions = np.full((1, padded), -1, np.int32)
    positions[0, :length] = np.arange(length)
    logits = model.logits(tokens, positions)[0]
    # Always the most alternatives anyone may ask for, sliced here: one compiled shape per prompt bucket.
    chosen, top_values, top_ids = jax.device_get(_score(logits, jnp.asarray(tokens[0]), k=MAX_LOGPROBS))
    out = [TokenLogprob(int(ids[0]), None, None)]
    for t in range(1, length):
        top = [(int(i), float(v)) for i, v in zip(top_ids[t - 1, :k], top_values[t - 1, :k])]
        out.append(TokenLogprob(int(ids[t]), float(chosen[t - 1]), top))
    return out
