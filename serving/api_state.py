"""What the HTTP server's routes share: its configuration (`ServerConfig`) and state (`ServerState`).

One `ServerState` per app, kept on `app.state.server`; routes receive it through the `State` dependency
(`state: State` in a route's signature). It holds the loaded `LLM` and the `AsyncEngine` running it, the metrics,
the drain flag and the worker threads that prepare requests (`run_prep`: tokenizing, chat templates, media
decoding, detokenizing; never on the event loop), and answers the questions every route asks first: is the server
ready, is this our model.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request

from gemma4_jax.serving import mm_inputs
from gemma4_jax.serving.async_engine import AsyncEngine
from gemma4_jax.serving.metrics import ServerMetrics
from gemma4_jax.serving.protocol import APIError
from gemma4_jax.serving.reasoning import REASONING_PARSERS

T = TypeVar("T")


@dataclasses.dataclass
class ServerConfig:
    """What the server admits and how. The defaults are the safe ones: loopback, no CORS, bounded everything.

    allowed_hosts: Host header names the server answers (`*` any, `*.example.com` a domain); None derives them from
    the bound address in `make_server` (loopback names, plus the address unless it is a wildcard like 0.0.0.0, which
    allows any). split_special_tokens: special-token strings in chat messages are plain text (see
    `Tokenizer.encode_chat`); False makes them control tokens, as transformers does.
    """

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
    allowed_hosts: Sequence[str] | None = None
    split_special_tokens: bool = True
    max_tokenize_tokens: int = 131072  # the most tokens /tokenize answers with
    # Worker threads preparing requests: they bound the CPU time and memory (decoded images) in use at once.
    prep_threads: int = dataclasses.field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)))
    header_timeout_s: float = 10.0  # for a request line and headers, from connection or the previous response
    body_timeout_s: float = 30.0  # for the whole body, from the end of the headers
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_header_bytes: int = 16 * 1024  # request line + headers; h11 answers 400 beyond
    reasoning_parser: str | None = None  # "gemma4": thought channel -> reasoning_content (serving/reasoning.py)

    def __post_init__(self):
        if self.api_key is not None:
            if not self.api_key:
                raise ValueError(
                    'the API key is empty (an unset variable in --api-key "$KEY"?): it would turn authentication '
                    "off. Give a non-empty key, or leave --api-key and GEMMA4_JAX_API_KEY out to serve without one"
                )
            if self.api_key != self.api_key.strip() or any(c.isspace() for c in self.api_key):
                raise ValueError("the API key contains whitespace, which no 'Authorization: Bearer' header can carry")
        if self.reasoning_parser not in (None, *REASONING_PARSERS):
            raise ValueError(f"reasoning_parser {self.reasoning_parser!r} is not available; available: "
                             f"{list(REASONING_PARSERS)}")
        for name in ("max_queue", "max_body_bytes", "max_n", "max_tokenize_tokens", "prep_threads"):
            if getattr(self, name) < (0 if name == "max_queue" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class ServerState:
    """Everything a route needs; `llm` is None until the model is loaded (then /health turns 200)."""

    def __init__(self, config: ServerConfig, llm=None):
        self.config = config
        self.llm = llm
        self.engine: AsyncEngine | None = None
        self.metrics = ServerMetrics()
        self.draining = False
        self.load_error: str | None = None
        self.warming_up = False  # loaded, compiling its step shapes (serving/warmup.py): still 503
        self.loop: asyncio.AbstractEventLoop | None = None
        # Host names the guard accepts; None: any. Set by make_server from the config and the bound address.
        self.allowed_hosts: list[str] | None = None if config.allowed_hosts is None else list(config.allowed_hosts)
        self._prep: concurrent.futures.ThreadPoolExecutor | None = None

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
        """Stop admitting: /health and new requests answer 503 from now on. The runner (`make_server`) keeps
        serving until the in-flight requests are done or the grace period is nearly over, then calls
        `abort_in_flight`."""
        self.draining = True

    def abort_in_flight(self) -> None:
        """End every in-flight request now, on the event loop, without waiting for the engine thread (whose step
        may be long, e.g. a first-time compile): streams get an error event and [DONE], others a 503."""
        if self.engine is not None:
            self.engine.abort_all()

    async def run_prep(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(*args, **kwargs)` in a prep worker thread (CPU work of a request: tokenizing, chat templates,
        media decoding, detokenizing), so the event loop keeps answering; the pool's size bounds how much runs at
        once, and the rest waits its turn."""
        if self._prep is None:
            self._prep = concurrent.futures.ThreadPoolExecutor(self.config.prep_threads, "gemma4-jax-prep")
        return await asyncio.get_running_loop().run_in_executor(self._prep, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        """Forget the prep threads (a request still being prepared finishes in the background)."""
        if self._prep is not None:
            self._prep.shutdown(wait=False, cancel_futures=True)
            self._prep = None

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token can stand for (the longest vocabulary entry, special tokens included): a
        text of C characters is at least ceil(C / this) tokens, which refuses hopeless prompts before tokenizing.
        Only a BPE model that never fuses unknown characters into one token (Gemma's: byte fallback) gives such a
        bound; for others this is unbounded."""
        from tokenizers.models import BPE

        backend = self.tokenizer.backend if self.tokenizer is not None else None
        model = getattr(backend, "model", None)
        if not isinstance(model, BPE) or (model.unk_token and model.fuse_unk and not model.byte_fallback):
            return sys.maxsize
        return max(map(len, backend.get_vocab(with_added_tokens=True)), default=1) or 1

    def min_tokens(self, text: str) -> int:
        """A lower bound on the tokens of `text` (see `max_token_chars`)."""
        return math.ceil(len(text) / self.max_token_chars)

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.alive and not self.draining

    def require_ready(self) -> AsyncEngine:
        if self.draining:
            raise APIError(503, "the server is shutting down", "service_unavailable", code="draining")
        if self.engine is None:
            message = (f"the model failed to load: {self.load_error}" if self.load_error else
                       "the model is warming up (compiling its step shapes)" if self.warming_up else
                       "the model is loading")
            raise APIError(503, message, "service_unavailable", code="not_ready")
        if not self.engine.alive:
            raise APIError(503, "the engine is not running", "service_unavailable", code="engine_stopped")
        return self.engine

    @property
    def compiles(self) -> int:
        """Step shapes the engine has compiled so far."""
        return self.llm.engine.stats.get("compiles", 0) if self.llm is not None else 0

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
