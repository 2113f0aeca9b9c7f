r"""Gemma 4's tool-call grammar: model output <-> OpenAI `tool_calls`.

The syntax is Gemma 4's, as transformers 5.23 parses it (`transformers/cli/serving/utils.py`,
`_RESPONSE_TEMPLATE_FALLBACKS["gemma4"]`: open `<|tool_call>call:(?P<name>\w+)`, close `<tool_call|>`, JSON content
with unquoted keys and `<|"|>` as the string delimiter; a model turn that made calls ends with `<|tool_response>`)
and as the checkpoint's chat template writes calls into the history (`format_argument`: strings wrapped in
`<|"|>`, true/false, `{key:value,...}` with bare keys, `[a,b]`, numbers bare):

    <|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3,metric:true}<tool_call|>

The markers are special tokens of the Gemma 4 tokenizer: the server parses text decoded with them kept.
`ToolCallParser` splits a growing output into content and calls (streamed or at the end); the chat route
(`routes_chat.py`) turns them into messages and deltas.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any

TOOL_CALL_START = "<|tool_call>"
TOOL_CALL_END = "<tool_call|>"
TOOL_RESPONSE_START = "<|tool_response>"
STRING_DELIM = '<|"|>'

_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_BARE_KEY = re.compile(r"[^\s:{}\[\],<>\"]+")
_CALL_NAME = re.compile(r"call:([A-Za-z0-9_.\-]{1,64})\{")
_LITERALS = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


class ToolCallSyntaxError(ValueError):
    """Text between the tool-call markers that is not `call:NAME{...}` in Gemma 4's argument syntax."""


def _parse_value(text: str, i: int) -> tuple[Any, int]:
    """One Gemma 4 argument value starting at text[i] (after blanks) -> (value, index after it)."""
    while i < len(text) and text[i].isspace():
        i += 1
    if text.startswith(STRING_DELIM, i):
        end = text.find(STRING_DELIM, i + len(STRING_DELIM))
        if end < 0:
            raise ToolCallSyntaxError(f"unterminated {STRING_DELIM} string at {i}")
        return text[i + len(STRING_DELIM) : end], end + len(STRING_DELIM)
    if i >= len(text):
        raise ToolCallSyntaxError("a value is missing at the end")
    char = text[i]
    if char == '"':  # a JSON string (models sometimes fall back to them)
        try:
            return json.JSONDecoder().raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise ToolCallSyntaxError(f"bad JSON string at {i}: {e.msg}") from None
    if char == "{":
        return _parse_object(text, i)
    if char == "[":
        items, i = [], i + 1
        while True:
            while i < len(text) and text[i].isspace():
                i += 1
            if text.startswith("]", i):
                return items, i + 1
            if items:
                if not text.startswith(",", i):
                    raise ToolCallSyntaxError(f"expected ',' or ']' at {i}")
                i += 1
            value, i = _parse_value(text, i)
            items.append(value)
    number = _NUMBER.match(text, i)
    if number:
        literal = number.group()
        return (float(literal) if any(c in literal for c in ".eE") else int(literal)), number.end()
    word = _BARE_KEY.match(text, i)
    if word and word.group() in _LITERALS:
        return _LITERALS[word.group()], word.end()
    raise ToolCallSyntaxError(f"unexpected {text[i : i + 10]!r} at {i}")


def _parse_object(text: str, i: int) -> tuple[dict[str, Any], int]:
    """`{key:value,...}` starting at text[i] == '{' (keys bare or `<|"|>`-quoted) -> (dict, index after '}')."""
    out: dict[str, Any] = {}
    i += 1
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if text.startswith("}", i):
            return out, i + 1
        if out:
            if not text.startswith(",", i):
                raise ToolCallSyntaxError(f"expected ',' or '}}' at {i}")
            i += 1
            while i < len(text) and text[i].isspace():
                i += 1
        if text.startswith(STRING_DELIM, i) or text.startswith('"', i):
            key, i = _parse_value(text, i)
        else:
            match = _BARE_KEY.match(text, i)
            if not match:
                raise ToolCallSyntaxError(f"expected a key at {i}")
            key, i = match.group(), match.end()
        while i < len(text) and text[i].isspace():
            i += 1
        if not text.startswith(":", i):
            raise ToolCallSyntaxError(f"expected ':' after key {key!r}")
        out[str(key)], i = _parse_value(text, i + 1)


