"""Offline batch files in the OpenAI batch format: `gemma4-jax run-batch -i requests.jsonl -o results.jsonl`, as
`vllm run-batch`.

Each input line is `{"custom_id": str, "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
"body": {...}}`, the body being what the HTTP server takes at that URL. Each output line is
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`: on success `body` is the server's
answer and `error` null; on failure `body` is null and `error` the server's error object (`message`, `type`,
`param`, `code`), with its status code.

The lines are not re-implemented here: they go, in process, through the very app `gemma4-jax serve` runs (its
schemas, validation, chat templates, tool calls, logprobs; `server.create_app` over an `httpx.ASGITransport`), so a
batch line is answered exactly as the same request sent to the server. Many lines are in flight at once, and the
engine batches them. A line that is not JSON, not an object, lacks a field, names another URL or method, repeats a
custom_id or asks to stream gets an error line; nothing stops the batch.

Resumable: every answer is written and flushed as it finishes (in completion order), and on a restart the
custom_ids already in the output file are skipped (a torn last line from a crash is cut off first).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import uuid
from typing import Any, TextIO

import httpx

from gemma4_jax.serving.server import ServerConfig, create_app

log = logging.getLogger(__name__)

URLS = ("/v1/chat/completions", "/v1/completions")
_RETRY_S = 0.05  # a line refused for now (429: too many in flight) is sent again after this


@dataclasses.dataclass
class BatchLine:
    """One input line: its 1-based line number, custom_id, URL and body, or the error that makes it unrunnable."""

    number: int
    custom_id: str | None
    url: str | None = None
    body: dict[str, Any] | None = None
    error: str | None = None


@dataclasses.dataclass
class BatchSummary:
    """What a run did: lines in the input, skipped (already in the output), run, and of those failed."""

    total: int
    skipped: int
    ran: int
    failed: int


def parse_line(number: int, text: str, seen: set[str]) -> BatchLine:
    """One input line -> a BatchLine (with `error` set when it cannot run). `seen`: custom_ids so far (updated)."""
    try:
        item = json.loads(text)
    except json.JSONDecodeError as e:
        return BatchLine(number, None, error=f"line {number}: not valid JSON ({e})")
    if not isinstance(item, dict):
        return BatchLine(number, None, error=f"line {number}: expected a JSON object, got {type(item).__name__}")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return BatchLine(number, None, error=f"line {number}: 'custom_id' must be a non-empty string")
    if custom_id in seen:
        return BatchLine(number, custom_id, error=f"line {number}: custom_id {custom_id!r} appears more than once")
    seen.add(custom_id)
    method, url, body = item.get("method", "POST"), item.get("url"), item.get("body")
    if not isinstance(method, str) or method.upper() != "POST":
        return BatchLine(number, custom_id, error=f"line {number}: method must be POST, got {method!r}")
    if url not in URLS:
        return BatchLine(number, custom_id, error=f"line {number}: url must be one of {list(URLS)}, got {url!r}")
    if not isinstance(body, dict):
        return BatchLine(number, custom_id, error=f"line {number}: 'body' must be a JSON object")
    if body.get("stream"):
        return BatchLine(number, custom_id, error=f"line {number}: 'stream' is not supported in a batch file")
    return BatchLine(number, custom_id, url, body)


def finished_ids(path: str) -> set[str]:
    """custom_ids already answered in an output file (none when it does not exist). A last line without its newline
    (the run was killed while writing it) is cut off, so that appending starts on a fresh line."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            log.warning("%s: dropping a torn last line (%d bytes) before resuming", path, len(data) - end)
            f.truncate(end)
            data = data[:end]
    done = set()
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            custom_id = json.loads(line).get("custom_id")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(custom_id, str):
            done.add(custom_id)
    return done


def _record(custom_id: str | None, status: int, body: dict | None, error: dict | None) -> dict[str, Any]:
    request_id = (body or {}).get("id") or f"batch-{uuid.uuid4().hex}"
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": error,
    }


