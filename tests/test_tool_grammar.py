"""Forced Gemma 4 tool calls and the reasoning channel, on random weights: the grammar, not the model, guarantees
that every forced call parses with arguments valid for its tool's schema and their JSON types intact.

Grammar level (fast, no model): random walks through llguidance's masks for 12 tool schemas x seeds x both marker
forms (special tokens, as in the Gemma 4 tokenizer, and plain text) always parse and validate; parallel / single /
named; unsupported schema keywords refused by name; the reasoning parser at any chunking; a thought channel before
any kind of constraint. Engine level: the offline API with a tiny model and a tokenizer holding Gemma 4's markers.
"""

from __future__ import annotations

import json

import jsonschema
import llguidance
import numpy as np
import pytest

import gemma4_jax
from gemma4_jax import SamplingParams
from gemma4_jax.serving.demo import BYTE_LEVEL_SPECIALS, byte_level_backend, byte_level_tokenizer
from gemma4_jax.serving.reasoning import ReasoningParser
from gemma4_jax.serving.structured import StructuredOutputs
from gemma4_jax.serving.tokenizer import Tokenizer
from gemma4_jax.serving.tool_calls import ToolCallParser
from gemma4_jax.serving.tool_grammar import ToolSchemaError, marker_for, text_marker, tool_call_grammar

# Gemma 4's markers, as special tokens at reserved ids of the byte-level demo vocabulary.
GEMMA4_MARKERS = {
    "<|tool_call>": 300,
    "<tool_call|>": 301,
    '<|"|>': 302,
    "<|tool_response>": 303,
    "<|channel>": 304,
    "<channel|>": 305,
    "<|turn>": 306,
    "<turn|>": 307,
    "<|think|>": 308,
    "<|tool>": 309,
    "<tool|>": 310,
}
# The parts of Gemma 4's chat template this needs: turns, the thinking switch (`<|think|>` in the system turn; the
# thinking-off generation prompt closes an empty thought channel), tool declarations (names only, to stay short).
GEMMA4_TEMPLATE = """{{- bos_token -}}
{%- if enable_thinking is defined and enable_thinking or tools -%}
{{- '<|turn>system\\n' -}}
{%- if enable_thinking is defined and enable_thinking -%}{{- '<|think|>' -}}{%- endif -%}
{%- for tool in tools or [] -%}{{- '<|tool>' + tool['function']['name'] + '<tool|>' -}}{%- endfor -%}
{{- '<turn|>\\n' -}}
{%- endif -%}
{%- for message in messages -%}
{{- '<|turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' -}}
{{- message['content'] if message['content'] is string else '' -}}
{{- '<turn|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|turn>model\\n' -}}
{%- if not enable_thinking | default(false) -%}{{- '<|channel>thought\\n<channel|>' -}}{%- endif -%}
{%- endif -%}"""


def gemma4_marker_tokenizer() -> Tokenizer:
    """The demo's byte-level tokenizer (vocab 512) with Gemma 4's markers as special tokens; stops on <eos> and
    <turn|> (as Gemma 4 stops on 1 and 106)."""
    backend = byte_level_backend(GEMMA4_MARKERS)
    return Tokenizer(
        backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
        chat_template=GEMMA4_TEMPLATE,
        stop_token_ids=[BYTE_LEVEL_SPECIALS["<eos>"], GEMMA4_MARKERS["<turn|>"]],
    )


def tool(name: str, properties: dict | None, required: list | None = None, **extra) -> dict:
    if properties is None:
        return {"type": "function", "function": {"name": name}}
    params = {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        **extra,
    }
    return {"type": "function", "function": {"name": name, "description": f"the {name} tool", "parameters": params}}


