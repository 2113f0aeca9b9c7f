"""The routes around generation: `/health` (load balancers), `/v1/models`, `/metrics` (Prometheus),
`/tokenize` / `/detokenize` (a prompt or chat as the generation routes would encode it, and back), and
`POST /reset_prefix_cache` (vLLM's: forget every cached prefix block).
"""

from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi.responses import Response

from gemma4_jax.serving import api_requests
from gemma4_jax.serving.api_errors import error_response
from gemma4_jax.serving.api_requests import TokenBudget, chat_prompt, text_prompts
from gemma4_jax.serving.api_state import State
from gemma4_jax.serving.protocol import (
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeRequest,
    bad_request,
)

router = APIRouter()


@router.get("/health")
async def health(state: State) -> Response:
    if state.ready:
        return Response(status_code=200)
    reason = ("draining" if state.draining else "the model failed to load" if state.load_error else
              "warming up" if state.warming_up else "loading")
    return error_response(503, f"not ready: {reason}", "service_unavailable", "not_ready")


@router.get("/v1/models")
async def models(state: State) -> dict:
    engine = state.require_ready()
    name = state.config.served_model_name
    return {
        "object": "list",
        "data": [
            {
                "id": name,
                "object": "model",
                "created": int(time.time()),
                "owned_by": "gemma4-jax",
                "root": name,
                "max_model_len": engine.max_model_len,
            }
        ],
    }


@router.get("/metrics")
async def metrics(state: State) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.post("/reset_prefix_cache")
async def reset_prefix_cache(state: State) -> Response:
    """Forget every cached prefix block (benchmarks measuring cold prefills; after changing what a prompt means).
    Running requests keep their pages. 200 with an empty body, as vLLM answers. Like every POST here, it must be
    declared JSON (`Content-Type: application/json`, body or not): the guard refuses untyped cross-origin POSTs."""
    engine = state.require_ready()
    await engine.reset_prefix_cache()
    return Response(status_code=200)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, state: State) -> dict:
    """`{"prompt"}` (text) or `{"messages"}` (a chat, rendered as /v1/chat/completions renders it, `tools` and
    media placeholders included) -> the token ids; at most `ServerConfig.max_tokenize_tokens` of them."""
    engine = state.require_ready()
    state.check_model(body.model)
    if state.tokenizer is None:
        raise bad_request("this model has no tokenizer")
    if isinstance(body, TokenizeChatRequest):
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
        budget = TokenBudget("messages", state.config.max_tokenize_tokens)
        ids, _ = await chat_prompt(
            state, body.messages, body.add_generation_prompt, tools, body.chat_template_kwargs, budget
        )
    else:
        budget = TokenBudget("prompt", state.config.max_tokenize_tokens)
        [ids], _ = await text_prompts(state, body.prompt, budget, body.add_special_tokens)
    budget.check(ids)
    return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, state: State) -> dict:
    engine = state.require_ready()
    state.check_model(body.model)
    vocab = engine.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", "tokens")
    if state.tokenizer is None:
        raise bad_request("this model has no tokenizer")
    return {"prompt": await api_requests.detokenize(state, body.tokens)}
