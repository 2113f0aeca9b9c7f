"""The OpenAI-compatible HTTP server: `gemma4-jax serve --model DIR`, then any OpenAI client.

One process: FastAPI on uvicorn's event loop, the engine in its own thread beside it (`AsyncEngine`). Routes:
`/health`, `/v1/models`, `/v1/completions`, `/v1/chat/completions` (both streamed as SSE on request), `/tokenize`,
`/detokenize`, `/metrics` (Prometheus).

Every request is checked completely before anything is sent (schema, model name, sampling values, prompt and
chat template, context length, admission), so errors always arrive as a status with the OpenAI envelope
`{"error": {"message", "type", "param", "code"}}` and never as a half-written stream. A fault after the first
byte of a stream is sent as an error event, followed, like every stream, by `data: [DONE]`.

A client that goes away (streaming or not, queued or running) aborts its requests; the engine thread frees their
KV pages before its next step. SIGTERM drains: `/health` turns 503 and new requests get a JSON 503 (the listener
stays open), in-flight requests get `grace_period_s` to finish; shortly before it ends the rest are ended on the
event loop (streams: an error event and [DONE]; others: a JSON 503), however long the engine's current step is;
then the server stops.

The CPU work of a request runs in worker threads, never on the event loop (`ServerState.run_prep`), so /health
and open streams keep their pace while large requests are prepared. Connections must deliver their request line
and headers within `header_timeout_s` and their body within `body_timeout_s`; idle keep-alive connections close
after `keep_alive_s`.

This module is the app factory (`create_app`) and its runner (`make_server`, `serve_cli`); the parts live by job:
`api_state.py` (ServerConfig, ServerState), `api_errors.py` (the envelope, the API-key / body-size guard),
`api_sse.py` (event streams), `api_requests.py` (request -> engine requests), `routes_completions.py`,
`routes_chat.py`, `routes_misc.py` (the routes), `protocol.py` (schemas), `tool_calls.py` (Gemma 4's tool calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from gemma4_jax.serving import routes_chat, routes_completions, routes_misc
from gemma4_jax.serving.api_errors import LOOPBACK_HOSTS, GuardMiddleware, add_exception_handlers, allowed_host_names
from gemma4_jax.serving.api_state import ServerConfig, ServerState
from gemma4_jax.serving.protocol import advertise_limits

__all__ = ["ServerConfig", "ServerState", "create_app", "make_server", "serve_cli"]

log = logging.getLogger(__name__)

# How often the server looks for new compiles to freeze the heap after (`_freeze_after_compiles`).
_REFREEZE_PERIOD_S = 10.0


def freeze_heap() -> None:
    """Move every object alive now (the model, JAX, the libraries: millions of them) out of the garbage collector's
    reach, as vLLM does after start-up: a full collection walks every tracked object while holding the GIL, and
    with the start-up heap in it took about a second, stalling the event loop and every stream (the soak test)."""
    gc.collect()
    gc.freeze()


async def _freeze_after_compiles(state: ServerState, period_s: float = _REFREEZE_PERIOD_S) -> None:
    """Freeze the heap again after the engine compiled new step shapes: each compile leaves tens of thousands of
    long-lived objects (traced programs, caches), and full collections walking them took 0.1-0.2 s every half
    minute in the soak. Compiles stop once the load's shapes are all seen, so this collects a few times early on
    and then never."""
    frozen_at = state.compiles
    while True:
        await asyncio.sleep(period_s)
        if state.compiles != frozen_at:
            frozen_at = state.compiles
            freeze_heap()


def create_app(llm=None, config: ServerConfig | None = None, load: Callable[[], Any] | None = None,
               on_load_error: Callable[[str], None] | None = None, warmup: bool = False) -> FastAPI:
    """The FastAPI app serving `llm` (a `gemma4_jax.LLM`), or the one `load()` returns (run in a thread at start-up,
    so /health answers 503 while the model loads).

    warmup: before the app reports ready, compile every step shape the engine can run (`LLM.warmup`,
    serving/warmup.py), in the loading thread; /health answers 503 "warming up" meanwhile, so no request waits on a
    compile. A failed warm-up is a failed load."""
    if (llm is None) == (load is None):
        raise ValueError("pass exactly one of llm and load")
    config = config or ServerConfig()
    state = ServerState(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = state.loop = asyncio.get_running_loop()
        if llm is not None and not warmup:
            freeze_heap()
            state.attach(llm, loop)
        else:

            def load_in_thread() -> None:
                try:
                    loaded = load() if llm is None else llm
                    if warmup:
                        state.warming_up = True
                        loaded.warmup(max_audio_seconds=config.media_limits.max_audio_seconds)
                except Exception as e:  # reported by /health and every route
                    log.exception("loading the model failed" if not state.warming_up else "the warm-up failed")
                    state.load_error = f"{type(e).__name__}: {e}"
                    if on_load_error is not None:  # `serve` exits non-zero instead of answering 503 forever
                        on_load_error(state.load_error)
                    return
                freeze_heap()
                loop.call_soon_threadsafe(_ready, loaded)

            def _ready(loaded) -> None:
                state.attach(loaded, loop)
                state.warming_up = False
                log.info("ready: serving %r", state.config.served_model_name)

            state.warming_up = warmup and llm is not None  # already loaded: /health says "warming up" at once
            threading.Thread(target=load_in_thread, name="gemma4-jax-load", daemon=True).start()
        refreeze = asyncio.create_task(_freeze_after_compiles(state))
        yield
        refreeze.cancel()
        state.draining = True
        if state.engine is not None:
            await asyncio.to_thread(state.engine.stop)
        state.close()
        # Hand the frozen objects back to the collector: an app stopped inside a longer-lived process (a notebook,
        # the test suite) would otherwise keep every cycle alive at its freezes forever, compiled programs included.
        gc.unfreeze()

    app = FastAPI(title="gemma4-jax", summary="OpenAI-compatible server for Gemma 4 in JAX", lifespan=lifespan)
    app.state.server = state
    app.add_middleware(GuardMiddleware, state=state)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"], allow_headers=["*"]
        )

    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """The schema with this server's limits in it (once loaded, the context length and the vocabulary), so that
        clients and fuzzers generating from it produce requests the server accepts."""
        schema = copy.deepcopy(base_openapi())
        engine = state.engine
        advertise_limits(
            schema["components"]["schemas"],
            model_name=config.served_model_name,
            max_n=config.max_n,
            max_prompts=config.max_prompts,
            max_stop=config.max_stop,
            max_stop_chars=config.max_stop_chars,
            max_model_len=engine.max_model_len if engine is not None else None,
            vocab_size=engine.vocab_size if engine is not None else None,
        )
        return schema

    app.openapi = openapi
    add_exception_handlers(app)
    for routes in (routes_misc, routes_completions, routes_chat):
        app.include_router(routes.router)
    return app


# ----------------------------------------------------------------------------------------------------------------------
# Running it
# ----------------------------------------------------------------------------------------------------------------------


def _timed_h11_protocol(header_timeout_s: float):
    """uvicorn's h11 protocol with a deadline for the request line and headers, counted from the connection (or the
    end of the previous response on a kept-alive one): uvicorn arms no timer there, so a client that opens a
    connection and sends nothing, or a header a byte at a time, would hold it forever. Past the deadline the
    connection is closed (HTTP has no response before a request has arrived)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            self._arm_header_timer()  # first: a pipelined request that super() starts makes self.cycle differ
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout_s, self._header_deadline, self.cycle)

        def _header_deadline(self, cycle) -> None:
            self._header_timer = None
            if self.cycle is cycle and not self.transport.is_closing():  # no new request since the timer was armed
                self.transport.close()

    return TimedH11Protocol


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    """A uvicorn server for `app` that drains on SIGTERM/SIGINT (see the module docstring), with the app's
    connection timeouts, and the app's Host allow-list derived from `host` unless the config names one."""
    import uvicorn

    state: ServerState = app.state.server
    config = state.config
    state.allowed_hosts = allowed_host_names(None if config.allowed_hosts is None else list(config.allowed_hosts), host)
    if config.api_key is None and host.strip("[]") not in LOOPBACK_HOSTS:
        log.warning("serving on %s without an API key: anyone who can reach it can use it (see --api-key)", host)

    class _DrainingServer(uvicorn.Server):
        drain_started: float | None = None
        aborted = False

        def handle_exit(self, sig, frame) -> None:
            if state.loop is not None:
                state.loop.call_soon_threadsafe(state.drain)
            else:
                state.draining = True
            super().handle_exit(sig, frame)  # should_exit; a second SIGINT forces the exit

        async def on_tick(self, counter: int) -> bool:
            should_exit = await super().on_tick(counter)
            if self.should_exit and not self.force_exit and not self._drained():
                return False  # keep the listener open: new requests get a JSON 503 rather than a refused connection
            return should_exit

        def _drained(self) -> bool:
            """Whether the drain is over: nothing in flight, or the grace period spent. Shortly before it ends the
            requests still in flight are ended (ServerState.abort_in_flight)."""
            now = time.monotonic()
            if self.drain_started is None:
                self.drain_started = now
                state.drain()
            if not self.server_state.tasks:
                return True
            grace = state.config.grace_period_s
            elapsed = now - self.drain_started
            if not self.aborted and elapsed >= grace - min(1.0, grace / 4):
                self.aborted = True
                state.abort_in_flight()
            return elapsed >= grace

    uv_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=_timed_h11_protocol(config.header_timeout_s),
        timeout_keep_alive=config.keep_alive_s,
        # After the drain: what is still running (e.g. a request still being prepared) gets this long, then is
        # cancelled, and GuardMiddleware still answers it (a JSON 503, or an error event and [DONE]).
        timeout_graceful_shutdown=1,
        h11_max_incomplete_event_size=config.max_header_bytes,
    )
    return _DrainingServer(uv_config)


