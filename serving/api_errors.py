"""Errors of the HTTP server, always in the OpenAI envelope `{"error": {"message", "type", "param", "code"}}`.

`GuardMiddleware` answers before any route runs: 401 without the right API key, 413 for a body over the cap.
`add_exception_handlers` turns everything a route raises into an envelope: `APIError` as it says, validation
errors as 400 naming the field, Starlette's 404 / 405, and anything unexpected as a 500 that names only the
exception type. Faults after the first byte of a stream are `api_sse.py`'s.
"""

from __future__ import annotations

import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gemma4_jax.serving.api_state import ServerState
from gemma4_jax.serving.async_engine import EngineError, EngineStopped
from gemma4_jax.serving.protocol import APIError, error_envelope, validation_message

log = logging.getLogger(__name__)


def error_response(
    status: int, message: str, type: str, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An error response made directly, where raising `APIError` is not an option (the guard runs before the app's
    exception handlers; /health answers 503 without it being an error)."""
    return JSONResponse(error_envelope(message, type, None, code), status_code=status, headers=headers)


def engine_fault(e: EngineError) -> APIError:
    """The engine failed while running the request: the server's fault."""
    return APIError(500, str(e), "server_error", code="engine_error")


def engine_stopped(e: EngineStopped) -> APIError:
    """The engine thread is not running (shutting down, or dead): try another replica."""
    return APIError(503, str(e), "service_unavailable", code="engine_stopped")


# ----------------------------------------------------------------------------------------------------------------------
# Authentication and the body cap (pure ASGI, before any route reads the body)
# ----------------------------------------------------------------------------------------------------------------------


class GuardMiddleware:
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
            response = error_response(
                401,
                "invalid or missing API key (send 'Authorization: Bearer <key>')",
                "invalid_request_error",
                "invalid_api_key",
                {"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        cap = self.state.config.max_body_bytes
        too_large = error_response(
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


async def _internal_error(request: Request, e: Exception) -> JSONResponse:
    log.exception("unhandled error in %s", request.url.path)
    return JSONResponse(
        error_envelope(f"internal server error: {type(e).__name__}", "server_error", None, "internal_error"),
        status_code=500,
    )


def add_exception_handlers(app: FastAPI) -> None:
    """Answer whatever a route raises in the OpenAI envelope."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
