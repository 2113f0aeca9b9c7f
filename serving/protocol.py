"""The OpenAI wire format of the HTTP server: request schemas (pydantic), the error envelope, response helpers.

Schemas check types and shapes; value ranges are checked once, by `SamplingParams` (which names the field), so the
server and the offline `LLM` refuse the same requests with the same messages. The ranges are still advertised in
the OpenAPI schema (with the running server's limits, `advertise_limits`), so that it describes valid requests.
Unknown fields are ignored, as OpenAI clients expect (they send new fields before servers know them).

Gemma 4's tool-call syntax, which turns model output into OpenAI `tool_calls`, is in `tool_calls.py`.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from gemma4_jax.serving.sampling import MAX_LOGPROBS

# A logprob of -inf (a token the sampler could never pick) is not valid JSON; vLLM clamps it the same way.
MIN_LOGPROB = -9999.0


# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered in the OpenAI envelope: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def envelope(self) -> dict[str, Any]:
        return error_envelope(self.message, self.type, self.param, self.code)


# A Python object's default repr ("<_io.BytesIO object at 0x7f3a...>") in an error message: its heap address tells a
# client about the server's memory layout and nothing about the request.
_HEAP_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def error_envelope(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    message = _HEAP_ADDRESS.sub("", message)
    if not message.isascii():  # a lone surrogate from client text would make the JSON body unencodable (a 500)
        message = message.encode("utf-8", "replace").decode("utf-8")
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def engine_fault(e: Exception) -> APIError:
    """The engine failed while running the request: the server's fault."""
    return APIError(500, str(e), "server_error", code="engine_error")


def engine_stopped(e: Exception) -> APIError:
    """The engine thread is not running (shutting down, or dead): try another replica."""
    return APIError(503, str(e), "service_unavailable", code="engine_stopped")


def aborted(e: Exception | None = None) -> APIError:
    """The request was ended by the end of a drain: try another replica."""
    message = str(e) if e is not None else "the request was aborted: the server is shutting down"
    return APIError(503, message, "service_unavailable", code="aborted")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


# --------------------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------------------


# JSON-schema pieces that describe a valid request exactly enough for clients and fuzzers (positive generation) to
# produce accepted bodies. They are advertised in the OpenAPI schema; where a value range is involved, enforcing it
# stays with `SamplingParams` (one message per field for the server and the offline LLM). Limits that depend on the
# running server (n, max_tokens, vocabulary, stop sequences, the model name) are filled in by `advertise_limits`.

# OpenAI's rule for function names (also what Gemma 4's `call:NAME{` needs: no '{' or whitespace in a name).
FUNCTION_NAME_PATTERN = r"^[A-Za-z0-9_.\-]{1,64}$"

_TEXT_PART = {
    "type": "object",
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    "required": ["type", "text"],
}
_CONTENT = {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}]}
_TOOL_CALL = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "pattern": FUNCTION_NAME_PATTERN},
                "arguments": {"type": "string", "description": "a JSON object, as a string"},
            },
            "required": ["name", "arguments"],
        },
    },
    "required": ["id", "type", "function"],
}
MESSAGE_SCHEMA = {
    "anyOf": [
        {
            "type": "object",
            "properties": {"role": {"enum": ["system", "developer", "user"]}, "content": _CONTENT},
            "required": ["role", "content"],
        },
        {
            "type": "object",
            "properties": {
                "role": {"const": "assistant"},
                "content": _CONTENT,
                "tool_calls": {"type": "array", "items": _TOOL_CALL},
            },
            "required": ["role", "content"],
        },
        {
            "type": "object",
            "properties": {
                "role": {"const": "assistant"},
                "content": {"type": "null"},
                "tool_calls": {"type": "array", "items": _TOOL_CALL, "minItems": 1},
            },
            "required": ["role", "content", "tool_calls"],
        },
        {
            "type": "object",
            "properties": {"role": {"const": "tool"}, "content": _CONTENT, "tool_call_id": {"type": "string"}},
            "required": ["role", "content", "tool_call_id"],
        },
    ]
}
# Messages are validated by `validate_messages` and the chat template (which may know roles OpenAI does not), so
# the schema describes them without pydantic enforcing this shape.
Messages = Annotated[list[dict[str, Any]], WithJsonSchema({"type": "array", "items": MESSAGE_SCHEMA, "minItems": 1})]


