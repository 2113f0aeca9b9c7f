"""Server-sent events for the streamed routes: `EventStream` (the response) and `sse_stream` (chunks -> events).

Every stream ends with `data: [DONE]`. A fault after the first byte cannot change the status any more (200 went
out with the headers), so it is sent as one error event in the OpenAI envelope before [DONE]; the client sees a
proper ending rather than a cut connection.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gemma4_jax.serving.async_engine import Aborted, EngineError
from gemma4_jax.serving.protocol import APIError, aborted, engine_fault, error_envelope

log = logging.getLogger(__name__)


class EventStream(StreamingResponse):
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


def sse(payload: Any) -> str:
    """One event: compact JSON (no spaces, non-ASCII kept) after `data: `."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def sse_stream(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Chunks as SSE events; a fault becomes an error event; always ends with [DONE]."""
    try:
        async for chunk in chunks:
            yield sse(chunk)
    except EngineError as e:
        yield sse(engine_fault(e).envelope())
    except Aborted as e:  # the end of a drain
        yield sse(aborted(e).envelope())
    except APIError as e:
        yield sse(e.envelope())
    except Exception as e:  # a bug here, after the 200 went out: still end the stream properly
        log.exception("error while streaming")
        yield sse(error_envelope(f"internal server error: {type(e).__name__}", "server_error", None, "internal_error"))
    yield "data: [DONE]\n\n"
