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
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gemma4_jax.serving.async_engine import AsyncEngine, EngineError, EngineStopped, QueueFull, RequestGroup
from gemma4_jax.serving.engine import RequestOutput, TokenLogprob
from gemma4_jax.serving.metrics import ServerMetrics
from gemma4_jax.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    bad_request,
    clamp_logprob,
    error_envelope,
    usage,
    validation_message,
)
from gemma4_jax.serving.sampling import MAX_LOGPROBS, SamplingParams

log = logging.getLogger(__name__)

_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


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

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.served_model_name:
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves {self.config.served_model_name!r}",
                param="model",
                code="model_not_found",
            )


# ----------------------------------------------------------------------------------------------------------------------
# Authentication and the body cap (pure ASGI, before any route reads the body)
# ----------------------------------------------------------------------------------------------------------------------


def _error_response(
    status: int, message: str, type: str, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_envelope(message, type, None, code), status_code=status, headers=headers)


class _GuardMiddleware:
    """401 without the right API key (every route but /health), 413 for a body over the cap."""

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app = app
        self.state = state

    def _authorized(self, scope: Scope) -> bool:
        expected = self.state.config.api_key
        if expected is None or scope["path"] == "/health" or scope["method"] == "OPTIONS":
            return True
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = token.strip()
        # Constant time whatever the key's prefix; compare_digest is also exact (no normalisation).
        return hmac.compare_digest(given, expected.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._authorized(scope):
            response = _error_response(
                401,
                "invalid or missing API key (send 'Authorization: Bearer <key>')",
                "invalid_request_error",
                "invalid_api_key",
                {"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        cap = self.state.config.max_body_bytes
        too_large = _error_response(
            413, f"the request body is over the limit of {cap} bytes", "invalid_request_error", "request_too_large"
        )
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            await too_large(scope, receive, send)
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        # Read the body here, counting, so a chunked upload without Content-Length is capped as well.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                await too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False
        # Every body here is JSON: read it as such whatever Content-Type says (curl -d sends a form type).
        headers = [(k, v) for k, v in scope.get("headers", ()) if k != b"content-type"]
        scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: blocks until the client disconnects

        await self.app(scope, replay, send)


# ----------------------------------------------------------------------------------------------------------------------
# Turning requests into engine requests (everything that can fail, before anything is sent)
# ----------------------------------------------------------------------------------------------------------------------


def _sampling_params(
    body: CompletionRequest | ChatCompletionRequest,
    config: ServerConfig,
    logprobs: int | None,
    max_tokens: int | None,
    vocab_size: int,
) -> SamplingParams:
    """Validate the sampling fields (max_tokens provisionally) -> SamplingParams with n=1."""
    if not isinstance(body.n, int) or body.n < 1:
        raise bad_request(f"n must be an int >= 1, got {body.n!r}", "n")
    if body.n > config.max_n:
        raise bad_request(f"n={body.n} is over this server's limit of {config.max_n}", "n")
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"max_tokens must be an int >= 1, got {max_tokens}", "max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > config.max_stop:
        raise bad_request(f"{len(stop)} stop sequences are over this server's limit of {config.max_stop}", "stop")
    if any(len(s) > config.max_stop_chars for s in stop):
        raise bad_request(f"a stop sequence is longer than {config.max_stop_chars} characters", "stop")
    if body.logit_bias:
        raise bad_request("logit_bias is not supported by this server", "logit_bias")
    fields = dict(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        # top_k >= vocab keeps every token, i.e. is off; said so here because the sampler packs it into int32.
        top_k=0 if body.top_k is None or (isinstance(body.top_k, int) and body.top_k >= vocab_size) else body.top_k,
        min_p=0.0 if body.min_p is None else body.min_p,
        seed=body.seed,
        max_tokens=max_tokens or 1,
        stop=stop or None,
        stop_token_ids=body.stop_token_ids,
        ignore_eos=body.ignore_eos,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logprobs=logprobs,
        skip_special_tokens=body.skip_special_tokens,
    )
    try:
        return SamplingParams(**fields)
    except ValueError as e:
        field = str(e).split(" ", 1)[0]
        raise bad_request(str(e), field if field in _SAMPLING_FIELDS else None) from None


def _engine_requests(
    prefix: str,
    prompts: Sequence[list[int]],
    params: SamplingParams,
    n: int,
    max_tokens: int | None,
    max_model_len: int,
    prompt_field: str,
):
    """One engine request per (prompt, copy), with the context check that names both counts."""
    requests = []
    for p, ids in enumerate(prompts):
        if not ids:
            raise bad_request("the prompt is empty", prompt_field)
        wanted = max_tokens if max_tokens is not None else max_model_len - len(ids)
        if wanted < 1 or len(ids) + wanted > max_model_len:
            raise bad_request(
                f"this model's maximum context length is {max_model_len} tokens, but the request asks for "
                f"{len(ids) + max(wanted, 0)} tokens ({len(ids)} in the prompt, {max(wanted, 0)} for the "
                f"completion); shorten the prompt or lower max_tokens",
                prompt_field,
                "context_length_exceeded",
            )
        for i in range(n):
            # Copies of one prompt need different seeds, or they would sample the same tokens (as LLM.generate).
            copy = dataclasses.replace(params, max_tokens=wanted, seed=None if params.seed is None else params.seed + i)
            requests.append((f"{prefix}-{p}-{i}", list(ids), copy))
    return requests


async def _submit(state: ServerState, engine: AsyncEngine, requests, arrival: float) -> RequestGroup:
    try:
        return await engine.add(requests, arrival)
    except QueueFull as e:
        state.metrics.requests_rejected.labels("queue_full").inc()
        raise APIError(
            429,
            f"the server is busy: {e}; retry later",
            "rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(state.config.retry_after_s)},
        ) from None
    except EngineStopped as e:
        raise APIError(503, str(e), "service_unavailable", code="engine_stopped") from None
    except ValueError as e:
        raise bad_request(str(e)) from None


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _result_or_disconnect(raw: Request, group: RequestGroup) -> list[RequestOutput] | None:
    """The group's final outputs, or None when the client went away first (the caller aborts the group)."""
    result = asyncio.ensure_future(group.result())
    gone = asyncio.ensure_future(_until_disconnect(raw.receive))
    try:
        done, _ = await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        return result.result() if result in done else None
    finally:
        result.cancel()
        gone.cancel()


def _check_finished(out: RequestOutput) -> None:
    if out.finish_reason == "abort":
        raise APIError(
            503, "the request was aborted: the server is shutting down", "service_unavailable", code="aborted"
        )


def _fault(e: EngineError) -> APIError:
    return APIError(500, str(e), "server_error", code="engine_error")


class _EventStream(StreamingResponse):
    """An SSE response that runs `on_close` however it ends (done, client gone, cancelled before it started)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _sse_stream(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Chunks as SSE events; a fault becomes an error event; always ends with [DONE]."""
    try:
        async for chunk in chunks:
            yield _sse(chunk)
    except EngineError as e:
        yield _sse(error_envelope(str(e), "server_error", None, "engine_error"))
    except APIError as e:
        yield _sse(e.envelope())
    except Exception as e:  # a bug here, after the 200 went out: still end the stream properly
        log.exception("error while streaming")
        yield _sse(error_envelope(f"internal server error: {type(e).__name__}", "server_error", None, "internal_error"))
    yield "data: [DONE]\n\n"


def _completion_logprobs(state: ServerState, lps: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
    tokens, offsets = [], []
    for lp in lps:
        text = state.token_text(lp.token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [clamp_logprob(lp.logprob) for lp in lps],
        "top_logprobs": [{state.token_text(t): clamp_logprob(v) for t, v in lp.top} for lp in lps],
        "text_offset": offsets,
    }


def _chat_logprobs(state: ServerState, lps: Sequence[TokenLogprob]) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = state.token_text(token_id)
        return {"token": text, "logprob": clamp_logprob(logprob), "bytes": list(text.encode("utf-8"))}

    return {
        "content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps]
    }


# ----------------------------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------------------------


async def _collect(raw: Request, group: RequestGroup, engine: AsyncEngine):
    """A non-streaming request's outputs, or None when the client went away; the group is always released."""
    try:
        return await _result_or_disconnect(raw, group)
    except EngineError as e:
        raise _fault(e) from None
    finally:
        engine.abort(group)


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
    app.add_middleware(_GuardMiddleware, state=state)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"], allow_headers=["*"]
        )

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.envelope(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(e.errors()))
        return JSONResponse(error_envelope(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(
            error_envelope(str(e.detail), "invalid_request_error", None, code),
            status_code=e.status_code,
            headers=getattr(e, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error in %s", request.url.path)
        return JSONResponse(
            error_envelope(f"internal server error: {type(e).__name__}", "server_error", None, "internal_error"),
            status_code=500,
        )

    @app.get("/health")
    async def health() -> Response:
        if state.ready:
            return Response(status_code=200)
        reason = "draining" if state.draining else "the model failed to load" if state.load_error else "loading"
        return JSONResponse(
            error_envelope(f"not ready: {reason}", "service_unavailable", None, "not_ready"), status_code=503
        )

    @app.get("/v1/models")
    async def models() -> dict:
        engine = state.require_ready()
        return {
            "object": "list",
            "data": [
                {
                    "id": config.served_model_name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "gemma4-jax",
                    "root": config.served_model_name,
                    "max_model_len": engine.engine.max_model_len,
                }
            ],
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        engine = state.require_ready()
        state.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of 'prompt' and 'messages'")
        if state.tokenizer is None:
            raise bad_request("this model has no tokenizer")
        try:
            if body.messages is not None:
                ids = state.tokenizer.encode_chat(body.messages, add_generation_prompt=body.add_generation_prompt)
            else:
                ids = state.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        except ValueError as e:
            raise bad_request(str(e), "messages" if body.messages is not None else "prompt") from None
        return {"count": len(ids), "max_model_len": engine.engine.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        engine = state.require_ready()
        state.check_model(body.model)
        vocab = engine.engine.text_config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", "tokens")
        if state.tokenizer is None:
            raise bad_request("this model has no tokenizer")
        return {"prompt": state.tokenizer.decode(body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        arrival = time.monotonic()
        engine = state.require_ready()
        state.check_model(body.model)
        if body.suffix:
            raise bad_request("suffix is not supported by this server", "suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise bad_request("best_of other than n is not supported by this server", "best_of")
        if body.echo and body.logprobs is not None:
            raise bad_request("echo with logprobs (prompt logprobs) is not supported by this server", "echo")
        if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
            raise bad_request(f"logprobs must be an int in [0, {MAX_LOGPROBS}], got {body.logprobs}", "logprobs")
        params = _sampling_params(body, config, body.logprobs, body.max_tokens, engine.engine.text_config.vocab_size)
        prompts, texts = _completion_prompts(state, body.prompt)
        if len(prompts) > config.max_prompts:
            raise bad_request(f"{len(prompts)} prompts are over this server's limit of {config.max_prompts}", "prompt")
        request_id = f"cmpl-{uuid.uuid4().hex}"
        requests = _engine_requests(
            request_id, prompts, params, body.n, body.max_tokens, engine.engine.max_model_len, "prompt"
        )
        group = await _submit(state, engine, requests, arrival)
        meta = dict(id=request_id, created=int(time.time()), model=config.served_model_name)
        prompt_tokens = sum(len(ids) for ids in prompts)
        echoes = [texts[i // body.n] if body.echo else "" for i in range(len(requests))]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = _completion_chunks(
                state, group, meta, echoes, body.logprobs is not None, include_usage, prompt_tokens
            )
            return _EventStream(_sse_stream(chunks), lambda: engine.abort(group))
        outs = await _collect(raw, group, engine)
        if outs is None:
            return Response(status_code=499)  # nobody is listening
        choices = []
        for i, out in enumerate(outs):
            _check_finished(out)
            choices.append(
                {
                    "index": i,
                    "text": echoes[i] + out.text,
                    "finish_reason": out.finish_reason,
                    "logprobs": _completion_logprobs(state, out.logprobs, len(echoes[i]))
                    if body.logprobs is not None
                    else None,
                }
            )
        return JSONResponse(
            {
                **meta,
                "object": "text_completion",
                "choices": choices,
                "usage": usage(prompt_tokens, sum(len(o.token_ids) for o in outs)),
            }
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        arrival = time.monotonic()
        engine = state.require_ready()
        state.check_model(body.model)
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise bad_request("response_format other than text is not supported by this server", "response_format")
        if body.tool_choice not in (None, "none", "auto"):
            raise bad_request("tool_choice other than 'none' or 'auto' is not supported by this server", "tool_choice")
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_LOGPROBS:
            raise bad_request(
                f"top_logprobs must be an int in [0, {MAX_LOGPROBS}], got {body.top_logprobs}", "top_logprobs"
            )
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = _sampling_params(
            body,
            config,
            (body.top_logprobs or 0) if body.logprobs else None,
            max_tokens,
            engine.engine.text_config.vocab_size,
        )
        if state.tokenizer is None:
            raise bad_request("this model has no tokenizer, so no chat template: use /v1/completions", "messages")
        try:
            ids = state.tokenizer.encode_chat(
                body.messages,
                add_generation_prompt=body.add_generation_prompt,
                tools=body.tools,
                **(body.chat_template_kwargs or {}),
            )
        except (ValueError, TypeError) as e:
            raise bad_request(str(e), "messages") from None
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        requests = _engine_requests(
            request_id, [ids], params, body.n, max_tokens, engine.engine.max_model_len, "messages"
        )
        group = await _submit(state, engine, requests, arrival)
        meta = dict(id=request_id, created=int(time.time()), model=config.served_model_name)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = _chat_chunks(state, group, meta, body.logprobs, include_usage, len(ids))
            return _EventStream(_sse_stream(chunks), lambda: engine.abort(group))
        outs = await _collect(raw, group, engine)
        if outs is None:
            return Response(status_code=499)  # nobody is listening
        choices = []
        for i, out in enumerate(outs):
            _check_finished(out)
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": out.text},
                    "logprobs": _chat_logprobs(state, out.logprobs) if body.logprobs else None,
                    "finish_reason": out.finish_reason,
                }
            )
        return JSONResponse(
            {
                **meta,
                "object": "chat.completion",
                "choices": choices,
                "usage": usage(len(ids), sum(len(o.token_ids) for o in outs)),
            }
        )

    return app


def _completion_prompts(state: ServerState, prompt) -> tuple[list[list[int]], list[str]]:
    """The `prompt` field (str, [str], [int], [[int]]) -> token ids per prompt, and their text (for echo)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt is empty", "prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    tokenizer = state.tokenizer
    ids, texts = [], []
    for p in prompt:
        if isinstance(p, str):
            if tokenizer is None:
                raise bad_request("this model has no tokenizer: send token ids as the prompt", "prompt")
            ids.append(tokenizer.encode(p))
            texts.append(p)
        else:
            vocab = state.engine.engine.text_config.vocab_size
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise bad_request(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})", "prompt")
            ids.append(list(p))
            texts.append(tokenizer.decode(p, skip_special_tokens=False) if tokenizer is not None else "")
    return ids, texts


async def _completion_chunks(
    state: ServerState,
    group: RequestGroup,
    meta: dict,
    echoes: list[str],
    want_logprobs: bool,
    include_usage: bool,
    prompt_tokens: int,
) -> AsyncIterator[dict]:
    k = len(group.request_ids)
    sent_text, sent_lps, offsets, num_tokens = [0] * k, [0] * k, [0] * k, [0] * k
    extra = {"usage": None} if include_usage else {}
    echoed = [not e for e in echoes]
    async for i, out in group:
        _check_finished(out)
        text = out.text[sent_text[i] :]
        if not echoed[i]:
            text, echoed[i] = echoes[i] + text, True
            offsets[i] = len(echoes[i])
        new_lps = (out.logprobs or [])[sent_lps[i] :] if want_logprobs else []
        finish = out.finish_reason if out.finished else None
        sent_text[i], sent_lps[i], num_tokens[i] = len(out.text), sent_lps[i] + len(new_lps), len(out.token_ids)
        if not text and not new_lps and finish is None:
            continue
        logprobs = None
        if want_logprobs:
            logprobs = _completion_logprobs(state, new_lps, offsets[i])
            offsets[i] += sum(len(t) for t in logprobs["tokens"])
        yield {
            **meta,
            "object": "text_completion",
            **extra,
            "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}],
        }
    if include_usage:
        yield {**meta, "object": "text_completion", "choices": [], "usage": usage(prompt_tokens, sum(num_tokens))}


async def _chat_chunks(
    state: ServerState, group: RequestGroup, meta: dict, want_logprobs: bool, include_usage: bool, prompt_tokens: int
) -> AsyncIterator[dict]:
    k = len(group.request_ids)
    sent_text, sent_lps, num_tokens = [0] * k, [0] * k, [0] * k
    base = {**meta, "object": "chat.completion.chunk", **({"usage": None} if include_usage else {})}
    for i in range(k):
        yield {
            **base,
            "choices": [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            ],
        }
    async for i, out in group:
        _check_finished(out)
        text = out.text[sent_text[i] :]
        new_lps = (out.logprobs or [])[sent_lps[i] :] if want_logprobs else []
        finish = out.finish_reason if out.finished else None
        sent_text[i], sent_lps[i], num_tokens[i] = len(out.text), sent_lps[i] + len(new_lps), len(out.token_ids)
        if not text and not new_lps and finish is None:
            continue
        yield {
            **base,
            "choices": [
                {
                    "index": i,
                    "delta": {"content": text} if text else {},
                    "logprobs": _chat_logprobs(state, new_lps) if want_logprobs else None,
                    "finish_reason": finish,
                }
            ],
        }
    if include_usage:
        yield {**base, "choices": [], "usage": usage(prompt_tokens, sum(num_tokens))}


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
