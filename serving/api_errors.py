"""Errors of the HTTP server, always in the OpenAI envelope `{"error": {"message", "type", "param", "code"}}`, and
the guard in front of every route.

`GuardMiddleware` answers before any route runs: 400 for a Host header the server does not answer to (DNS
rebinding), 401 without the right API key, 413 for a body over the cap, 408 for a body that does not arrive in time,
415 for a POST body that is not declared JSON (a web page can send text/plain or form bodies cross-origin without a
CORS preflight; JSON it cannot). It also ends a request that the runner cancels at shutdown properly: a JSON 503,
or an error event and [DONE] for a stream already under way. `add_exception_handlers` turns everything a route
raises into an envelope: `APIError` as it says, validation errors as 400 naming the field, Starlette's 404 / 405,
and anything unexpected as a 500 that names only the exception type. Faults after the first byte of a stream are
`api_sse.py`'s.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gemma4_jax.serving.api_sse import sse
from gemma4_jax.serving.api_state import ServerState
from gemma4_jax.serving.async_engine import Aborted
from gemma4_jax.serving.protocol import (  # noqa: F401 (re-exported)
    APIError,
    aborted,
    engine_fault,
    engine_stopped,
    error_envelope,
    validation_message,
)

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
# Wildcard bind addresses: the server is meant to be reached under names it cannot know.
_WILDCARD_BINDS = ("", "0.0.0.0", "::", "*")


def error_response(
    status: int, message: str, type: str, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An error response made directly, where raising `APIError` is not an option (the guard runs before the app's
    exception handlers; /health answers 503 without it being an error)."""
    return JSONResponse(error_envelope(message, type, None, code), status_code=status, headers=headers)


def allowed_host_names(configured: list[str] | None, bind_host: str) -> list[str] | None:
    """The Host names a server bound to `bind_host` answers: `configured` when given, else the loopback names plus
    `bind_host`, or None (any) when `bind_host` is a wildcard address, reached under names the server cannot know."""
    if configured is not None:
        return list(configured)
    if bind_host.strip("[]") in _WILDCARD_BINDS:
        return None
    return [*LOOPBACK_HOSTS, bind_host]


def _host_name(value: str) -> str:
    """A Host header or an allow-list entry -> the bare lower-case name: no port, no IPv6 brackets, no final dot."""
    host = value.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host[1:]
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        host = name
    return host.rstrip(".")