def parse_tool_call(body: str) -> tuple[str, dict[str, Any]]:
    """The text between `<|tool_call>` and `<tool_call|>` -> (function name, arguments)."""
    match = _CALL_NAME.match(body.strip())
    if not match:
        raise ToolCallSyntaxError(f"a tool call must look like call:NAME{{...}}, got {body[:40]!r}")
    text = body.strip()
    arguments, end = _parse_object(text, match.end() - 1)
    if text[end:].strip():
        raise ToolCallSyntaxError(f"text after the arguments: {text[end : end + 20]!r}")
    return match.group(1), arguments


def format_tool_arguments(arguments: Any) -> str:
    """Arguments as the chat template writes them into a model turn (the inverse of `parse_tool_call`)."""
    if isinstance(arguments, str):
        return STRING_DELIM + arguments + STRING_DELIM
    if isinstance(arguments, bool):
        return "true" if arguments else "false"
    if arguments is None:
        return "null"
    if isinstance(arguments, dict):
        return "{" + ",".join(f"{k}:{format_tool_arguments(v)}" for k, v in sorted(arguments.items())) + "}"
    if isinstance(arguments, list | tuple):
        return "[" + ",".join(format_tool_arguments(v) for v in arguments) + "]"
    return str(arguments)


@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = dataclasses.field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        out = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)},
        }
        return out if index is None else {"index": index, **out}


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (it may still become one)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ToolCallParser:
    """Splits a growing model output into content and Gemma 4 tool calls, for streaming and at the end.

    Feed it the cumulative text (decoded with special tokens kept); each `feed` returns the new content and the
    tool calls completed since the last one. Text that may be the start of a call is held back until known. A call
    that does not parse stays in the content as text (the client sees what the model wrote, never an error), and
    so does an unfinished call at the end. Anything after `<|tool_response>` (where the model hands over to the
    tool) is dropped, and so is anything after the `max_calls`-th call (`parallel_tool_calls: false`).
    """

    def __init__(self, prefix: str = "", max_calls: int | None = None):
        self.prefix = prefix  # text already in the model turn before generation
        self.max_calls = max_calls
        self._done = 0  # characters of prefix + text consumed
        self._ended = False
        self.calls: list[ToolCall] = []
        self.content = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        if self._ended:
            return "", []
        full = self.prefix + text
        stop = full.find(TOOL_RESPONSE_START, self._done)
        if stop >= 0:
            full, final, self._ended = full[:stop], True, True
        content, calls = [], []
        while True:
            rest = full[self._done :]
            start = rest.find(TOOL_CALL_START)
            if start < 0:
                keep = 0 if final else max(_partial_suffix(rest, m) for m in (TOOL_CALL_START, TOOL_RESPONSE_START))
                content.append(rest[: len(rest) - keep])
                self._done += len(rest) - keep
                break
            end = rest.find(TOOL_CALL_END, start + len(TOOL_CALL_START))
            if end < 0:
                if final:  # cut off inside a call: show what was written
                    content.append(rest)
                    self._done += len(rest)
                else:
                    content.append(rest[:start])
                    self._done += start
                break
            content.append(rest[:start])
            try:
                calls.append(ToolCall(*parse_tool_call(rest[start + len(TOOL_CALL_START) : end])))
            except ToolCallSyntaxError:
                content.append(rest[start : end + len(TOOL_CALL_END)])
            self._done += end + len(TOOL_CALL_END)
            if self.max_calls is not None and len(self.calls) + len(calls) >= self.max_calls:
                final = True  # one call was asked for: the rest of the turn is not the client's
                break
        if final:
            self._ended = True
        delta = "".join(content)
        self.content += delta
        self.calls += calls
        return delta, calls