def _error(message: str, status: int = 400) -> dict[str, Any]:
    return {
        "message": message,
        "type": "invalid_request_error" if status < 500 else "server_error",
        "param": None,
        "code": None,
    }


async def _send(client: httpx.AsyncClient, line: BatchLine) -> dict[str, Any]:
    """Run one line through the app -> its output record. Retries while the server answers 429 (queue full)."""
    while True:
        response = await client.post(line.url, json=line.body)
        if response.status_code != 429:
            break
        await asyncio.sleep(_RETRY_S)
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if response.status_code == 200 and isinstance(payload, dict):
        return _record(line.custom_id, 200, payload, None)
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        error = _error(f"status {response.status_code}: {response.text[:500]}", response.status_code)
    return _record(line.custom_id, response.status_code, None, error)


async def run_batch_async(
    llm, lines: list[BatchLine], sink: TextIO, config: ServerConfig, max_concurrency: int, progress: bool = True
) -> int:
    """Send `lines` through the server app over `llm`, writing one record per line to `sink` as each finishes.
    Returns how many failed."""
    app = create_app(llm, config)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(lines), desc="run-batch", unit="req")
    failed = 0
    limit = asyncio.Semaphore(max_concurrency)

    async def one(client: httpx.AsyncClient, line: BatchLine) -> None:
        nonlocal failed
        if line.error is not None:
            record = _record(line.custom_id, 400, None, _error(line.error))
        else:
            async with limit:
                try:
                    record = await _send(client, line)
                except Exception as e:  # a fault of this line only; the batch goes on
                    log.exception("line %d (%s) failed", line.number, line.custom_id)
                    record = _record(line.custom_id, 500, None, _error(f"{type(e).__name__}: {e}", 500))
        failed += record["error"] is not None
        sink.write(json.dumps(record, ensure_ascii=False) + "\n")
        sink.flush()
        if bar is not None:
            bar.update(1)

    # The app's lifespan starts (and at the end stops) the engine thread, as uvicorn would.
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://batch", timeout=None) as client:
            await asyncio.gather(*(one(client, line) for line in lines))
    if bar is not None:
        bar.close()
    return failed


def run_batch(
    llm,
    input_path: str,
    output_path: str,
    served_model_name: str | None = None,
    max_concurrency: int | None = None,
    progress: bool = True,
) -> BatchSummary:
    """Run a batch file with `llm` (a `gemma4_jax.LLM`) into `output_path` (appended to: lines whose custom_id it
    already holds are skipped). served_model_name: the `model` the lines must name (default: any line's `model` is
    accepted, since a batch has one model). max_concurrency: lines in flight (default 4 x max_num_seqs)."""
    seen: set[str] = set()
    with open(input_path, encoding="utf-8") as f:
        lines = [parse_line(n, text, seen) for n, text in enumerate(f, 1) if text.strip()]
    done = finished_ids(output_path)
    todo = [line for line in lines if line.custom_id is None or line.custom_id not in done]
    skipped = len(lines) - len(todo)
    if skipped:
        log.info(
            "run-batch: %d of %d lines already in %s; running the other %d", skipped, len(lines), output_path, len(todo)
        )
    if served_model_name is None:
        for line in todo:  # a batch serves one model: take the name the lines use, so that they all pass
            if line.body is not None and isinstance(line.body.get("model"), str):
                served_model_name = line.body["model"]
                break
    max_num_seqs = llm.engine.config.max_num_seqs
    config = ServerConfig(
        served_model_name=served_model_name or "gemma4-jax",
        max_body_bytes=256 * 2**20,
        max_queue=max(256, 4 * max_num_seqs),
    )
    concurrency = max_concurrency or 4 * max_num_seqs
    with open(output_path, "a", encoding="utf-8") as sink:
        failed = asyncio.run(run_batch_async(llm, todo, sink, config, concurrency, progress))
    summary = BatchSummary(len(lines), skipped, len(todo), failed)
    log.info(
        "run-batch: %d lines: %d run (%d failed), %d skipped (already done)",
        summary.total,
        summary.ran,
        summary.failed,
        summary.skipped,
    )
    return summary
