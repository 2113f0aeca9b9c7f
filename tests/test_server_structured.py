"""Structured outputs through the server with the real `openai` client: response_format (json_object, json_schema)
in chat and completions, streaming and not; vLLM's structured_outputs and guided_* fields; bad constraints are
400s naming the field. Random weights: the grammar, not the model, makes the output valid."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
from test_server import live_server

import gemma4_jax
from gemma4_jax.serving.demo import save_byte_level_tokenizer
from gemma4_jax.serving.server import ServerConfig, create_app
from hf_reference import make_text_checkpoint

API_KEY = "structured-key"
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                          "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(ckpt_root):
    path = str(ckpt_root / "server_structured")
    make_text_checkpoint(path, seed=12, vocab_size=512, vocab_size_per_layer_input=512, num_hidden_layers=2,
                         layer_types=["sliding_attention", "full_attention"])
    save_byte_level_tokenizer(path)
    llm = gemma4_jax.LLM(path, dtype="float32", max_num_seqs=8, max_model_len=256, page_size=16,
                         max_num_batched_tokens=16, compilation_cache=False)
    app = create_app(llm, ServerConfig(served_model_name="tiny", api_key=API_KEY, max_n=4))
    with live_server(app) as (url, _, _):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _chat(client, stream=False, max_tokens=120, **extra):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Give JSON"}],
                                          max_tokens=max_tokens, temperature=1.0, stream=stream, **extra)


def test_json_schema_chat_and_stream(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for seed in range(3):
        out = _chat(client, seed=seed, response_format=fmt)
        assert out.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
    chunks = list(_chat(client, stream=True, seed=5, response_format=fmt))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_and_completions(client):
    out = client.completions.create(model="tiny", prompt="x", max_tokens=120, seed=1, extra_body={
        "response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}})  # vLLM takes it here too
    jsonschema.validate(json.loads(out.choices[0].text), SCHEMA)
    out = _chat(client, seed=2, response_format={"type": "json_object"}, max_tokens=200)
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].message.content), dict)
    assert out.choices[0].message.content.startswith("{")


@pytest.mark.parametrize("extra, check", [
    ({"guided_regex": "[a-c]{2}-[0-9]"}, lambda t: re.fullmatch("[a-c]{2}-[0-9]", t)),
    ({"guided_choice": ["red", "green"]}, lambda t: t in ("red", "green")),
    ({"guided_json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
    ({"guided_grammar": 'root ::= "x" ("y" | "z")'}, lambda t: t in ("xy", "xz")),
    ({"structured_outputs": {"regex": "[0-9]{4}"}}, lambda t: re.fullmatch("[0-9]{4}", t)),
    ({"structured_outputs": {"choice": ["a", "b"]}}, lambda t: t in ("a", "b")),
])
def test_vllm_fields(client, extra, check):
    out = client.completions.create(model="tiny", prompt="q", max_tokens=60, seed=3, extra_body=extra)
    assert out.choices[0].finish_reason == "stop" and check(out.choices[0].text), out.choices[0].text


@pytest.mark.parametrize("body, param", [
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"guided_json": '{"type": '}, "guided_json"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"guided_decoding_backend": "xgrammar", "guided_regex": "a"}, "guided_decoding_backend"),
    ({"guided_grammar": "start: missing_rule"}, "guided_grammar"),
])
def test_bad_constraints_are_400_naming_the_field(server, body, param):
    r = httpx.post(server + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
                   json={"model": "tiny", "prompt": "x", "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
