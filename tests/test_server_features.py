"""Server features beyond the basics, against a live server on 127.0.0.1 (its own tiny checkpoint): tools in chat
requests (rendered by the checkpoint's template, history with tool calls and tool results), prompt logprobs
(`echo` + `logprobs`, checked against `Model.logits`), CORS when configured, and the token budget
(`max_queued_tokens`: 429 with Retry-After, 400 for a request that can never fit).
"""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest
from test_server import _assert_error, _events, _slow_engine, _wait_idle, live_server

import gemma4_jax
from gemma4_jax.serving.demo import save_byte_level_tokenizer
from gemma4_jax.serving.server import ServerConfig, create_app
from gemma4_jax.serving.tool_calls import TOOL_CALL_START
from hf_reference import make_text_checkpoint

MODEL = "tiny-tools"
MAX_MODEL_LEN = 128
ORIGIN = "http://app.example"
TOKEN_BUDGET = 4096

# A chat template of this test, compact to keep prompts short: the tools' names and required arguments, calls in the
# history written as `call:NAME{key:value}` when the arguments are a mapping, tool results with their call id.
TEMPLATE = """{{- bos_token -}}
{%- for tool in tools or [] -%}
tool:{{ tool['function']['name'] }}{{ tool['function']['parameters']['required'] | tojson }}
{% endfor -%}
{%- for message in messages -%}
{{ 'model' if message['role'] == 'assistant' else message['role'] }}:
{%- for tc in message['tool_calls'] or [] -%}
call:{{ tc['function']['name'] }}{
{%- if tc['function']['arguments'] is mapping -%}
{%- for key, value in tc['function']['arguments'] | dictsort -%}{{ key }}:{{ value | tojson }}{%- endfor -%}
{%- else -%}NOT-A-MAPPING{%- endif -%}
}
{%- endfor -%}
{%- if message['role'] == 'tool' %}{{ message['tool_call_id'] }}={% endif -%}
{{ message['content'] if message['content'] is string else '' }}
{% endfor -%}
{%- if add_generation_prompt -%}model:{%- endif -%}"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
ASK = [{"role": "user", "content": "Paris?"}]


@pytest.fixture(scope="module")
def server(ckpt_root):
    path = ckpt_root / "server_features"
    make_text_checkpoint(
        str(path),
        seed=5,
        vocab_size=512,
        vocab_size_per_layer_input=512,
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
    )
    save_byte_level_tokenizer(path)
    (path / "chat_template.jinja").write_text(TEMPLATE)  # takes precedence over tokenizer_config.json's
    llm = gemma4_jax.LLM(
        str(path), dtype="float32", max_num_seqs=4, max_model_len=MAX_MODEL_LEN, page_size=16, max_num_batched_tokens=16
    )
    config = ServerConfig(served_model_name=MODEL, cors_origins=[ORIGIN], max_queued_tokens=TOKEN_BUDGET)
    app = create_app(llm, config)
    with live_server(app) as (url, uv, thread):
        yield type("Live", (), {"url": url, "llm": llm, "state": app.state.server})


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _prompt_text(http, **body) -> tuple[list[int], str]:
    tokens = http.post("/tokenize", json=body).json()["tokens"]
    return tokens, http.post("/detokenize", json={"tokens": tokens}).json()["prompt"]


# ----------------------------------------------------------------------------------------------------------------------
# Tools
# ----------------------------------------------------------------------------------------------------------------------


def test_tools_are_rendered_into_the_prompt(client, http):
    tokens, text = _prompt_text(http, messages=ASK, tools=TOOLS)
    assert text == 'tool:get_weather["city"]\nuser:Paris?\nmodel:'
    assert _prompt_text(http, messages=ASK)[1] == "user:Paris?\nmodel:"
    kwargs = dict(model=MODEL, messages=ASK, max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    auto = client.chat.completions.create(**kwargs, tools=TOOLS, tool_choice="auto")
    assert auto.usage.prompt_tokens == len(tokens)  # exactly the rendered prompt, tools included
    assert auto.choices[0].finish_reason == "length" and auto.choices[0].message.role == "assistant"
    none = client.chat.completions.create(**kwargs, tools=TOOLS, tool_choice="none")
    assert none.usage.prompt_tokens == len(tokens) and none.choices[0].message.tool_calls is None
    # A named function (or "required") is enforced by a grammar (tests/test_tool_grammar.py): the prompt is the
    # same, and the model turn starts with the call (cut here by max_tokens, so it stays text).
    named = client.chat.completions.create(
        **kwargs, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}
    )
    assert named.usage.prompt_tokens == len(tokens) and named.choices[0].message.content == TOOL_CALL_START[:3]
    required = client.chat.completions.create(**kwargs, tools=TOOLS, tool_choice="required")
    assert required.usage.prompt_tokens == len(tokens) and required.choices[0].message.content == TOOL_CALL_START[:3]
    stream = client.chat.completions.create(**kwargs, tools=TOOLS, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.prompt_tokens == len(tokens)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_tool_history_is_accepted_and_rendered(client, http):
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    _, text = _prompt_text(http, messages=history, tools=TOOLS)
    # The JSON-string arguments of the OpenAI wire format reached the template as an object.
    assert text.endswith('user:Paris?\nmodel:call:get_weather{city:"Paris"}\ntool:call_1=sunny\nmodel:')
    out = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=1)
    assert out.choices[0].message.role == "assistant"


def test_tool_request_errors(http):
    def post(**extra):
        return http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 1, **extra})

    _assert_error(post(tool_choice="required"), 400, param="tool_choice", match="needs tools")
    _assert_error(
        post(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "other"}}),
        400,
        param="tool_choice",
        match="not one of the tools",
    )
    _assert_error(post(tools=TOOLS, tool_choice="sometimes"), 400, param="tool_choice")
    _assert_error(
        post(tools=[{"type": "function", "function": {"name": "has space"}}]), 400, param="tools.0.function.name"
    )
    _assert_error(post(tools=[{"type": "retrieval"}]), 400)
    # json_object and json_schema are enforced since structured outputs landed (tests/test_server_structured.py); an
    # unknown response_format type is still refused, naming the field.
    _assert_error(post(response_format={"type": "xml"}), 400, param="response_format.type")


# ----------------------------------------------------------------------------------------------------------------------
# Prompt logprobs
# ----------------------------------------------------------------------------------------------------------------------


def _reference_logprobs(llm, ids: list[int]) -> np.ndarray:
    """log_softmax of `Model.logits` over the prompt, in float64: (T, V)."""
    logits = np.asarray(llm.model.logits(np.asarray([ids], np.int32)))[0].astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_echo_with_prompt_logprobs_matches_model_logits(server, client, http):
    prompt = "Hello, world"
    ids = http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    out = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=2, echo=True, extra_body={"ignore_eos": True}
    )
    choice = out.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(prompt) and len(lp.tokens) == len(ids) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes the first token
    assert lp.tokens[: len(ids)] == [server.state.token_text(t) for t in ids]
    reference = _reference_logprobs(server.llm, ids)
    expected = [reference[t - 1, ids[t]] for t in range(1, len(ids))]
    np.testing.assert_allclose(lp.token_logprobs[1 : len(ids)], expected, rtol=1e-4, atol=1e-4)
    for t in range(1, len(ids)):
        best = np.argsort(-reference[t - 1])[:2]
        top = lp.top_logprobs[t]
        assert list(top) == [server.state.token_text(int(b)) for b in best]
        np.testing.assert_allclose(list(top.values()), reference[t - 1, best], rtol=1e-4, atol=1e-4)
    assert lp.text_offset == [sum(len(tok) for tok in lp.tokens[:i]) for i in range(len(lp.tokens))]
    # The generated part is the same as without echo; the stream carries the same tokens and values.
    plain = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=2, extra_body={"ignore_eos": True}
    )
    assert choice.text == prompt + plain.choices[0].text
    assert lp.token_logprobs[len(ids) :] == plain.choices[0].logprobs.token_logprobs
    body = {"model": MODEL, "prompt": ids, "max_tokens": 3, "temperature": 0, "logprobs": 2, "echo": True}
    with http.stream("POST", "/v1/completions", json={**body, "ignore_eos": True, "stream": True}) as r:
        events = _events(r)
    assert events[-1] == "[DONE]"
    streamed = [e["choices"][0]["logprobs"] for e in events[:-1]]
    assert sum((s["token_logprobs"] for s in streamed), []) == lp.token_logprobs
    assert sum((s["text_offset"] for s in streamed), []) == lp.text_offset
    # A shorter prompt scores the same prefix the same; logprobs=0: the token's logprob and no alternatives.
    short = client.completions.create(model=MODEL, prompt=ids[:4], max_tokens=1, logprobs=0, echo=True)
    assert short.choices[0].logprobs.token_logprobs[:4] == lp.token_logprobs[:4]
    assert all(top == {} for top in short.choices[0].logprobs.top_logprobs[1:])


# ----------------------------------------------------------------------------------------------------------------------
# CORS and the token budget
# ----------------------------------------------------------------------------------------------------------------------


def test_cors_when_configured(http):
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    r = http.options("/v1/chat/completions", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    assert http.get("/v1/models", headers={"Origin": ORIGIN}).headers["access-control-allow-origin"] == ORIGIN
    other = {**preflight, "Origin": "http://evil.example"}
    r = http.options("/v1/chat/completions", headers=other)
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    assert (
        "access-control-allow-origin" not in http.get("/v1/models", headers={"Origin": "http://evil.example"}).headers
    )


def test_token_budget_429_then_admitted(server, http):
    engine = server.state.engine
    assert engine.max_active_tokens == TOKEN_BUDGET  # from ServerConfig.max_queued_tokens (--max-queued-tokens)
    engine.max_active_tokens = 100
    prompt = [2] + [100] * 9  # 10 tokens
    try:
        with _slow_engine(server, 0.05):
            holder = {"model": MODEL, "prompt": prompt, "max_tokens": 40, "ignore_eos": True, "stream": True}
            with http.stream("POST", "/v1/completions", json=holder) as r:  # reserves 50 of the 100 tokens
                assert r.status_code == 200
                over = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 41})
                error = _assert_error(over, 429, code="queue_full", match="limit of 100")
                assert over.headers["Retry-After"] == "1" and "50 tokens reserved" in error["message"]
                fits = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 40})
                assert fits.status_code == 200  # exactly the budget
                never = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 30, "n": 4})
                _assert_error(never, 400, match="token budget of 100")  # 160 tokens alone: retrying cannot help
                _events(r)
    finally:
        engine.max_active_tokens = TOKEN_BUDGET
    _wait_idle(server)
    assert http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 41}).status_code == 200
    rejected = [line for line in http.get("/metrics").text.splitlines() if 'reason="queue_full"' in line]
    assert rejected and float(rejected[0].split()[-1]) >= 1
