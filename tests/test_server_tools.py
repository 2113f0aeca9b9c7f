"""Gemma 4 tool calls on the server side, without a model: the parser of the `<|tool_call>call:NAME{...}<tool_call|>`
syntax, the OpenAI messages and stream deltas built from it (checked against the official `openai` client's
types), and the history conversion for chat templates. The live-server side is in test_server_features.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gemma4_jax.serving.api_requests import template_messages as _template_messages
from gemma4_jax.serving.async_engine import RequestGroup
from gemma4_jax.serving.engine import RequestOutput
from gemma4_jax.serving.reasoning import ReasoningParser
from gemma4_jax.serving.routes_chat import ChoiceParser
from gemma4_jax.serving.routes_chat import chat_chunks as _chat_chunks
from gemma4_jax.serving.routes_chat import chat_message as _chat_message
from gemma4_jax.serving.tool_calls import (
    TOOL_CALL_END,
    TOOL_CALL_START,
    TOOL_RESPONSE_START,
    ToolCallParser,
    ToolCallSyntaxError,
    format_tool_arguments,
    parse_tool_call,
)

Q = '<|"|>'  # Gemma 4's string delimiter token


def call(name: str, body: str) -> str:
    return f"{TOOL_CALL_START}call:{name}{body}{TOOL_CALL_END}"


def test_parse_arguments_in_gemma4_syntax():
    name, args = parse_tool_call(
        f'call:get_weather{{city:{Q}Paris, {{ "FR" }}{Q},days:3,metric:true,unit:null,scale:-1.5e3,'
        f"tags:[{Q}a{Q},2,[false]],where:{{lat:48.85,{Q}long name{Q}:{Q}x:y{Q}}}}}"
    )
    assert name == "get_weather"
    assert args == {
        "city": 'Paris, { "FR" }',  # delimiters, braces and quotes inside a <|"|> string are text
        "days": 3,
        "metric": True,
        "unit": None,
        "scale": -1500.0,
        "tags": ["a", 2, [False]],
        "where": {"lat": 48.85, "long name": "x:y"},
    }
    assert parse_tool_call("call:no_args{}") == ("no_args", {})
    assert parse_tool_call(' call:f{ a : "json string" , b:[ ] } ') == ("f", {"a": "json string", "b": []})
    for bad in ("get_weather{}", "call:f{a:}", "call:f{a:1", "call:f{a 1}", f"call:f{{a:{Q}open}}", "call:f{}x", ""):
        with pytest.raises(ToolCallSyntaxError):
            parse_tool_call(bad)


def test_round_trip_with_the_template_writer():
    args = {"s": "text with , and } and :", "n": 7, "f": 0.25, "b": False, "l": [1, "two", {"k": None}], "o": {}}
    body = "call:f{" + format_tool_arguments(args)[1:]
    assert parse_tool_call(body) == ("f", args)


def test_parser_splits_content_and_calls_at_any_chunking():
    text = (
        "Let me check."
        + call("get_weather", f"{{city:{Q}Paris{Q}}}")
        + "\n"
        + call("get_time", f"{{zone:{Q}CET{Q}}}")
        + TOOL_RESPONSE_START
        + "hallucinated tool output"
    )
    whole = ToolCallParser()
    content, calls = whole.feed(text, final=True)
    assert content == "Let me check.\n"
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    for step in (1, 2, 3, 7):  # streamed: nothing of a marker ever leaks into the content, whatever the split
        parser, contents, names = ToolCallParser(), [], []
        for end in range(step, len(text) + step, step):
            delta, new = parser.feed(text[:end], final=end >= len(text))
            contents.append(delta)
            names += [c.name for c in new]
            assert "<|" not in delta and "|>" not in delta
        assert "".join(contents) == "Let me check.\n" and names == ["get_weather", "get_time"]
    # A call cut off by max_tokens, and one that does not parse, stay visible as text.
    cut = ToolCallParser()
    assert cut.feed("a" + TOOL_CALL_START + "call:f{x:", final=False) == ("a", [])
    assert cut.feed("a" + TOOL_CALL_START + "call:f{x:1", final=True) == (TOOL_CALL_START + "call:f{x:1", [])
    broken = call("f", "{x:?}")
    assert ToolCallParser().feed("b" + broken, final=True) == ("b" + broken, [])
    # Text already in the model turn (a prompt that opened the call), continued by the model.
    forced = ToolCallParser(TOOL_CALL_START + "call:get_weather{")
    _, calls = forced.feed(f"city:{Q}Oslo{Q}}}{TOOL_CALL_END}", final=True)
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Oslo"})] and forced.content == ""
    # parallel_tool_calls false under "auto": the first call only, the rest of the turn dropped.
    single = ToolCallParser(max_calls=1)
    content, calls = single.feed("a" + call("f", "{}") + "b" + call("g", "{}"), final=True)
    assert content == "a" and [c.name for c in calls] == ["f"] and single.feed("more", final=True) == ("", [])


def _output(text: str, finish: str | None = None, tokens: int = 1) -> RequestOutput:
    return RequestOutput("r-0", None, [2], list(range(tokens)), text, finish, None, finished=finish is not None)


def test_chat_message_is_an_openai_tool_call_response():
    text = "Checking." + call("get_weather", f"{{city:{Q}Paris{Q},days:2}}")
    message, finish = _chat_message(_output(text, "stop"), ToolCallParser(), lambda t: t)
    assert finish == "tool_calls" and message["content"] == "Checking."
    response = ChatCompletion.model_validate(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        }
    )
    (tool_call,) = response.choices[0].message.tool_calls
    assert tool_call.type == "function" and tool_call.id.startswith("call_")
    assert tool_call.function.name == "get_weather"
    assert json.loads(tool_call.function.arguments) == {"city": "Paris", "days": 2}
    only_call, finish = _chat_message(_output(call("f", "{}"), "stop"), ToolCallParser(), lambda t: t)
    assert only_call["content"] is None and finish == "tool_calls"
    # cut by max_tokens: still "length"; no calls at all: plain content
    assert _chat_message(_output(call("f", "{}"), "length"), ToolCallParser(), lambda t: t)[1] == "length"
    assert _chat_message(_output("just text", "stop"), ToolCallParser(), str.upper) == (
        {"role": "assistant", "content": "JUST TEXT"},
        "stop",
    )


def test_streamed_tool_call_deltas_accumulate_like_the_openai_client():
    text = "Sure. " + call("get_weather", f"{{city:{Q}Rome{Q}}}") + call("get_time", "{}")

    async def run() -> list[dict]:
        group = RequestGroup(["r-0"], [1])
        chunks = _chat_chunks(None, group, {"id": "c", "created": 0, "model": "m"}, False, True, 1, [ToolCallParser()])
        for end in range(3, len(text) + 3, 3):
            group._put(0, _output(text[:end], "stop" if end >= len(text) else None, tokens=end))
        return [chunk async for chunk in chunks]

    chunks = [ChatCompletionChunk.model_validate(c) for c in asyncio.run(run())]
    assert chunks[0].choices[0].delta.role == "assistant"
    content, calls, finishes = "", {}, []
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:  # the accumulation the openai client documents
                entry = calls.setdefault(delta.index, {"id": delta.id, "name": "", "arguments": ""})
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    assert content == "Sure. " and finishes == ["tool_calls"]
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == [
        ("get_weather", {"city": "Rome"}),
        ("get_time", {}),
    ]
    assert all(c["id"].startswith("call_") for c in calls.values())
    assert chunks[-1].usage is not None and chunks[-1].choices == []


def test_history_tool_calls_reach_the_template_as_objects():
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "w", "arguments": '{"city": "Paris"}'}},
                {"id": "c2", "type": "function", "function": {"name": "v", "arguments": "not json"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    converted = _template_messages(messages)
    assert converted[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert converted[1]["tool_calls"][1]["function"]["arguments"] == "not json"  # left for the template
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'  # the input is not changed
    assert converted[2] == messages[2]


THOUGHT = "<|channel>thought\nThe user wants weather.<channel|>"


def test_reasoning_content_beside_content_and_tool_calls():
    parser = ChoiceParser(ToolCallParser(), ReasoningParser())
    text = THOUGHT + "Checking." + call("get_weather", f"{{city:{Q}Paris{Q},days:2}}")
    message, finish = _chat_message(_output(text, "stop"), parser, lambda t: t)
    assert finish == "tool_calls" and message["reasoning_content"] == "The user wants weather."
    assert message["content"] == "Checking." and len(message["tool_calls"]) == 1
    response = ChatCompletion.model_validate(
        {
            "id": "c",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        }
    )
    assert response.choices[0].message.model_extra["reasoning_content"] == "The user wants weather."
    # A tool-call marker inside the thought is reasoning, not a call.
    inside = ChoiceParser(ToolCallParser(), ReasoningParser())
    message, finish = _chat_message(
        _output(f"<|channel>thought\n{call('x', '{}')}<channel|>ok", "stop"), inside, lambda t: t
    )
    assert finish == "stop" and "tool_calls" not in message and message["content"] == "ok"
    # No thought (thinking off): no reasoning_content field, as vLLM.
    plain, _ = _chat_message(_output("just text", "stop"), ChoiceParser(None, ReasoningParser()), lambda t: t)
    assert plain == {"role": "assistant", "content": "just text"}


def test_streamed_reasoning_deltas():
    text = THOUGHT + '{"n": 3}'

    async def run() -> list[dict]:
        group = RequestGroup(["r-0"], [1])
        parsers = [ChoiceParser(None, ReasoningParser())]
        chunks = _chat_chunks(None, group, {"id": "c", "created": 0, "model": "m"}, False, False, 1, parsers)
        for end in range(2, len(text) + 2, 2):
            group._put(0, _output(text[:end], "stop" if end >= len(text) else None, tokens=end))
        return [chunk async for chunk in chunks]

    chunks = [ChatCompletionChunk.model_validate(c) for c in asyncio.run(run())]
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert reasoning == "The user wants weather." and content == '{"n": 3}'
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