def _advertised(default: Any = None, **schema: Any) -> Any:
    """A field whose JSON schema carries `schema` (ranges, lengths) that the server checks after parsing."""
    return Field(default, json_schema_extra=schema)


def _template_kwargs() -> Any:
    return _advertised(
        properties={"enable_thinking": {"type": "boolean"}},
        additionalProperties=False,
        description="extra chat-template variables",
    )


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")  # kept for the chat template (e.g. Gemma 4's `response`)
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of the arguments")
    strict: bool | None = None


class ChatTool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str | None = Field(None, max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema", description="the JSON schema of the output")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: plain text, any JSON object, or JSON valid for a schema (enforced by a grammar)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(BaseModel):
    """vLLM's `structured_outputs`: exactly one constraint (serving/structured.py)."""

    model_config = ConfigDict(extra="forbid")
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class _GenerationRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI's, plus vLLM's sampling extensions)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = _advertised(1, minimum=1)
    max_tokens: int | None = _advertised(minimum=1)
    temperature: float | None = _advertised(minimum=0, maximum=1e4)
    top_p: float | None = _advertised(exclusiveMinimum=0, maximum=1)
    top_k: int | None = _advertised(minimum=-1, maximum=2**31 - 1)
    min_p: float | None = _advertised(minimum=0, maximum=1)
    # Accepted: [-2**63, 2**64); advertised: what a double holds exactly, so generators do not round past a bound.
    seed: int | None = _advertised(minimum=-(2**53), maximum=2**53)
    stop: str | list[str] | None = Field(None, description="up to the server's limit of non-empty strings")
    stop_token_ids: list[int] | None = _advertised(items={"type": "integer", "minimum": 0})
    ignore_eos: bool = False
    presence_penalty: float | None = _advertised(minimum=-2, maximum=2)
    frequency_penalty: float | None = _advertised(minimum=-2, maximum=2)
    repetition_penalty: float | None = _advertised(exclusiveMinimum=0, maximum=1e4)
    logit_bias: dict[str, float] | None = _advertised(maxProperties=0, description="not supported: empty or null")
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Structured outputs (one source at most): OpenAI's response_format, vLLM's structured_outputs, or its older
    # guided_* fields. guided_decoding_backend is accepted for vLLM clients when it names llguidance (or nothing).
    # The vLLM extensions are left out of /openapi.json (docs/server.md documents them): a schema cannot say "a
    # regex / grammar that compiles" or "one of these fields at most", so a generator fed the schema would mostly
    # build requests that are 400s; OpenAI's response_format is advertised.
    response_format: ResponseFormat | None = None
    structured_outputs: SkipJsonSchema[StructuredOutputsField | None] = None
    guided_json: SkipJsonSchema[dict[str, Any] | str | None] = None
    guided_regex: SkipJsonSchema[str | None] = None
    guided_choice: SkipJsonSchema[list[str] | None] = None
    guided_grammar: SkipJsonSchema[str | None] = None
    guided_decoding_backend: SkipJsonSchema[str | None] = None


_PROMPT_FORMS = {
    str: TypeAdapter(list[str]),
    list: TypeAdapter(list[list[int]]),
    int: TypeAdapter(list[int]),
}


def _prompt_form(value: Any, handler: Any) -> Any:
    """The `prompt` union, validated as the form its first element names. Pydantic's own union tries every member
    in two modes: about 0.9 s on a 4 MiB body of token ids, on the event loop; one member takes 0.05 s."""
    if isinstance(value, str) or not isinstance(value, list) or not value:
        return handler(value)
    adapter = _PROMPT_FORMS.get(type(value[0]), _PROMPT_FORMS[int])
    try:
        return adapter.validate_python(value)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise ValueError(f"prompt.{where}: {first['msg']}") from None


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, a list of strings, a list of token ids, or a list of token-id lists"
    )

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _check_prompt(cls, value: Any, handler: Any) -> Any:
        return _prompt_form(value, handler)

    logprobs: int | None = _advertised(minimum=0, maximum=MAX_LOGPROBS, description="top logprobs per token")
    echo: bool = Field(False, description="prepend the prompt (with `logprobs`: its logprobs too, the first null)")
    suffix: str | None = _advertised(maxLength=0, description="not supported: empty or null")
    best_of: int | None = _advertised(type="null", description="accepted only when equal to n")


