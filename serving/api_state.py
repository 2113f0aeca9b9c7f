"""What the HTTP server's routes share: its configuration (`ServerConfig`) and state (`ServerState`).

One `ServerState` per app, kept on `app.state.server`; routes receive it through the `State` dependency
(`state: State` in a route's signature). It holds the loaded `LLM` and the `AsyncEngine` running it, the metrics,
and the drain flag, and answers the questions every route asks first: is the server ready, is this our model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from typing import Annotated

from fastapi import Depends, Request

from gemma4_jax.serving import mm_inputs
from gemma4_jax.serving.async_engine import AsyncEngine
from gemma4_jax.serving.metrics import ServerMetrics
from gemma4_jax.serving.protocol import APIError


@dataclasses.dataclass
class ServerConfig:
    """What the server admits and how. The defaults are the safe ones: loopback, no CORS, bounded everything."""

    served_model_name: str = "gemma4-jax"
    api_key: str | None = None
    max_queue: int = 256  # unfinished requests beyond the engine's max_num_seqs before 429
    max_queued_tokens: int | None = None  # cap on prompt + max_tokens summed over unfinished requests
    max_body_bytes: int = 4 * 2**20
    max_n: int = 16
    max_prompts: int = 64  # prompts in one /v1/completions batch
    max_stop: int = 16
    max_stop_chars: int = 256
    cors_origins: Sequence[str] = ()
    retry_after_s: int = 1
    grace_period_s: float = 30.0
    # Images / audio in chat content parts (data URLs and base64 WAV only; nothing is fetched): caps per request.
    media_limits: mm_inputs.ServingLimits = mm_inputs.ServingLimits()


class ServerState:
    """Everything a route needs; `llm` is None until the model is loaded (then /health turns 200)."""

    def __init__(self, config: ServerConfig, llm=None):
        self.config = config
        self.llm = llm
        self.engine: AsyncEngine | None = None
        self.metrics = ServerMetrics()
        self.draining = False
        self.load_error: str | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def attach(self, llm, loop: asyncio.AbstractEventLoop) -> None:
        self.llm = llm
        engine = llm.engine
        self.engine = AsyncEngine(
            engine,
            self.metrics,
            max_active=engine.config.max_num_seqs + self.config.max_queue,
            max_active_tokens=self.config.max_queued_tokens,
        )
        self.engine.start(loop)

    def drain(self) -> None:
        """Stop admitting (503) and, shortly before the grace period ends, abort what is still running so that
        every client gets a proper ending (an error event and [DONE]) rather than a cut connection."""
        if self.draining:
            return
        self.draining = True
        if self.loop is not None and self.engine is not None:
            grace = self.config.grace_period_s
            self.loop.call_later(max(0.0, grace - min(1.0, grace / 4)), self.engine.abort_all)

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.alive and not self.draining

    def require_ready(self) -> AsyncEngine:
        if self.draining:
            raise APIError(503, "the server is shutting down", "service_unavailable", code="draining")
        if self.engine is None:
            message = f"the model failed to load: {self.load_error}" if self.load_error else "the model is loading"
            raise APIError(503, message, "service_unavailable", code="not_ready")
        if not self.engine.alive:
            raise APIError(503, "the engine is not running", "service_unavailable", code="engine_stopped")
        return self.engine

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    @property
    def media_processor(self) -> mm_inputs.MediaProcessor:
        """The loaded LLM's processor of a chat's images / audio (built on first use)."""
        return self.llm.media_processor

    @functools.cached_property
    def _token_texts(self) -> Callable[[int], str]:
        tokenizer = self.tokenizer

        @functools.lru_cache(maxsize=65536)
        def text(token_id: int) -> str:
            if tokenizer is None:
                return f"token_id:{token_id}"
            return tokenizer.decode([token_id], skip_special_tokens=False)

        return text

    def token_text(self, token_id: int) -> str:
        return self._token_texts(token_id)

    @functools.cached_property
    def _special_tokens(self) -> re.Pattern | None:
        tokenizer = self.tokenizer
        texts = {tokenizer.id_to_token(i) for i in tokenizer.all_special_ids} if tokenizer is not None else set()
        texts = sorted((t for t in texts if t), key=len, reverse=True)
        return re.compile("|".join(map(re.escape, texts))) if texts else None

    def strip_special(self, text: str) -> str:
        """Text without the tokenizer's special-token strings (tool-call output is decoded with them kept)."""
        pattern = self._special_tokens
        return pattern.sub("", text) if pattern is not None and text else text

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.served_model_name:
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves {self.config.served_model_name!r}",
                param="model",
                code="model_not_found",
            )


def server_state(request: Request) -> ServerState:
    """The app's `ServerState` (a FastAPI dependency)."""
    return request.app.state.server


# A route parameter `state: State` receives the app's ServerState.
State = Annotated[ServerState, Depends(server_state)]
