"""Warm-up (serving/warmup.py): the server compiles every step shape before /health turns 200, and then a varied
workload (chat, completions, n=3, logprobs 1..5, echo, tools, streaming, several prompt lengths, penalties, a JSON
schema) compiles nothing.

Compiles are observed with JAX's own monitoring events (`/jax/core/compile/backend_compile_duration`: every XLA
compile in the process, the engine's steps and anything else), not only the engine's count. Small limits (two
sequences, 16-token steps, 64-token context) keep the plan to 10 shapes, and a one-layer model keeps each compile
short (the shapes do not depend on the layer kinds).
"""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from jax._src import monitoring
from test_server import live_server

import gemma4_jax
from gemma4_jax.serving import warmup
from gemma4_jax.serving.server import ServerConfig, create_app

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
LIMITS = dict(max_num_seqs=2, max_model_len=64, page_size=16, max_num_batched_tokens=16)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint(
        "warmup_tiny1", seed=5, tokenizer=True, num_hidden_layers=1, layer_types=["full_attention"]
    ).path


class CompileCounter:
    """Counts XLA compiles (JAX monitoring events) from any thread while installed."""

    def __init__(self):
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self, event: str, duration: float, **kwargs) -> None:
        if event == COMPILE_EVENT:
            with self._lock:
                self.count += 1

    def __enter__(self):
        monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        monitoring.unregister_event_duration_listener(self)


def test_plan_follows_the_scheduler_buckets(checkpoint):
    """The plan of a small configuration, spelled out: (B, T, P, top logprobs) of every step the scheduler can run,
    then the prompt-logprob forwards. Infeasible ones are absent (two 16-token chunks exceed the 16-token budget)."""
    llm = gemma4_jax.LLM(checkpoint, dtype="float32", compilation_cache=False, **LIMITS)
    shapes = warmup.plan(llm.engine)
    steps = sorted((s.kind, s.key[0]) for s in shapes if s.kind != "prompt_logprobs")
    # Keys (B, T, P, top logprobs, counts, token mask). One-token chunks run as decode steps; a prefill program
    # pads to at most the budget (one row of 16 tokens here) and always computes top logprobs; decode steps come
    # plain, with logprobs, in the grammar family (a token mask only) and in the full family (penalties, or a grammar
    # beside logprobs: counts, mask and logprobs in one program). Page tables are at least 256 tokens wide (P = 16).
    decode_variants = [(0, False, False), (20, False, False), (0, False, True), (20, True, True)]
    expected = sorted(
        [("decode", (b, 1, 16, *v)) for b in (1, 2) for v in decode_variants]
        + [("prefill", (1, 16, 16, 20, False, False))]
    )
    assert steps == expected
    assert [s.num_tokens for s in shapes if s.kind == "prompt_logprobs"] == [16, 32, 64]
    bigger = gemma4_jax.LLM(
        checkpoint,
        dtype="float32",
        compilation_cache=False,
        max_num_seqs=4,
        max_model_len=512,
        page_size=16,
        max_num_batched_tokens=32,
    )
    keys = {s.key[0][:3] for s in warmup.plan(bigger.engine) if s.kind == "prefill"}
    assert {(b, t) for b, t, _ in keys} == {(1, 16), (2, 16), (1, 32)}  # B x T <= the 32-token budget
    assert {p for _, _, p in keys} == {16, 32}
    speculative = gemma4_jax.LLM(
        checkpoint,
        dtype="float32",
        compilation_cache=False,
        num_scheduler_steps=4,
        speculative_config={"method": "ngram", "num_speculative_tokens": 2},
        **LIMITS,
    )
    extra = sorted((s.kind, s.key[0]) for s in warmup.plan(speculative.engine) if s.kind in ("verify", "multi"))
    # A multi-step decode has no mask (grammar rows decode one step per call), so no grammar family either.
    multi = ((0, False, False), (20, False, False), (20, True, False))
    verify = ((0, False, False), (20, False, False), (0, False, True), (20, True, True))
    assert extra == sorted(
        [("multi", (b, 1, 16, *v)) for b in (1, 2) for v in multi]
        + [("verify", (b, 3, 16, *v)) for b in (1, 2) for v in verify]
    )


def test_served_workload_compiles_nothing_after_warmup(checkpoint):
    llm = gemma4_jax.LLM(checkpoint, dtype="float32", compilation_cache=False, **LIMITS)
    app = create_app(llm, ServerConfig(served_model_name="tiny", max_n=4), warmup=True)
    state = app.state.server
    with CompileCounter() as compiles, live_server(app) as (url, _, _):
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and "warming up" in health.json()["error"]["message"]
        deadline = time.monotonic() + 600
        while httpx.get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline and state.load_error is None, state.load_error
            time.sleep(0.2)
        assert compiles.count > 0 and state.compiles > 0  # the warm-up compiled
        after_ready, engine_after_ready = compiles.count, state.compiles
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        chat = [{"role": "user", "content": "Hi there"}]
        tools = [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "weather of a city",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ]
        for k in range(1, 6):
            out = client.completions.create(model="tiny", prompt="x" * (3 + 9 * k), max_tokens=3, logprobs=k)
            assert len(out.choices[0].logprobs.top_logprobs[0]) == k
        out = client.completions.create(model="tiny", prompt="echo me", max_tokens=2, echo=True, logprobs=2)
        assert out.choices[0].text.startswith("echo me")
        client.completions.create(
            model="tiny",
            prompt="a longer prompt of some forty tokens or so....",
            max_tokens=4,
            n=3,
            temperature=1.0,
            seed=3,
        )
        client.completions.create(model="tiny", prompt=["one", "two words", "three short words"], max_tokens=5)
        client.chat.completions.create(model="tiny", messages=chat, max_tokens=4, n=3, temperature=0.7)
        client.chat.completions.create(
            model="tiny", messages=chat, max_tokens=3, tools=tools, logprobs=True, top_logprobs=4
        )
        stream = client.chat.completions.create(model="tiny", messages=chat * 3, max_tokens=6, stream=True)
        assert sum(1 for _ in stream) > 1
        stream = client.completions.create(model="tiny", prompt="stream " * 6, max_tokens=5, stream=True, logprobs=1)
        assert sum(1 for _ in stream) > 1
        # Penalties, a grammar, a grammar with logprobs: the full and the grammar families, the first token of each
        # from a one-token step.
        client.completions.create(
            model="tiny", prompt="repeat repeat", max_tokens=4, presence_penalty=0.5, frequency_penalty=0.3
        )
        client.chat.completions.create(
            model="tiny", messages=chat, max_tokens=3, extra_body={"repetition_penalty": 1.3}
        )
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
        out = client.chat.completions.create(
            model="tiny",
            messages=chat,
            max_tokens=12,
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
        )
        assert out.choices[0].message.content.startswith("{")
        out = client.chat.completions.create(
            model="tiny",
            messages=chat,
            max_tokens=6,
            logprobs=True,
            top_logprobs=2,
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
        )
        assert out.choices[0].message.content.startswith("{") and out.choices[0].logprobs.content
        assert compiles.count == after_ready, f"{compiles.count - after_ready} compiles after ready"
        assert state.compiles == engine_after_ready
