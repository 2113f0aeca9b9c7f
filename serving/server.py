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
import copy
import dataclasses
import functools
import hmac
import json
import logging
import os
import re
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

from gemma4_jax.serving import mm_inputs
from gemma4_jax.serving.async_engine import AsyncEngine, EngineError, EngineStopped, QueueFull, RequestGroup
from gemma4_jax.serving.engine import RequestOutput, TokenLogprob
from gemma4_jax.serving.metrics import ServerMetrics
from gemma4_jax.serving.protocol import (
    TOOL_CALL_START,
    TOOL_RESPONSE_START,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    NamedToolChoice,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    ToolCallParser,
    advertise_limits,
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
    media: mm_inputs.MediaInputs | None = None,
):
    """One engine request per (prompt, copy), with the context check that names both counts. With media (one
    prompt), each request is (id, ids, params, media): the copies share the soft tokens."""
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
            request = (f"{prefix}-{p}-{i}", list(ids), copy)
            requests.append(request if media is None else (*request, media))
    return requests


def _template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: tool-call arguments that arrive as a JSON string (the OpenAI wire
    form) become the object they encode, since templates iterate over them (Gemma 4 writes `key:value` pairs)."""
    out = []
    for message in messages:
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if isinstance(calls, list) and any(isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls):
            fixed = []
            for call in calls:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                    try:
                        arguments = json.loads(function["arguments"])
                    except ValueError:
                        arguments = None
                    if isinstance(arguments, dict):
                        call = {**call, "function": {**function, "arguments": arguments}}
                fixed.append(call)
            message = {**message, "tool_calls": fixed}
        out.append(message)
    return out


def _chat_prompt(
    state: ServerState,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None,
    template_kwargs: dict[str, Any] | None,
) -> list[int]:
    """The chat rendered by the checkpoint's template and encoded; any failure of the template on these messages
    (a check it raises, or a Python error on values it did not expect) is the request's fault: 400."""
    try:
        return state.tokenizer.encode_chat(
            _template_messages(messages),
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            **(template_kwargs or {}),
        )
    except (ValueError, TypeError, LookupError, ArithmeticError) as e:
        raise bad_request(str(e) or f"the chat template failed: {type(e).__name__}", "messages") from None


async def _media_chat_prompt(
    state: ServerState,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None,
    template_kwargs: dict[str, Any] | None,
) -> tuple[list[int], mm_inputs.MediaInputs | None]:
    """A chat with image / audio parts -> (prompt ids, media). Decoding and resizing run in a worker thread, off
    the event loop. Bad media (MediaError), a model without towers and template failures are the request's: 400."""
    try:
        processor = state.llm.media_processor
        return await asyncio.to_thread(
            processor.process_chat,
            _template_messages(messages),
            state.config.media_limits,
            allow_local=False,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            **(template_kwargs or {}),
        )
    except (ValueError, TypeError, LookupError, ArithmeticError) as e:
        raise bad_request(str(e) or f"the media or chat template failed: {type(e).__name__}", "messages") from None


def _forced_tool_prefix(body: ChatCompletionRequest, tools: list[dict[str, Any]] | None) -> str:
    """tool_choice "required" or a named function: the model turn starts with the call already opened (Gemma 4's
    `<|tool_call>call:` or `<|tool_call>call:NAME{`), so the model writes a call rather than prose."""
    choice = body.tool_choice
    if choice in (None, "none", "auto"):
        return ""
    if not tools:
        raise bad_request("tool_choice 'required' or a named function needs tools", "tool_choice")
    if isinstance(choice, NamedToolChoice):
        names = [tool["function"]["name"] for tool in tools]
        if choice.function.name not in names:
            raise bad_request(
                f"tool_choice names {choice.function.name!r}, not one of the tools {names}", "tool_choice"
            )
        return f"{TOOL_CALL_START}call:{choice.function.name}{{"
    return f"{TOOL_CALL_START}call:"