S = {"type": "string", "maxLength": 6}
TOOLS = [
    tool(
        "get_weather",
        {"city": S, "days": {"type": "integer", "minimum": 1, "maximum": 7}, "metric": {"type": "boolean"}},
        ["city", "days"],
    ),
    tool(
        "add",
        {
            "xs": {
                "type": "array",
                "items": {"type": "number", "minimum": -10, "maximum": 10, "multipleOf": 0.5},
                "minItems": 1,
                "maxItems": 3,
            }
        },
    ),
    tool("noargs", None),
    tool("empty", {}, additionalProperties=False),
    tool("pick", {"mode": {"enum": ["sum", "mean", 3, None, True]}, "n": {"const": 4}}),
    tool("when", {"date": {"type": "string", "format": "date"}, "at": {"type": "string", "format": "time"}}, ["date"]),
    tool(
        "nested",
        {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}, "label": S},
                "required": ["x"],
            },
            "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
        },
    ),
    tool(
        "either",
        {
            "v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 5}, S, {"type": "null"}]},
            "w": {"type": ["integer", "null"], "minimum": -3, "maximum": 3},
        },
    ),
    tool(
        "coded",
        {
            "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
            "id": {"type": "string", "format": "uuid"},
            "ip": {"type": "string", "format": "ipv4"},
        },
    ),
    tool(
        "refs",
        {"a": {"$ref": "#/$defs/small"}, "b": {"type": "array", "items": {"$ref": "#/$defs/small"}, "maxItems": 2}},
        **{"$defs": {"small": {"type": "integer", "minimum": 0, "maximum": 3}}},
    ),
    tool(
        "optional_only",
        {"p": S, "q": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.25}, "r": {"type": "boolean"}},
        [],
    ),
    tool("odd_keys", {"with space": S, "dash-key": {"type": "integer", "minimum": 0, "maximum": 1}}),
]
SCHEMAS = {
    t["function"]["name"]: t["function"].get("parameters") or {"type": "object", "maxProperties": 0} for t in TOOLS
}
FORMATS = jsonschema.Draft202012Validator.FORMAT_CHECKER


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return gemma4_marker_tokenizer()


def _setup(tokenizer: Tokenizer, special: bool):
    """(tokenizer, marker, llguidance tokenizer): Gemma 4's markers as special tokens, or (a tokenizer without them,
    the demo's) as text."""
    tok = tokenizer if special else byte_level_tokenizer()
    marker = marker_for(tok) if special else text_marker
    return tok, marker, llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=512, eos_token=sorted(tok.stop_token_ids))