def serve_cli(args, build_llm: Callable[[Any], Any]) -> int:
    """`gemma4-jax serve`: load the model in the background (503 until ready) and serve until SIGTERM."""
    name = args.served_model_name
    if name is None:
        model = args.model or getattr(args, "model_path", None)
        name = os.path.basename(os.path.normpath(model)) if model else "gemma4-jax-demo"
    # An empty key (e.g. an unset variable in --api-key "$KEY") is refused by ServerConfig, not taken as "no key".
    api_key = args.api_key if args.api_key is not None else os.environ.get("GEMMA4_JAX_API_KEY")
    allowed_hosts = None
    if args.allowed_hosts:
        allowed_hosts = [h.strip() for value in args.allowed_hosts for h in value.split(",") if h.strip()]
    config = ServerConfig(
        served_model_name=name,
        api_key=api_key,
        max_queue=args.max_queue,
        max_queued_tokens=args.max_queued_tokens,
        max_body_bytes=args.max_body_bytes,
        max_n=args.max_n,
        cors_origins=args.cors_origin or (),
        grace_period_s=args.grace_period,
        allowed_hosts=allowed_hosts,
        split_special_tokens=not args.allow_special_tokens_in_chat,
        max_tokenize_tokens=args.max_tokenize_tokens,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        keep_alive_s=args.timeout_keep_alive,
        max_header_bytes=args.h11_max_incomplete_event_size,
        reasoning_parser=args.reasoning_parser,
    )
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO))
    servers: list = []
    # Warm-up (every step shape compiled before /health turns 200) unless --enforce-eager / --no-warmup.
    warmup = not (getattr(args, "enforce_eager", False) or getattr(args, "no_warmup", False))
    app = create_app(load=lambda: build_llm(args), config=config, warmup=warmup,
                     on_load_error=lambda _: setattr(servers[0], "should_exit", True))
    servers.append(make_server(app, args.host, args.port, args.log_level))
    servers[0].run()
    error = app.state.server.load_error
    if error is not None:
        print(f"error: the model failed to load: {error}", file=sys.stderr)
        return 1
    return 0