def _chat_message(
    out: RequestOutput, parser: ToolCallParser | None, clean: Callable[[str], str]
) -> tuple[dict[str, Any], str | None]:
    """A finished output -> (the assistant message, finish_reason); with a parser (tools on), its tool calls are
    split out of the text (content null when nothing but calls was written)."""
    if parser is None:
        return {"role": "assistant", "content": out.text}, out.finish_reason
    parser.feed(out.text, final=True)
    content = clean(parser.content)
    message: dict[str, Any] = {"role": "assistant", "content": content if content.strip() or not parser.calls else None}
    if not parser.calls:
        return message, out.finish_reason
    message["tool_calls"] = [call.to_openai() for call in parser.calls]
    return message, _tool_finish(out.finish_reason)


def _tool_finish(finish: str | None) -> str | None:
    # A turn that ended by handing over to the tools reports "tool_calls"; one cut by max_tokens stays "length".
    return "tool_calls" if finish == "stop" else finish


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


async def _score_prompt(engine: AsyncEngine, ids: list[int], k: int) -> list[TokenLogprob]:
    try:
        return await engine.prompt_logprobs(ids, k)
    except EngineError as e:
        raise _fault(e) from None
    except EngineStopped as e:
        raise APIError(503, str(e), "service_unavailable", code="engine_stopped") from None


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
    # A prompt's first token has no logprob (nothing precedes it): null in both lists, as vLLM.
    return {
        "tokens": tokens,
        "token_logprobs": [None if lp.logprob is None else clamp_logprob(lp.logprob) for lp in lps],
        "top_logprobs": [
            None if lp.top is None else {state.token_text(t): clamp_logprob(v) for t, v in lp.top} for lp in lps
        ],
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

    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """The schema with this server's limits in it (once loaded, the context length and the vocabulary), so that
        clients and fuzzers generating from it produce requests the server accepts."""
        schema = copy.deepcopy(base_openapi())
        engine = state.engine.engine if state.engine is not None else None
        advertise_limits(
            schema["components"]["schemas"],
            model_name=config.served_model_name,
            max_n=config.max_n,
            max_prompts=config.max_prompts,
            max_stop=config.max_stop,
            max_stop_chars=config.max_stop_chars,
            max_model_len=engine.max_model_len if engine is not None else None,
            vocab_size=engine.text_config.vocab_size if engine is not None else None,
        )
        return schema

    app.openapi = openapi

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
    async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest) -> dict:
        """`{"prompt"}` (text) or `{"messages"}` (a chat, rendered as /v1/chat/completions renders it, `tools`
        included) -> the token ids."""
        engine = state.require_ready()
        state.check_model(body.model)
        if state.tokenizer is None:
            raise bad_request("this model has no tokenizer")
        if isinstance(body, TokenizeChatRequest):
            tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
            if mm_inputs.has_media_parts(body.messages):  # placeholders expanded as the chat route does
                ids, _ = await _media_chat_prompt(
                    state, body.messages, body.add_generation_prompt, tools, body.chat_template_kwargs
                )
            else:
                ids = _chat_prompt(state, body.messages, body.add_generation_prompt, tools, body.chat_template_kwargs)
        else:
            ids = state.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
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
        # echo + logprobs: the prompt's own logprobs lead each choice's (one forward per distinct prompt).
        prompt_lps: list[list[TokenLogprob]] = [[] for _ in prompts]
        if body.echo and body.logprobs is not None:
            for p, ids in enumerate(prompts):
                prompt_lps[p] = await _score_prompt(engine, ids, body.logprobs)
        group = await _submit(state, engine, requests, arrival)
        meta = dict(id=request_id, created=int(time.time()), model=config.served_model_name)
        prompt_tokens = sum(len(ids) for ids in prompts)
        echoes = [texts[i // body.n] if body.echo else "" for i in range(len(requests))]
        leading = [prompt_lps[i // body.n] for i in range(len(requests))]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = _completion_chunks(
                state, group, meta, echoes, leading, body.logprobs is not None, include_usage, prompt_tokens
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
                    "logprobs": _completion_logprobs(
                        state, leading[i] + out.logprobs, 0 if leading[i] else len(echoes[i])
                    )
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
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
        forced = _forced_tool_prefix(body, tools)
        media = None
        if mm_inputs.has_media_parts(body.messages):
            ids, media = await _media_chat_prompt(
                state, body.messages, body.add_generation_prompt, tools, body.chat_template_kwargs
            )
        else:
            ids = _chat_prompt(state, body.messages, body.add_generation_prompt, tools, body.chat_template_kwargs)
        parse_tools = bool(tools) and body.tool_choice != "none"
        if forced:
            ids = ids + state.tokenizer.encode(forced, add_special_tokens=False)
        if parse_tools:
            # Tool-call markers are special tokens: decode with them kept (the content is cleaned afterwards, as
            # the client asked), and stop where the model hands over to the tool.
            params = dataclasses.replace(params, skip_special_tokens=False, stop=(*params.stop, TOOL_RESPONSE_START))
        clean = state.strip_special if body.skip_special_tokens else (lambda text: text)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        requests = _engine_requests(
            request_id, [ids], params, body.n, max_tokens, engine.engine.max_model_len, "messages", media
        )
        group = await _submit(state, engine, requests, arrival)
        meta = dict(id=request_id, created=int(time.time()), model=config.served_model_name)
        parsers = [ToolCallParser(forced) for _ in requests] if parse_tools else None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = _chat_chunks(state, group, meta, body.logprobs, include_usage, len(ids), parsers, clean)
            return _EventStream(_sse_stream(chunks), lambda: engine.abort(group))
        outs = await _collect(raw, group, engine)
        if outs is None:
            return Response(status_code=499)  # nobody is listening
        choices = []
        for i, out in enumerate(outs):
            _check_finished(out)
            message, finish = _chat_message(out, parsers[i] if parsers is not None else None, clean)
            choices.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": _chat_logprobs(state, out.logprobs) if body.logprobs else None,
                    "finish_reason": finish,
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
    leading: list[list[TokenLogprob]],
    want_logprobs: bool,
    include_usage: bool,
    prompt_tokens: int,
) -> AsyncIterator[dict]:
    """Completion chunks; `leading` holds each request's prompt logprobs (echo + logprobs), sent first."""
    k = len(group.request_ids)
    sent_text, sent_lps, offsets, num_tokens = [0] * k, [0] * k, [0] * k, [0] * k
    extra = {"usage": None} if include_usage else {}
    echoed = [not (echoes[i] or leading[i]) for i in range(k)]
    async for i, out in group:
        _check_finished(out)
        text = out.text[sent_text[i] :]
        new_lps = (out.logprobs or [])[sent_lps[i] :] if want_logprobs else []
        sent_text[i], sent_lps[i], num_tokens[i] = len(out.text), sent_lps[i] + len(new_lps), len(out.token_ids)
        if not echoed[i]:
            text, echoed[i] = echoes[i] + text, True
            offsets[i] = 0 if leading[i] else len(echoes[i])
            new_lps = leading[i] + new_lps
        finish = out.finish_reason if out.finished else None
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
    state: ServerState,
    group: RequestGroup,
    meta: dict,
    want_logprobs: bool,
    include_usage: bool,
    prompt_tokens: int,
    parsers: list[ToolCallParser] | None = None,
    clean: Callable[[str], str] = lambda text: text,
) -> AsyncIterator[dict]:
    """Chat chunks; with `parsers` (tools on) the text is split into content deltas and tool-call deltas (one per
    call, whole, once it is complete)."""
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
        new_lps = (out.logprobs or [])[sent_lps[i] :] if want_logprobs else []
        finish = out.finish_reason if out.finished else None
        delta: dict[str, Any] = {}
        if parsers is not None:
            before = len(parsers[i].calls)
            text, calls = parsers[i].feed(out.text, final=out.finished)
            text = clean(text)
            if calls:
                delta["tool_calls"] = [call.to_openai(before + j) for j, call in enumerate(calls)]
            if finish is not None and parsers[i].calls:
                finish = _tool_finish(finish)
        else:
            text = out.text[sent_text[i] :]
        if text:
            delta = {"content": text, **delta}
        sent_text[i], sent_lps[i], num_tokens[i] = len(out.text), sent_lps[i] + len(new_lps), len(out.token_ids)
        if not delta and not new_lps and finish is None:
            continue
        yield {
            **base,
            "choices": [
                {
                    "index": i,
                    "delta": delta,
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