def _walk(matcher, vocab: int, seed: int, stop: frozenset[int], limit: int = 600) -> list[int]:
    """A random walk through the grammar's masks (uniform over the allowed tokens) until it stops."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < limit and not matcher.is_stopped():
        mask = np.frombuffer(matcher.compute_bitmask(), np.uint32)
        allowed = np.flatnonzero((mask[np.arange(vocab) // 32] >> (np.arange(vocab) % 32)) & 1)
        token = int(rng.choice(allowed))
        assert matcher.consume_token(token), matcher.get_error()
        out.append(token)
        if token in stop:
            break
    return out


def _calls(text: str) -> list:
    parser = ToolCallParser()
    content, calls = parser.feed(text, final=True)
    assert content.replace("<eos>", "").replace("<end_of_turn>", "").replace("<turn|>", "") == "", text
    return calls


def _validate(calls) -> None:
    for call in calls:
        jsonschema.Draft202012Validator(SCHEMAS[call.name], format_checker=FORMATS).validate(call.arguments)


@pytest.mark.parametrize("special", [True, False], ids=["special-markers", "text-markers"])
def test_random_walks_through_forced_calls_parse_and_validate(tokenizer, special):
    tokenizer, marker, ll = _setup(tokenizer, special)
    counts = []
    runs = [(None, True, seed) for seed in range(16)] + [(None, False, seed) for seed in range(4)]
    runs += [(t["function"]["name"], False, seed) for t in TOOLS for seed in range(3)]  # every tool, named
    for name, parallel, seed in runs:
        matcher = llguidance.LLMatcher(ll, tool_call_grammar(TOOLS, name, parallel, marker), log_level=0)
        ids = _walk(matcher, 512, seed, tokenizer.stop_token_ids)
        assert matcher.is_accepting(), tokenizer.decode(ids, skip_special_tokens=False)
        calls = _calls(tokenizer.decode(ids, skip_special_tokens=False))
        _validate(calls)
        assert calls and (parallel and name is None or len(calls) == 1)
        assert name is None or {c.name for c in calls} == {name}
        counts.append(len(calls))
    assert max(counts) >= 2  # parallel calls happen
    if special:  # markers are single tokens: no marker text inside arguments
        assert "<[302]>" in tool_call_grammar(TOOLS, marker=marker)


def test_typed_arguments_survive_parsing(tokenizer):
    """Numbers stay numbers, booleans booleans, null null, strings strings (even "3")."""
    tokenizer, marker, ll = _setup(tokenizer, special=True)
    grammar = tool_call_grammar(
        [
            tool(
                "t",
                {
                    "s": S,
                    "i": {"type": "integer"},
                    "b": {"type": "boolean"},
                    "n": {"type": "null"},
                    "f": {"type": "number"},
                },
            )
        ],
        marker=marker,
    )
    text = '<|tool_call>call:t{b:false,f:-2.5e3,i:42,n:null,s:<|"|>3<|"|>}<tool_call|><|tool_response>'
    matcher = llguidance.LLMatcher(ll, grammar, log_level=0)
    assert matcher.consume_tokens(tokenizer.encode(text, add_special_tokens=False)), matcher.get_error()
    (call,) = _calls(text)
    assert call.arguments == {"b": False, "f": -2500.0, "i": 42, "n": None, "s": "3"}
    assert json.loads(call.to_openai()["function"]["arguments"]) == call.arguments
    for wrong in ('<|tool_call>call:t{b:"false"', '<|tool_call>call:t{b:false,f:<|"|>', "hello"):
        matcher = llguidance.LLMatcher(ll, grammar, log_level=0)
        assert not matcher.consume_tokens(tokenizer.encode(wrong, add_special_tokens=False))


@pytest.mark.parametrize(
    "params, message",
    [
        ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "'not'"),
        ({"type": "object", "patternProperties": {"^x": {}}}, "'patternProperties'"),
        ({"type": "object", "properties": {"a": {"type": "string", "format": "hostname"}}}, "format 'hostname'"),
        ({"type": "object", "properties": {"a": {"allOf": [{"type": "integer"}, {"minimum": 1}]}}}, "allOf"),
        ({"type": "object", "properties": {"a": {"type": "array", "items": [{"type": "integer"}]}}}, "tuple form"),
        ({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}, "'uniqueItems'"),
        ({"type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}}, "local references"),
        ({"type": "array"}, "must be an object schema"),
    ],
)
def test_unsupported_schemas_are_refused_by_name(params, message):
    with pytest.raises(ToolSchemaError, match=message):
        tool_call_grammar([{"type": "function", "function": {"name": "f", "parameters": params}}])


def test_reasoning_parser_splits_the_thought_at_any_chunking():
    text = "<|channel>thought\nLet me think <b>.<channel|>The answer."
    whole = ReasoningParser()
    assert whole.feed(text, final=True) == ("Let me think <b>.", "The answer.")
    for step in (1, 2, 3, 5):
        parser, thought, content = ReasoningParser(), "", ""
        for end in range(step, len(text) + step, step):
            r, c = parser.feed(text[:end], final=end >= len(text))
            thought, content = thought + r, content + c
            assert "<|" not in r + c and "|>" not in r + c and not r.startswith("thought")
        assert (thought, content) == ("Let me think <b>.", "The answer.")
    plain = ReasoningParser()
    assert plain.feed("no thinking here", final=True) == ("", "no thinking here") and plain.reasoning is None
    cut = ReasoningParser()  # cut by max_tokens inside the channel: all of it is reasoning
    assert cut.feed("<|channel>thought\nstill thi", final=True) == ("still thi", "") and cut.content == ""
    unlabelled = ReasoningParser()
    assert unlabelled.feed("<|channel>x<channel|>y", final=True) == ("x", "y")


@pytest.mark.parametrize("special", [True, False], ids=["special-markers", "text-markers"])
def test_constraints_bind_the_answer_after_an_optional_thought(tokenizer, special):
    tokenizer, marker, ll = _setup(tokenizer, special)
    forced = {"tools": TOOLS[:1], "name": None, "parallel": False}
    cases = [
        (
            {"json": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}},
            '{"a": 12}',
            '{"a": "x"}',
        ),
        ({"regex": "[0-9]{3}"}, "123", "12a"),
        ({"choice": ["yes", "no"]}, "no", "nope"),
        ({"grammar": 'root ::= "x" "y"'}, "xy", "xz"),
        (
            {"tool_calls": forced},
            '<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>,days:3}<tool_call|>',
            '<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>,days:9}<tool_call|>',
        ),
    ]
    thought = "<|channel>thought\nhmm, <b> {not json}<channel|>"
    for spec, good, bad in cases:
        grammar = StructuredOutputs.from_value({**spec, "reasoning": True}).grammar_text(marker)
        for text, ok in ((thought + good, True), (good, True), (thought + bad, False), (bad, False)):
            matcher = llguidance.LLMatcher(ll, grammar, log_level=0)
            accepted = matcher.consume_tokens(tokenizer.encode(text, add_special_tokens=False))
            accepted = accepted and matcher.is_accepting()
            assert accepted == ok, (spec, text)


@pytest.fixture(scope="module")
def llm(tokenizer):
    model = gemma4_jax.from_config("tiny", dtype="float32", seed=5)
    return gemma4_jax.LLM(
        model,
        tokenizer=tokenizer,
        max_num_seqs=32,
        max_model_len=512,
        max_num_batched_tokens=256,
        compilation_cache=False,
    )


@pytest.mark.slow  # ~40 s engine run; the server test (test_server_tool_choice) proves forced calls in the fast suite
def test_offline_forced_calls_always_parse_with_typed_arguments(llm, tokenizer):
    """Through the engine (its mask, its special-token markers): "required" with and without parallel calls and a
    named tool, several seeds, all end with "stop" and parse with valid, typed arguments; one cut by max_tokens
    inside a call ends with "length" and yields no call. A few short tools keep the decode short; the grammar-level
    test above covers every schema. Temperature 3: the random model's logits are so peaked that seeds at
    temperature 1 mostly write the same call."""
    tools = [t for t in TOOLS if t["function"]["name"] in ("get_weather", "noargs", "pick", "either")]
    ids = tokenizer.encode_chat_text(tokenizer.apply_chat_template([{"role": "user", "content": "Go"}], tools=tools))
    cases = [(None, True, 0), (None, True, 1), (None, True, 2), (None, False, 3), ("either", False, 4)]
    params = [
        SamplingParams(
            temperature=3.0,
            seed=seed,
            max_tokens=160,
            skip_special_tokens=False,
            structured_outputs={"tool_calls": {"tools": tools, "name": name, "parallel": parallel}},
        )
        for name, parallel, seed in cases
    ]
    params.append(
        SamplingParams(
            temperature=1.0,
            seed=0,
            max_tokens=3,
            skip_special_tokens=False,
            structured_outputs={"tool_calls": {"tools": tools}},
        )
    )
    outs = llm.generate([ids] * len(params), params, use_tqdm=False)
    for (name, parallel, _), out in zip(cases, outs):
        assert out.finish_reason == "stop", out.text
        calls = _calls(out.text)
        _validate(calls)
        assert calls and (parallel or len(calls) == 1) and (name is None or {c.name for c in calls} == {name})
    cut = outs[-1]
    assert cut.finish_reason == "length" and ToolCallParser().feed(cut.text, final=True)[1] == []
