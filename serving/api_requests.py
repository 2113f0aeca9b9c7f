"""From an HTTP request to engine requests and back, shared by the generation routes.

Everything that can fail is checked here before anything is sent (sampling values, the chat template, the media,
the context length, admission), so that errors always arrive as a status with the OpenAI envelope and never as a
half-written stream: `build_sampling_params`, `chat_prompt` / `media_chat_prompt`, `build_engine_requests`,
`submit`. Then `collect` waits for a non-streamed request's outputs (aborting them if the client goes away) and
`check_finished` turns an output cut by a drain into a 503.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from fastapi import Request
from starlette.types import Receive

from gemma4_jax.serving import mm_inputs
from gemma4_jax.serving.api_errors import engine_fault, engine_stopped
from gemma4_jax.serving.api_state import ServerConfig, ServerState
from gemma4_jax.serving.async_engine import (
    AsyncEngine,
    EngineError,
    EngineRequest,
    EngineStopped,
    QueueFull,
    RequestGroup,
)
from gemma4_jax.serving.engine import RequestOutput, TokenLogprob
from gemma4_jax.serving.protocol import APIError, ChatCompletionRequest, CompletionRequest, bad_request
from gemma4_jax.serving.sampling import SamplingParams

_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


# ----------------------------------------------------------------------------------------------------------------------
# Checking a request and turning it into engine requests
# ----------------------------------------------------------------------------------------------------------------------


def build_sampling_params(
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


def build_engine_requests(
    prefix: str,
    prompts: Sequence[list[int]],
    params: SamplingParams,
    n: int,
    max_tokens: int | None,
    max_model_len: int,
    prompt_field: str,
    media: mm_inputs.MediaInputs | None = None,
) -> list[EngineRequest]:
    """One engine request per (prompt, copy), with the context check that names both counts. With media (one
    prompt), the copies share its soft tokens."""
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
            requests.append(EngineRequest(f"{prefix}-{p}-{i}", list(ids), copy, media))
    return requests


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
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


def chat_prompt(
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
            template_messages(messages),
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            **(template_kwargs or {}),
        )
    except (ValueError, TypeError, LookupError, ArithmeticError) as e:
        raise bad_request(str(e) or f"the chat template failed: {type(e).__name__}", "messages") from None


async def media_chat_prompt(
    state: ServerState,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None,
    template_kwargs: dict[str, Any] | None,
) -> tuple[list[int], mm_inputs.MediaInputs | None]:
    """A chat with image / audio parts -> (prompt ids, media). Decoding and resizing run in a worker thread, off
    the event loop. Bad media (MediaError), a model without towers and template failures are the request's: 400."""
    try:
        processor = state.media_processor
        return await asyncio.to_thread(
            processor.process_chat,
            template_messages(messages),
            state.config.media_limits,
            allow_local=False,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            **(template_kwargs or {}),
        )
    except (ValueError, TypeError, LookupError, ArithmeticError) as e:
        raise bad_request(str(e) or f"the media or chat template failed: {type(e).__name__}", "messages") from None


# ----------------------------------------------------------------------------------------------------------------------
# Running them
# ----------------------------------------------------------------------------------------------------------------------


async def submit(
    state: ServerState, engine: AsyncEngine, requests: Sequence[EngineRequest], arrival: float
) -> RequestGroup:
    """Admit `requests` (all or none) -> their group; 429 when the server is full, 503 when the engine is not
    running, 400 when the engine refuses one or the request alone is over the token budget."""
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
        raise engine_stopped(e) from None
    except ValueError as e:
        raise bad_request(str(e)) from None


async def prompt_logprobs(engine: AsyncEngine, ids: list[int], k: int) -> list[TokenLogprob]:
    """The prompt's own logprobs (echo + logprobs), with engine faults as API errors."""
    try:
        return await engine.prompt_logprobs(ids, k)
    except EngineError as e:
        raise engine_fault(e) from None
    except EngineStopped as e:
        raise engine_stopped(e) from None


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


async def collect(raw: Request, group: RequestGroup, engine: AsyncEngine) -> list[RequestOutput] | None:
    """A non-streaming request's outputs, or None when the client went away; the group is always released."""
    try:
        return await _result_or_disconnect(raw, group)
    except EngineError as e:
        raise engine_fault(e) from None
    finally:
        engine.abort(group)


def check_finished(out: RequestOutput) -> None:
    """An output cut by the end of a drain is answered 503, not passed off as a completion."""
    if out.finish_reason == "abort":
        raise APIError(
            503, "the request was aborted: the server is shutting down", "service_unavailable", code="aborted"
        )