def _host_matches(host: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        pattern = _host_name(pattern) if pattern != "*" else pattern
        if pattern == "*" or host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
        try:  # an IPv6 address written another way (::1 and 0:0:0:0:0:0:0:1)
            if ipaddress.ip_address(host) == ipaddress.ip_address(pattern):
                return True
        except ValueError:
            pass
    return False


def _is_json(content_type: bytes | None) -> bool:
    if content_type is None:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


class _Refused(Exception):
    def __init__(self, response: JSONResponse):
        self.response = response


# ----------------------------------------------------------------------------------------------------------------------
# The guard (pure ASGI, before any route reads the body)
# ----------------------------------------------------------------------------------------------------------------------


class GuardMiddleware:
    """Host allow-list, API key, body cap and read timeout, JSON content type; a proper ending on cancellation."""

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app = app
        self.state = state

    def _host_allowed(self, scope: Scope) -> tuple[bool, str]:
        patterns = self.state.allowed_hosts
        if patterns is None or scope["path"] == "/health":
            return True, ""
        value = next((v for k, v in scope.get("headers", ()) if k == b"host"), None)
        if value is None:  # HTTP/1.0 without Host: not a browser (they always send one)
            return True, ""
        host = _host_name(value.decode("latin-1"))
        return _host_matches(host, patterns), host

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
        try:
            receive = await self._check(scope, receive)
        except _Refused as refused:
            await refused.response(scope, receive, send)
            return
        if receive is None:  # the client went away while sending the body
            return
        await self._run(scope, receive, send)

    async def _check(self, scope: Scope, receive: Receive) -> Receive | None:
        """Everything checked before the app runs -> the `receive` the app gets (the body replayed), or None when
        the client left; raises _Refused with the answer."""
        allowed, host = self._host_allowed(scope)
        if not allowed:
            raise _Refused(
                error_response(
                    400,
                    f"the Host header {host!r} is not one this server answers to (see --allowed-hosts)",
                    "invalid_request_error",
                    "invalid_host",
                    {"Connection": "close"},
                )
            )
        if not self._authorized(scope):
            raise _Refused(
                error_response(
                    401,
                    "invalid or missing API key (send 'Authorization: Bearer <key>')",
                    "invalid_request_error",
                    "invalid_api_key",
                    {"WWW-Authenticate": "Bearer"},
                )
            )
        headers = dict(scope.get("headers", ()))
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.state.config.max_body_bytes:
            raise _Refused(self._too_large())
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return receive
        body = await self._read_body(receive)
        if body is None:
            return None
        # After the body (so a body over the cap is a 413 whatever its type): a web page can send text/plain, form
        # or untyped bodies to any origin without a CORS preflight; application/json it cannot.
        if not _is_json(headers.get(b"content-type")):
            raise _Refused(
                error_response(
                    415,
                    "the request body must be JSON, sent with 'Content-Type: application/json'",
                    "invalid_request_error",
                    "unsupported_media_type",
                )
            )
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: blocks until the client disconnects

        return replay

    def _too_large(self) -> JSONResponse:
        cap = self.state.config.max_body_bytes
        return error_response(
            413,
            f"the request body is over the limit of {cap} bytes",
            "invalid_request_error",
            "request_too_large",
            {"Connection": "close"},
        )

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, counted (a chunked upload without Content-Length is capped as well) and timed (a client
        that stops sending does not hold a connection and a task forever); None when the client disconnected."""
        chunks, size = [], 0
        timeout = self.state.config.body_timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise _Refused(
                    error_response(
                        408,
                        f"the request body did not arrive within {timeout:g} s",
                        "invalid_request_error",
                        "request_timeout",
                        {"Connection": "close"},
                    )
                ) from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.state.config.max_body_bytes:
                raise _Refused(self._too_large())
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _run(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app; if the runner cancels it (the end of a shutdown whose grace period is over), still give the
        client a proper ending: a JSON 503 when nothing was sent yet, an error event and [DONE] in a stream."""
        started = finished = streaming = False

        async def tracking_send(message: Message) -> None:
            nonlocal started, finished, streaming
            if message["type"] == "http.response.start":
                started = True
                content_type = dict(message.get("headers", ())).get(b"content-type", b"")
                streaming = content_type.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            if finished:
                return
            error = aborted()
            log.info("%s cancelled at shutdown; answering 503", scope["path"])
            if not started:
                response = JSONResponse(error.envelope(), status_code=503, headers={"Connection": "close"})
                await response(scope, receive, send)
            elif streaming:
                ending = (sse(error.envelope()) + "data: [DONE]\n\n").encode()
                await send({"type": "http.response.body", "body": ending, "more_body": False})
            # A plain response cut mid-body cannot be mended; the runner closes the connection.


# ----------------------------------------------------------------------------------------------------------------------
# Exception handlers
# ----------------------------------------------------------------------------------------------------------------------


async def _api_error(request: Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.envelope(), status_code=e.status, headers=e.headers)


async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    message, param = validation_message(list(e.errors()))
    return JSONResponse(error_envelope(message, "invalid_request_error", param), status_code=400)


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return JSONResponse(
        error_envelope(str(e.detail), "invalid_request_error", None, code),
        status_code=e.status_code,
        headers=getattr(e, "headers", None),
    )


async def _aborted(request: Request, e: Aborted) -> JSONResponse:
    error = aborted(e)
    return JSONResponse(error.envelope(), status_code=error.status)


async def _internal_error(request: Request, e: Exception) -> JSONResponse:
    log.exception("unhandled error in %s", request.url.path)
    return JSONResponse(
        error_envelope(f"internal server error: {type(e).__name__}", "server_error", None, "internal_error"),
        status_code=500,
    )


def add_exception_handlers(app: FastAPI) -> None:
    """Answer whatever a route raises in the OpenAI envelope."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(Aborted, _aborted)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
