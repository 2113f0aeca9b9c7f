"""`/v1/completions`: text in, text out (streamed as SSE on request), with echo and logprobs.

A `prompt` may be a string, a list of strings, token ids or a list of token-id lists; each prompt runs `n` times.
With `echo` the prompt leads each choice's text, and with `echo` and `logprobs` the prompt's own logprobs (one
forward per distinct prompt, on the engine thread) lead its logprobs, the first token's null as in vLLM.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from gemma4_jax.serving.api_requests import (
    TokenBudget,
    build_engine_requests,
    build_sampling_params,
    check_finished,
    collect,
    prompt_logprobs,
    submit,
    text_prompts,
)
from gemma4_jax.serving.api_sse import EventStream, sse_stream
from gemma4_jax.serving.api_state import ServerState, State
from gemma4_jax.serving.async_engine import RequestGroup
from gemma4_jax.serving.engine import TokenLogprob
from gemma4_jax.serving.protocol import CompletionRequest, bad_request, clamp_logprob, usage
from gemma4_jax.serving.sampling import MAX_LOGPROBS

router = APIRouter()


@router.post("/v1/completions")
async def completions(body: CompletionRequest, raw: Request, state: State) -> Response:
    arrival = time.monotonic()
    engine = state.require_ready()
    config = state.config
    state.check_model(body.model)
    if body.suffix:
        raise bad_request("suffix is not supported by this server", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request("best_of other than n is not supported by this server", "best_of")
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
        raise bad_request(f"logprobs must be an int in [0, {MAX_LOGPROBS}], got {body.logprobs}", "logprobs")
    params = build_sampling_params(body, config, body.logprobs, body.max_tokens, engine.vocab_size)
    if isinstance(body.prompt, list) and body.prompt and not isinstance(body.prompt[0], int):
        if len(body.prompt) > config.max_prompts:
            raise bad_request(
                f"{len(body.prompt)} prompts are over this server's limit of {config.max_prompts}", "prompt"
            )
    budget = TokenBudget.for_generation("prompt", engine.max_model_len, body.max_tokens)
    prompts, texts = await text_prompts(state, body.prompt, budget)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    requests = build_engine_requests(
        request_id, prompts, params, body.n, body.max_tokens, engine.max_model_len, "prompt"
    )
    # echo + logprobs: the prompt's own logprobs lead each choice's (one forward per distinct prompt).
    prompt_lps: list[list[TokenLogprob]] = [[] for _ in prompts]
    if body.echo and body.logprobs is not None:
        for p, ids in enumerate(prompts):
            prompt_lps[p] = await prompt_logprobs(engine, ids, body.logprobs)
    group = await submit(state, engine, requests, arrival)
    meta = dict(id=request_id, created=int(time.time()), model=config.served_model_name)
    prompt_tokens = sum(len(ids) for ids in prompts)
    echoes = [texts[i // body.n] if body.echo else "" for i in range(len(requests))]
    leading = [prompt_lps[i // body.n] for i in range(len(requests))]
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = completion_chunks(
            state, group, meta, echoes, leading, body.logprobs is not None, include_usage, prompt_tokens
        )
        return EventStream(sse_stream(chunks), lambda: engine.abort(group))
    outs = await collect(raw, group, engine)
    if outs is None:
        return Response(status_code=499)  # nobody is listening
    choices = []
    for i, out in enumerate(outs):
        check_finished(out)
        choices.append(
            {
                "index": i,
                "text": echoes[i] + out.text,
                "finish_reason": out.finish_reason,
                "logprobs": completion_logprobs(state, leading[i] + out.logprobs, 0 if leading[i] else len(echoes[i]))
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


async def completion_chunks(
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
        check_finished(out)
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
            logprobs = completion_logprobs(state, new_lps, offsets[i])
            offsets[i] += sum(len(t) for t in logprobs["tokens"])
        yield {
            **meta,
            "object": "text_completion",
            **extra,
            "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}],
        }
    if include_usage:
        yield {**meta, "object": "text_completion", "choices": [], "usage": usage(prompt_tokens, sum(num_tokens))}


def completion_logprobs(state: ServerState, lps: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
    """Logprobs in the completions form: parallel lists of token texts, logprobs, top alternatives and offsets
    (characters into the choice's text, which starts at `offset`)."""
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
