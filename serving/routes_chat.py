"""`/v1/chat/completions`: a chat (text, images, audio) rendered by the checkpoint's template, streamed as SSE on
request, with logprobs and tool calls.

With `tools` (and `tool_choice` not "none") the output is decoded with special tokens kept and split by a
`ToolCallParser` (`tool_calls.py`) into content and OpenAI `tool_calls`; generation stops where the model hands
over to the tool. `tool_choice` "required" or a named function is enforced by a grammar over Gemma 4's call syntax
and the tools' parameter schemas (`tool_grammar.py`): one call or several ("required", unless
`parallel_tool_calls` is false), arguments valid for their schema, their JSON types intact.

With the server's reasoning parser on (`--reasoning-parser gemma4`), the thought channel of a thinking model
(`chat_template_kwargs: {"enable_thinking": true}`) is split into `reasoning_content` (`reasoning.py`), and a
structured output or forced call binds the answer after it: the grammar lets an optional thought come first,
unless the prompt already closed it (thinking off).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from gemma4_jax.serving.api_requests import (
    TokenBudget,
    build_engine_requests,
    build_sampling_params,
    chat_prompt,
    check_finished,
    collect,
    submit,
)
from gemma4_jax.serving.api_sse import EventStream, sse_stream
from gemma4_jax.serving.api_state import ServerState, State
from gemma4_jax.serving.async_engine import RequestGroup
from gemma4_jax.serving.engine import RequestOutput, TokenLogprob
from gemma4_jax.serving.protocol import (
    ChatCompletionRequest,
    NamedToolChoice,
    bad_request,
    clamp_logprob,
    usage,
)
from gemma4_jax.serving.reasoning import ReasoningParser, prompt_closes_thought
from gemma4_jax.serving.sampling import MAX_LOGPROBS, SamplingParams
from gemma4_jax.serving.structured import StructuredOutputs, check_grammar
from gemma4_jax.serving.tool_calls import TOOL_RESPONSE_START, ToolCall, ToolCallParser

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, raw: Request, state: State) -> Response:
    arrival = time.monotonic()
    engine = state.require_ready()
    config = state.config
    state.check_model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_LOGPROBS:
        raise bad_request(
            f"top_logprobs must be an int in [0, {MAX_LOGPROBS}], got {body.top_logprobs}", "top_logprobs"
        )
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = build_sampling_params(
        body, config, (body.top_logprobs or 0) if body.logprobs else None, max_tokens, engine.vocab_size
    )
    if state.tokenizer is None:
        raise bad_request("this model has no tokenizer, so no chat template: use /v1/completions", "messages")
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
    forced = forced_tool_calls(body, tools)
    if forced is not None and params.structured_outputs is not None:
        raise bad_request(
            "tool_choice 'required' or a named function is a constraint on the output already: it cannot be "
            "combined with response_format or structured outputs",
            "tool_choice",
        )
    budget = TokenBudget.for_generation("messages", engine.max_model_len, max_tokens)
    ids, media = await chat_prompt(
        state, body.messages, body.add_generation_prompt, tools, body.chat_template_kwargs, budget
    )
    reasoning = state.config.reasoning_parser is not None
    params = constrain_answer(state, params, forced, reasoning, ids)
    parse_tools = bool(tools) and body.tool_choice != "none"
    if parse_tools or reasoning:
        # Tool-call and channel markers are special tokens: decode with them kept (the content is cleaned
        # afterwards, as the client asked); with tools, stop where the model hands over to the tool.
        stop = (*params.stop, TOOL_RESPONSE_START) if parse_tools else params.stop
        params = dataclasses.replace(params, skip_special_tokens=False, stop=stop or None)
    clean = state.strip_special if body.skip_special_tokens else (lambda text: text)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    requests = build_engine_requests(
        request_id, [ids], params, body.n, max_tokens, engine.max_model_len, "messages", media
    )
    group = await submit(state, engine, requests, arrival)
    meta = dict(id=request_id, created=int(time.time()), model=config.served_model_name)
    max_calls = 1 if body.parallel_tool_calls is False else None
    parsers = None
    if parse_tools or reasoning:
        parsers = [
            ChoiceParser(
                ToolCallParser(max_calls=max_calls) if parse_tools else None,
                ReasoningParser() if reasoning else None,
            )
            for _ in requests
        ]
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = chat_chunks(state, group, meta, body.logprobs, include_usage, len(ids), parsers, clean)
        return EventStream(sse_stream(chunks), lambda: engine.abort(group))
    outs = await collect(raw, group, engine)
    if outs is None:
        return Response(status_code=499)  # nobody is listening
    choices = []
    for i, out in enumerate(outs):
        check_finished(out)
        message, finish = chat_message(out, parsers[i] if parsers is not None else None, clean)
        choices.append(
            {
                "index": i,
                "message": message,
                "logprobs": chat_logprobs(state, out.logprobs) if body.logprobs else None,
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


def forced_tool_calls(body: ChatCompletionRequest, tools: list[dict[str, Any]] | None) -> StructuredOutputs | None:
    """tool_choice "required" or a named function -> the grammar constraint that forces Gemma 4 tool calls (one or
    several for "required", unless parallel_tool_calls is false; exactly one for a named function); None for
    "auto" / "none". A tool schema the grammar cannot enforce is a 400 naming it."""
    choice = body.tool_choice
    if choice in (None, "none", "auto"):
        return None
    if not tools:
        raise bad_request("tool_choice 'required' or a named function needs tools", "tool_choice")
    name = None
    if isinstance(choice, NamedToolChoice):
        names = [tool["function"]["name"] for tool in tools]
        if choice.function.name not in names:
            raise bad_request(
                f"tool_choice names {choice.function.name!r}, not one of the tools {names}", "tool_choice"
            )
        name = choice.function.name
    try:
        spec = StructuredOutputs(
            tool_calls={"tools": tools, "name": name, "parallel": body.parallel_tool_calls is not False}
        )
        check_grammar(spec)
    except ValueError as e:
        raise bad_request(f"tools: {e}", "tools") from None
    return spec


def constrain_answer(
    state: ServerState, params: SamplingParams, forced: StructuredOutputs | None, reasoning: bool, ids: list[int]
) -> SamplingParams:
    """The request's output constraint (a forced tool call, else its structured output), starting after an
    optional thought channel when the reasoning parser is on and the prompt left the model free to think."""
    spec = forced if forced is not None else params.structured_outputs
    if spec is None:
        return params
    if reasoning and not prompt_closes_thought(state.tokenizer.decode(ids[-32:], skip_special_tokens=False)):
        spec = dataclasses.replace(spec, reasoning=True)
        try:
            check_grammar(spec)
        except ValueError as e:
            raise bad_request(str(e), "tools" if forced is not None else None) from None
    return dataclasses.replace(params, structured_outputs=spec)


@dataclasses.dataclass
class ChoiceParser:
    """Splits one choice's output: the thought channel into reasoning (reasoning parser on), Gemma 4 tool calls into
    `tool_calls` (tools on), the rest into content. Fed the cumulative text, streamed or at the end."""

    tools: ToolCallParser | None = None
    reasoning: ReasoningParser | None = None

    def feed(self, text: str, final: bool = False) -> tuple[str, str, list[ToolCall]]:
        """-> (new reasoning, new content, tool calls completed since the last feed)."""
        thought = ""
        if self.reasoning is not None:
            thought, content = self.reasoning.feed(text, final)
            text = self.reasoning.content
            if self.tools is None:
                return thought, content, []
        content, calls = self.tools.feed(text, final)
        return thought, content, calls

    @property
    def content(self) -> str:
        return self.tools.content if self.tools is not None else self.reasoning.content

    @property
    def calls(self) -> list[ToolCall]:
        return self.tools.calls if self.tools is not None else []


def chat_message(
    out: RequestOutput, parser: ChoiceParser | ToolCallParser | None, clean: Callable[[str], str]
) -> tuple[dict[str, Any], str | None]:
    """A finished output -> (the assistant message, finish_reason); with a parser, its thought is split into
    `reasoning_content` and its tool calls out of the text (content null when nothing but calls was written)."""
    if parser is None:
        return {"role": "assistant", "content": out.text}, out.finish_reason
    if isinstance(parser, ToolCallParser):
        parser = ChoiceParser(tools=parser)
    parser.feed(out.text, final=True)
    content = clean(parser.content)
    message: dict[str, Any] = {"role": "assistant", "content": content if content.strip() or not parser.calls else None}
    if parser.reasoning is not None and parser.reasoning.reasoning is not None:
        message["reasoning_content"] = clean(parser.reasoning.reasoning)
    if not parser.calls:
        return message, out.finish_reason
    message["tool_calls"] = [call.to_openai() for call in parser.calls]
    return message, _tool_finish(out.finish_reason)


def _tool_finish(finish: str | None) -> str | None:
    # A turn that ended by handing over to the tools reports "tool_calls"; one cut by max_tokens stays "length".
    return "tool_calls" if finish == "stop" else finish


async def chat_chunks(
    state: ServerState | None,
    group: RequestGroup,
    meta: dict,
    want_logprobs: bool,
    include_usage: bool,
    prompt_tokens: int,
    parsers: Sequence[ChoiceParser | ToolCallParser] | None = None,
    clean: Callable[[str], str] = lambda text: text,
) -> AsyncIterator[dict]:
    """Chat chunks; with `parsers` the text is split into reasoning deltas (`reasoning_content`), content deltas
    and tool-call deltas (one per call, whole, once it is complete). `state` is only read for logprobs."""
    if parsers is not None:
        parsers = [ChoiceParser(tools=p) if isinstance(p, ToolCallParser) else p for p in parsers]
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
        check_finished(out)
        new_lps = (out.logprobs or [])[sent_lps[i] :] if want_logprobs else []
        finish = out.finish_reason if out.finished else None
        delta: dict[str, Any] = {}
        if parsers is not None:
            before = len(parsers[i].calls)
            thought, text, calls = parsers[i].feed(out.text, final=out.finished)
            text, thought = clean(text), clean(thought)
            if thought:
                delta["reasoning_content"] = thought
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
                    "logprobs": chat_logprobs(state, new_lps) if want_logprobs else None,
                    "finish_reason": finish,
                }
            ],
        }
    if include_usage:
        yield {**base, "choices": [], "usage": usage(prompt_tokens, sum(num_tokens))}


def chat_logprobs(state: ServerState, lps: Sequence[TokenLogprob]) -> dict[str, Any]:
    """Logprobs in the chat form: per token its text, logprob, UTF-8 bytes and top alternatives."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = state.token_text(token_id)
        return {"token": text, "logprob": clamp_logprob(logprob), "bytes": list(text.encode("utf-8"))}

    return {
        "content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps]
    }
