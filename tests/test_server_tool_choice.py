"""tool_choice "required" / a named function and Gemma 4 reasoning through a live server, with the `openai` client.

The server runs the tiny model (random weights) with a tokenizer holding Gemma 4's markers as special tokens and a
Gemma-4-shaped chat template (tests/test_tool_grammar.py), and `--reasoning-parser gemma4`. Forced calls always
come back as `tool_calls` whose arguments parse as JSON valid for the tool's schema, streamed or not; "auto" stays
unconstrained; the thinking switch reaches the template; conflicting or unenforceable requests are 400s.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from test_server import live_server
from test_tool_grammar import gemma4_marker_tokenizer

import gemma4_jax
from gemma4_jax.serving.server import ServerConfig, create_app

MODEL = "tiny-gemma4-chat"
S = {"type": "string", "maxLength": 5}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": S,
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                    "metric": {"type": "boolean"},
                },
                "required": ["city", "days"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "set_alarm",
            "parameters": {
                "type": "object",
                "properties": {
                    "hour": {"type": "integer", "minimum": 0, "maximum": 23},
                    "label": {"enum": ["work", "gym", None]},
                },
                "required": ["hour"],
            },
        },
    },
    {"type": "function", "function": {"name": "ping"}},
]
SCHEMAS = {
    t["function"]["name"]: t["function"].get("parameters", {"type": "object", "maxProperties": 0}) for t in TOOLS
}
ASK = [{"role": "user", "content": "Weather in Oslo?"}]


@pytest.fixture(scope="module")
def server():
    model = gemma4_jax.from_config("tiny", dtype="float32", seed=7)
    llm = gemma4_jax.LLM(
        model,
        tokenizer=gemma4_marker_tokenizer(),
        max_num_seqs=8,
        max_model_len=512,
        max_num_batched_tokens=64,
        compilation_cache=False,
    )
    app = create_app(llm, ServerConfig(served_model_name=MODEL, reasoning_parser="gemma4"))
    with live_server(app) as (url, _, _):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=600)


def _check_calls(message, expect_one: bool = False, name: str | None = None):
    calls = message.tool_calls
    assert calls and (not expect_one or len(calls) == 1), message
    for call in calls:
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])  # typed: an integer is an int, not "3"
        assert name is None or call.function.name == name
        assert call.id.startswith("call_") and call.type == "function"
    return calls


def _chat(client, **extra):
    request = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 400, "temperature": 3.0, **extra}
    return client.chat.completions.create(**request)


def test_required_and_named_tool_choice_always_call_with_typed_arguments(client):
    several = 0
    for seed in range(3):
        out = _chat(client, tool_choice="required", seed=seed)
        assert out.choices[0].finish_reason == "tool_calls"
        several = max(several, len(_check_calls(out.choices[0].message)))
        assert out.choices[0].message.content is None
    one = _chat(client, tool_choice="required", parallel_tool_calls=False, seed=5)
    _check_calls(one.choices[0].message, expect_one=True)
    named = _chat(client, tool_choice={"type": "function", "function": {"name": "set_alarm"}}, seed=6)
    _check_calls(named.choices[0].message, expect_one=True, name="set_alarm")
    assert named.choices[0].finish_reason == "tool_calls"


def test_streamed_forced_calls_accumulate_to_valid_arguments(client):
    stream = _chat(client, tool_choice="required", seed=11, stream=True)
    calls, finishes, content = {}, [], ""
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    assert finishes == ["tool_calls"] and calls and content == ""
    for entry in calls.values():
        jsonschema.validate(json.loads(entry["arguments"]), SCHEMAS[entry["name"]])


@pytest.mark.slow  # compiles the unconstrained step with logprobs: ~50 s on a loaded 2-core machine
def test_auto_stays_unconstrained(client):
    """The same seed with tool_choice "auto" and "none" samples the same tokens with the same log-probabilities: no
    grammar under "auto" (a grammar's mask would renormalise them). Equal to float32 rounding, not bit for bit: the
    second request finds the first one's prompt in the prefix cache, so its prefill runs in another shape."""
    kwargs = dict(seed=3, max_tokens=8, logprobs=True, extra_body={"ignore_eos": True})
    auto, none = _chat(client, tool_choice="auto", **kwargs), _chat(client, tool_choice="none", **kwargs)
    auto_lp, none_lp = auto.choices[0].logprobs.content, none.choices[0].logprobs.content
    assert [t.token for t in auto_lp] == [t.token for t in none_lp]
    assert [t.logprob for t in auto_lp] == pytest.approx([t.logprob for t in none_lp], rel=1e-5, abs=1e-6)


def test_thinking_switch_reaches_the_template(server, client):
    with httpx.Client(base_url=server, timeout=600) as http:

        def prompt(**kwargs) -> str:
            ids = http.post("/tokenize", json={"model": MODEL, "messages": ASK, **kwargs}).json()["tokens"]
            return gemma4_marker_tokenizer().decode(ids, skip_special_tokens=False)

        on, off = prompt(chat_template_kwargs={"enable_thinking": True}), prompt()
    assert "<|think|>" in on and on.endswith("<|turn>model\n")
    assert "<|think|>" not in off and off.endswith("<|channel>thought\n<channel|>")
    # Thinking on: the JSON answer may come after a thought (random weights may also think until max_tokens).
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"],
        "additionalProperties": False,
    }
    request = dict(
        model=MODEL,
        messages=ASK,
        max_tokens=40,
        temperature=3.0,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
        extra_body={"chat_template_kwargs": {"enable_thinking": True}},
    )
    for seed in range(3):
        choice = client.chat.completions.create(**request, seed=seed).choices[0]
        reasoning = (choice.message.model_extra or {}).get("reasoning_content")
        assert reasoning is None or isinstance(reasoning, str)
        if choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.message.content), schema)
        else:
            assert choice.finish_reason == "length"
        # Streamed, the same seed: reasoning and content deltas add up to the same message.
        streamed_reasoning, streamed_content = "", ""
        for chunk in client.chat.completions.create(**request, seed=seed, stream=True):
            for delta in (c.delta for c in chunk.choices):
                streamed_reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
                streamed_content += delta.content or ""
        assert (streamed_reasoning, streamed_content) == (reasoning or "", choice.message.content)


def test_conflicts_and_unenforceable_schemas_are_400s(server):
    def post(**body):
        return httpx.post(
            f"{server}/v1/chat/completions",
            json={"model": MODEL, "messages": ASK, "max_tokens": 4, **body},
            timeout=600,
        )

    both = post(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"})
    assert both.status_code == 400 and both.json()["error"]["param"] == "tool_choice"
    odd = [
        {
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {"type": "object", "properties": {"a": {"type": "string", "format": "hostname"}}},
            },
        }
    ]
    bad = post(tools=odd, tool_choice="required")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tools"
    assert "hostname" in bad.json()["error"]["message"]
    assert post(tools=odd, tool_choice="auto").status_code == 200  # "auto" is not constrained: nothing to refuse