class ChatCompletionRequest(_GenerationRequest):
    # top_logprobs only together with logprobs=true (OpenAI's rule)
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "anyOf": [
                {"properties": {"top_logprobs": {"type": "null"}}},
                {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]},
            ]
        },
    )

    messages: Messages
    max_completion_tokens: int | None = _advertised(minimum=1)
    logprobs: bool = False
    top_logprobs: int | None = _advertised(minimum=0, maximum=MAX_LOGPROBS, description="needs logprobs=true")
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = Field(None, description="false: at most one tool call (default: several)")
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = _template_kwargs()


def _exactly_one(data: Any) -> Any:
    if isinstance(data, dict) and "prompt" in data and "messages" in data:
        raise ValueError("give exactly one of 'prompt' and 'messages'")
    return data


class TokenizeCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True

    check = model_validator(mode="before")(classmethod(lambda cls, data: _exactly_one(data)))


class TokenizeChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: Messages
    add_generation_prompt: bool = True
    tools: list[ChatTool] | None = None
    chat_template_kwargs: dict[str, Any] | None = _template_kwargs()

    check = model_validator(mode="before")(classmethod(lambda cls, data: _exactly_one(data)))


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int] = _advertised(..., items={"type": "integer", "minimum": 0})


def advertise_limits(
    schemas: dict[str, Any],
    *,
    model_name: str,
    max_n: int,
    max_prompts: int,
    max_stop: int,
    max_stop_chars: int,
    max_model_len: int | None = None,
    vocab_size: int | None = None,
) -> None:
    """Write the running server's limits into the OpenAPI `components.schemas` (in place)."""
    stop_string = {"type": "string", "minLength": 1, "maxLength": max_stop_chars}
    token = {"type": "integer", "minimum": 0, **({"maximum": vocab_size - 1} if vocab_size else {})}
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas[name]["properties"]
        props["model"] = {"anyOf": [{"enum": [model_name]}, {"type": "null"}], "title": "Model"}
        props["n"].update(minimum=1, maximum=max_n)
        props["stop"] = {
            "anyOf": [
                stop_string,
                {"type": "array", "items": stop_string, "maxItems": max_stop},
                {"type": "null"},
            ],
            "title": "Stop",
        }
        if vocab_size:
            props["stop_token_ids"]["items"] = token
        if max_model_len:
            for field in ("max_tokens", "max_completion_tokens"):
                if field in props:
                    props[field]["maximum"] = max_model_len - 1
    props = schemas["CompletionRequest"]["properties"]
    ids = {"type": "array", "items": token, "minItems": 1}
    if max_model_len:
        ids["maxItems"] = max_model_len - 1
    props["prompt"] = {
        "anyOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": max_prompts},
            ids,
            {"type": "array", "items": ids, "minItems": 1, "maxItems": max_prompts},
        ],
        "title": "Prompt",
        "description": props["prompt"].get("description", ""),
    }
    for name in ("TokenizeCompletionRequest", "TokenizeChatRequest", "DetokenizeRequest"):
        schemas[name]["properties"]["model"] = {"anyOf": [{"enum": [model_name]}, {"type": "null"}], "title": "Model"}
    if vocab_size:
        schemas["DetokenizeRequest"]["properties"]["tokens"]["items"] = token


# --------------------------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------------------------


def clamp_logprob(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


def _field_path(loc) -> list[str]:
    """A pydantic error location without "body" and the union-member tags pydantic inserts ("str",
    "literal['none','auto']", "NamedToolChoice", "TokenizeChatRequest"): the field path a client sent."""
    return [
        str(p)
        for p in loc
        if p != "body"
        and not (isinstance(p, str) and (p in _TYPE_NAMES or p[:1].isupper() or any(c in p for c in "[]'(")))
    ]


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """A pydantic/FastAPI error list -> (one readable message, the offending field as a dotted path)."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = _field_path(first.get("loc", ()))
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    parts = []
    for err in errors[:3]:
        where = ".".join(_field_path(err.get("loc", ()))) or "body"
        parts.append(f"{where}: {err.get('msg')}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "invalid request: " + "; ".join(parts) + more, param
