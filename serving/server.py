"""The OpenAI-compatible HTTP server: `gemma4-jax serve --model DIR`, then any OpenAI client.

One process: FastAPI on uvicorn's event loop, the engine in its own thread beside it (`AsyncEngine`). Routes:
`/health`, `/v1/models`, `/v1/completions`, `/v1/chat/completions` (both streamed as SSE on request), `/tokenize`,
`/detokenize`, `/metrics` (Prometheus).

Every request is checked completely before anything is sent (schema, model name, sampling values, prompt and
chat template, context length, admission), so errors always arrive as a status with the OpenAI envelope
`{"error": {"message", "type", "param", "code"}}` and never as a half-written stream. A fault after the first
byte of a stream is sent as an error event, followed, like every stream, by `data: [DONE]`.

A client that goes away (streaming or not, queued or running) aborts its requests; the engine thread frees their
KV pages before its next step. SIGTERM drains: `/health` turns 503, new requests get 503, in-flight requests
get `grace_period_s` to finish, then the rest are aborted.

This module is the app factory (`create_app`) and its runner (`make_server`, `serve_cli`); the parts live by job:
`api_state.py` (ServerConfig, ServerState), `api_errors.py` (the envelope, the API-key / body-size guard),
`api_sse.py` (event streams), `api_requests.py` (request -> engine requests), `routes_completions.py`,
`routes_chat.py`, `routes_misc.py` (the routes), `protocol.py` (schemas), `tool_calls.py` (Gemma 4's tool calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from gemma4_jax.serving import routes_chat, routes_completions, routes_misc
from gemma4_jax.serving.api_errors import GuardMiddleware, add_exception_handlers
from gemma4_jax.serving.api_state import ServerConfig, ServerState
from gemma4_jax.serving.protocol import advertise_limits

__all__ = ["ServerConfig", "ServerState", "create_app", "make_server", "serve_cli"]

log = logging.getLogger(__name__)


def create_app(llm=None, config: ServerConfig | None = None, load: Callable[[], Any] | None = None) -> FastAPI:
    """The FastAPI app serving `llm` (a `gemma4_jax.LLM`), or the one `load()` returns (run in a thread at start-up,
    so /health answers 503 while the model loads)."""
    if (llm is None) == (load is None):
        raise ValueError("pass exactly one of llm and load")
    config = config or ServerConfig()
    state = ServerState(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = state.loop = asyncio.get_running_loop()
        if llm is not None:
            state.attach(llm, loop)
        else:

            def load_in_thread() -> None:
                try:
                    loaded = load()
                except Exception as e:  # reported by /health and every route
                    log.exception("loading the model failed")
                    state.load_error = f"{type(e).__name__}: {e}"
                    return
                loop.call_soon_threadsafe(state.attach, loaded, loop)

            threading.Thread(target=load_in_thread, name="gemma4-jax-load", daemon=True).start()
        yield
        state.draining = True
        if state.engine is not None:
            await asyncio.to_thread(state.engine.stop)

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


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    """A uvicorn server for `app` whose SIGTERM/SIGINT first marks the app draining (503s), then shuts down with
    the app's grace period for in-flight requests."""
    import uvicorn

    state: ServerState = app.state.server

    class _DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if state.loop is not None:
                state.loop.call_soon_threadsafe(state.drain)
            else:
                state.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=max(1, int(state.config.grace_period_s)),
    )
    return _DrainingServer(config)


def serve_cli(args, build_llm: Callable[[Any], Any]) -> int:
    """`gemma4-jax serve`: load the model in the background (503 until ready) and serve until SIGTERM."""
    name = args.served_model_name
    if name is None:
        name = os.path.basename(os.path.normpath(args.model)) if args.model else "gemma4-jax-demo"
    config = ServerConfig(
        served_model_name=name,
        api_key=args.api_key or os.environ.get("GEMMA4_JAX_API_KEY"),
        max_queue=args.max_queue,
        max_queued_tokens=args.max_queued_tokens,
        max_body_bytes=args.max_body_bytes,
        max_n=args.max_n,
        cors_origins=args.cors_origin or (),
        grace_period_s=args.grace_period,
    )
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO))
    app = create_app(load=lambda: build_llm(args), config=config)
    make_server(app, args.host, args.port, args.log_level).run()
    return 0
