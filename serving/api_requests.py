"""From an HTTP request to engine requests and back, shared by the generation routes.

Everything that can fail is checked here before anything is sent (sampling values, the text, the chat template,
the media, the context length, admission), so that errors always arrive as a status with the OpenAI envelope and
never as a half-written stream: `build_sampling_params`, `text_prompts` / `chat_prompt`, `build_engine_requests`,
`submit`. Then `collect` waits for a non-streamed request's outputs (aborting them if the client goes away) and
`check_finished` turns an output cut by a drain into a 503.

The CPU work of a request (tokenizing, rendering the chat template, decoding media) runs in the server's prep
threads (`ServerState.run_prep`), never on the event loop, and is bounded: a text that cannot fit the context (or
the /tokenize cap) by its length alone, and a chat whose images cannot fit by their headers, are refused before
that work is done. Client text with a lone UTF-16 surrogate (possible in JSON as a `\\ud800` escape, not encodable
as UTF-8) is a 400 naming the field.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from fastapi import Request
from starlette.types import Receive

from gemma4_jax.serving import media_decode, mm_inputs
from gemma4_jax.serving.api_errors import engine_fault, engine_stopped
from gemma4_jax.serving.api_state import ServerConfig, ServerState
from gemma4_jax.serving.async_engine import (
    AsyncEngine,
    EngineError,
    EngineRequest,
    EngineStopped,
    NeverAdmitted,
    QueueFull,
    RequestGroup,
)
from gemma4_jax.serving.engine import RequestOutput, TokenLogprob
from gemma4_jax.serving.protocol import APIError, ChatCompletionRequest, CompletionRequest, bad_request
from gemma4_jax.serving.sampling import SamplingParams
from gemma4_jax.serving.structured import StructuredOutputs, check_grammar
from gemma4_jax.serving.tokenizer import TooManyTokens

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
    fields["structured_outputs"] = structured_outputs(body)
    try:
        return SamplingParams(**fields)
    except ValueError as e:
        field = str(e).split(" ", 1)[0]
        raise bad_request(str(e), field if field in _SAMPLING_FIELDS else None) from None


_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
_BACKENDS = {None, "", "auto", "guidance", "llguidance"}


def structured_outputs(body: CompletionRequest | ChatCompletionRequest) -> StructuredOutputs | None:
    """The request's output constraint from response_format, structured_outputs or guided_* (one source at most),
    checked now: a malformed constraint or a grammar that does not compile is a 400 naming its field."""
    if body.guided_decoding_backend not in _BACKENDS:
        raise bad_request(f"guided_decoding_backend {body.guided_decoding_backend!r} is not available; this server "
                          "enforces structured outputs with llguidance", "guided_decoding_backend")
    sources: list[tuple[str, dict[str, Any]]] = []
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        sources.append(("response_format", {"json_object": True}))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.json_schema is None:
            raise bad_request("response_format of type json_schema needs json_schema.schema", "response_format")
        sources.append(("response_format", {"json": fmt.json_schema.json_schema}))
    if body.structured_outputs is not None:
        spec = body.structured_outputs.model_dump(by_alias=True, exclude_none=True)
        sources.append(("structured_outputs", {k: v for k, v in spec.items() if v is not False}))
    for field, kind in _GUIDED.items():
        value = getattr(body, field)
        if value is not None:
            sources.append((field, {kind: value}))
    if not sources:
        return None
    if len(sources) > 1:
        raise bad_request(f"give one structured-output constraint; got {[f for f, _ in sources]}", sources[1][0])
    field, spec = sources[0]
    try:
        constraint = StructuredOutputs.from_value(spec)
        check_grammar(constraint)
    except ValueError as e:
        raise bad_request(f"{field}: {e}", field) from None
    return constraint


def context_error(
    field: str, max_model_len: int, prompt_tokens: int, completion_tokens: int, at_least: bool = False
) -> APIError:
    """The 400 for a request over the context, naming both counts ("at least" when the prompt was judged before it
    was tokenized in full)."""
    least = "at least " if at_least else ""
    return bad_request(
        f"this model's maximum context length is {max_model_len} tokens, but the request asks for {least}"
        f"{prompt_tokens + completion_tokens} tokens ({least}{prompt_tokens} in the prompt, {completion_tokens} for "
        f"the completion); shorten the prompt or lower max_tokens",
        field,
        "context_length_exceeded",
    )


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
    if params.seed is not None and params.seed + n - 1 >= 2**64:
        raise bad_request(
            f"seed {params.seed} is too large for n={n}: copy i of a request samples with seed + i, and seeds must "
            f"be below 2**64; use a seed of at most {2**64 - n}",
            "seed",
        )
    requests = []
    for p, ids in enumerate(prompts):
        if not ids:
            raise bad_request("the prompt is empty", prompt_field)
        wanted = max_tokens if max_tokens is not None else max_model_len - len(ids)
        if wanted < 1 or len(ids) + wanted > max_model_len:
            raise context_error(prompt_field, max_model_len, len(ids), max(wanted, 0))
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


def check_unicode(value: Any, field: str) -> None:
    """400 naming the field (a dotted path, `messages.0.content`) when a string in `value`, a key included, holds a
    lone UTF-16 surrogate: no tokenizer can encode it, and it would otherwise surface as an opaque codec error."""
    stack = [(value, field)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if item.isascii():
                continue
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as e:
                raise bad_request(
                    f"{path} holds a lone UTF-16 surrogate (U+{ord(item[e.start]):04X} at character {e.start}), "
                    "which is not valid Unicode text; send text in UTF-8, or surrogate pairs as \\uD83D\\uDE00",
                    path,
                ) from None
        elif isinstance(item, dict):
            for key, v in item.items():
                stack.append((key, f"{path}.{key}" if isinstance(key, str) and key.isascii() else path))
                stack.append((v, f"{path}.{key}"))
        elif isinstance(item, list | tuple):
            stack.extend((v, f"{path}.{i}") for i, v in enumerate(item))


@dataclasses.dataclass(frozen=True)
class TokenBudget:
    """What a prompt may take: `limit` tokens, or the error that says so (a generation route: the context less
    max_tokens; /tokenize: its cap)."""

    field: str  # the request field holding the prompt
    limit: int
    max_model_len: int | None = None  # set for generation routes: the refusal is a context-length error
    max_tokens: int | None = None

    @classmethod
    def for_generation(cls, field: str, max_model_len: int, max_tokens: int | None) -> TokenBudget:
        return cls(field, max_model_len - (max_tokens or 1), max_model_len, max_tokens)

    def refuse(self, num_tokens: int, at_least: bool) -> APIError:
        if self.max_model_len is not None:
            return context_error(self.field, self.max_model_len, num_tokens, self.max_tokens or 1, at_least)
        least = "at least " if at_least else ""
        return bad_request(
            f"the prompt is {least}{num_tokens} tokens, over this server's limit of {self.limit} for /tokenize",
            self.field,
        )

    def precheck(self, state: ServerState, text: str) -> None:
        """Refuse a text that is too long by its length alone, before it is tokenized (the work bound)."""
        least = state.min_tokens(text)
        if least > self.limit:
            raise self.refuse(least, at_least=True)

    def check(self, ids: Sequence[int]) -> None:
        if len(ids) > self.limit:
            raise self.refuse(len(ids), at_least=False)


def _text_prompts(
    state: ServerState, prompt: str | list, budget: TokenBudget, add_special_tokens: bool
) -> tuple[list[list[int]], list[str]]:
    # In a prep thread: see text_prompts.
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt is empty", budget.field)
    if isinstance(prompt[0], int):
        prompt = [prompt]
    tokenizer = state.tokenizer
    ids, texts = [], []
    for p, item in enumerate(prompt):
        if isinstance(item, str):
            if tokenizer is None:
                raise bad_request("this model has no tokenizer: send token ids as the prompt", budget.field)
            check_unicode(item, budget.field if len(prompt) == 1 else f"{budget.field}.{p}")
            budget.precheck(state, item)
            try:
                ids.append(tokenizer.encode(item, add_special_tokens=add_special_tokens, max_tokens=budget.limit))
            except TooManyTokens as e:
                raise budget.refuse(e.num_tokens, at_least=True) from None
            texts.append(item)
        else:
            vocab = state.engine.vocab_size
            bad = [t for t in item if not 0 <= t < vocab]
            if bad:
                raise bad_request(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})", budget.field)
            ids.append(list(item))
            texts.append(tokenizer.decode(item, skip_special_tokens=False) if tokenizer is not None else "")
    return ids, texts


async def text_prompts(
    state: ServerState, prompt: str | list, budget: TokenBudget, add_special_tokens: bool = True
) -> tuple[list[list[int]], list[str]]:
    """A `prompt` field (str, [str], [int], [[int]]) -> token ids per prompt and their text (for echo), worked out
    in a prep thread; a text too long for `budget` by its length alone is refused before it is tokenized."""
    return await state.run_prep(_text_prompts, state, prompt, budget, add_special_tokens)


def _chat_prompt(
    state: ServerState,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None,
    template_kwargs: dict[str, Any] | None,
    forced: str,
    budget: TokenBudget,
) -> tuple[list[int], mm_inputs.MediaInputs | None]:
    # In a prep thread: see chat_prompt.
    check_unicode(messages, "messages")
    check_unicode(tools, "tools")
    check_unicode(template_kwargs, "chat_template_kwargs")
    tokenizer, split = state.tokenizer, state.config.split_special_tokens
    messages, template_kwargs = template_messages(messages), dict(template_kwargs or {})
    media = None
    try:
        if media_decode.has_media_parts(messages):
            ids, media = state.media_processor.process_chat(
                messages,
                state.config.media_limits,
                allow_local=False,
                split_special_tokens=split,
                max_prompt_tokens=budget.limit,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                **template_kwargs,
            )
        else:
            if split:
                messages, tools, template_kwargs = tokenizer.hide_special_text((messages, tools, template_kwargs))
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tools=tools, **template_kwargs
            )
            if "\ue000" not in text:  # hidden special-token text (a sentinel) is longer than its tokens justify
                budget.precheck(state, text)
            ids = tokenizer.encode_chat_text(text, max_tokens=budget.limit)
    except (mm_inputs.PromptTooLong, TooManyTokens) as e:
        raise budget.refuse(e.num_tokens, at_least=True) from None
    except (ValueError, TypeError, LookupError, ArithmeticError) as e:
        # Any failure of the template on these messages (a check it raises, or a Python error on values it did not
        # expect), and bad media, is the request's fault.
        raise bad_request(str(e) or f"the chat template failed: {type(e).__name__}", "messages") from None
    if forced:
        ids = ids + tokenizer.encode(forced, add_special_tokens=False)
    return ids, media


async def chat_prompt(
    state: ServerState,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None,
    template_kwargs: dict[str, Any] | None,
    budget: TokenBudget,
    forced: str = "",
) -> tuple[list[int], mm_inputs.MediaInputs | None]:
    """A chat (text, images, audio) rendered by the checkpoint's template and encoded -> (prompt ids, media or
    None), worked out in a prep thread; `forced` (a tool call opened by tool_choice) is appended.

    Special-token strings in the messages are plain text unless `ServerConfig.split_special_tokens` is off. A chat
    too long for `budget` by its text length, or by its images' headers, is refused before the rest of the work.
    """
    return await state.run_prep(
        _chat_prompt, state, messages, add_generation_prompt, tools, template_kwargs, forced, budget
    )


async def detokenize(state: ServerState, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """Ids -> text, in a prep thread (a long list is CPU work)."""
    return await state.run_prep(state.tokenizer.decode, list(ids), skip_special_tokens=skip_special_tokens)


# ----------------------------------------------------------------------------------------------------------------------
# Running them
# ----------------------------------------------------------------------------------------------------------------------


async def submit(
    state: ServerState, engine: AsyncEngine, requests: Sequence[EngineRequest], arrival: float
) -> RequestGroup:
    """Admit `requests` (all or none) -> their group; 429 when the server is full for now, 503 when it is draining
    or the engine is not running, 400 when the engine refuses one or the request alone is over a bound (more
    sequences than the queue holds, more tokens than the budget), which no retry can change."""
    if state.draining:
        raise APIError(503, "the server is shutting down", "service_unavailable", code="draining")
    try:
        return await engine.add(requests, arrival)
    except NeverAdmitted as e:
        state.metrics.requests_rejected.labels("too_large").inc()
        raise bad_request(str(e), "n" if e.bound == "requests" else "max_tokens") from None
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
