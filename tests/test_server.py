"""The HTTP server end to end: the official `openai` client (and raw httpx for the wire details) against a live
uvicorn server on 127.0.0.1, serving a tiny random HF checkpoint with a real tokenizer.json and chat template.

One server for the whole module (jit compiles are the cost); max_tokens stay small. Covers completions, chat,
SSE streaming (role chunk, finish_reason once, usage chunk, [DONE]), determinism at temperature 0 and with a seed,
n > 1, logprobs, stop strings, every error status with its envelope (400 incl. the context boundary, 401, 404,
413, 429, 500, 503), client disconnects freeing every KV page, and a burst of concurrent streaming clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

import gemma4_jax
from gemma4_jax.serving.demo import save_byte_level_tokenizer
from gemma4_jax.serving.server import ServerConfig, create_app, make_server
from hf_reference import make_text_checkpoint

API_KEY = "test-key-123"
MODEL = "tiny-gemma4"
MAX_MODEL_LEN = 64
MAX_NUM_SEQS = 4
BODY_CAP = 64 * 1024
CHAT = [{"role": "user", "content": "Hi"}]


@contextlib.contextmanager
def live_server(app):
    """Serve `app` with uvicorn on a free 127.0.0.1 port in a thread -> (url, uvicorn server, thread)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = make_server(app, log_level="warning")
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", uv, thread
    finally:
        uv.should_exit = True
        thread.join(15)


@pytest.fixture(scope="module")
def server(ckpt_root):
    path = str(ckpt_root / "server_tiny")
    # Two layers and one prefill bucket (16-token chunks, 4 pages) keep the jit compiles few and short.
    make_text_checkpoint(
        path,
        seed=11,
        vocab_size=512,
        vocab_size_per_layer_input=512,
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
    )
    save_byte_level_tokenizer(path)
    llm = gemma4_jax.LLM(
        path,
        dtype="float32",
        max_num_seqs=MAX_NUM_SEQS,
        max_model_len=MAX_MODEL_LEN,
        page_size=16,
        max_num_batched_tokens=16,
    )
    app = create_app(
        llm,
        ServerConfig(
            served_model_name=MODEL, api_key=API_KEY, max_queue=96, max_body_bytes=BODY_CAP, max_n=4, grace_period_s=2
        ),
    )
    with live_server(app) as (url, uv, thread):
        yield type(
            "Live", (), {"url": url, "app": app, "llm": llm, "state": app.state.server, "uvicorn": uv, "thread": thread}
        )


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


def _events(response: httpx.Response) -> list:
    """The SSE `data:` payloads of a finished streaming response ([DONE] kept as the string)."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def _assert_error(
    response: httpx.Response, status: int, code: str | None = None, param: str | None = None, match: str | None = None
) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    if match is not None:
        assert match in error["message"], error["message"]
    return error


@contextlib.contextmanager
def _slow_engine(server, delay: float = 0.01):
    """A slower model: requests outlive the clients that give up on them (each engine step sleeps first)."""
    engine = server.llm.engine
    real_step = engine.step

    def slow_step():
        time.sleep(delay)
        return real_step()

    engine.step = slow_step
    try:
        yield
    finally:
        del engine.step


def _wait_idle(server, timeout: float = 10.0) -> None:
    engine = server.llm.engine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.num_used_pages == 0 and server.state.engine.num_active == 0 and not engine.has_unfinished():
            return
        time.sleep(0.02)
    raise AssertionError(f"not idle: {engine.num_used_pages} pages used, {server.state.engine.num_active} active")


# ----------------------------------------------------------------------------------------------------------------------
# Happy paths
# ----------------------------------------------------------------------------------------------------------------------


def test_health_models_tokenize(server, client, http):
    assert httpx.get(server.url + "/health").status_code == 200  # no key needed
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    tok = http.post("/tokenize", json={"prompt": "Hello"}).json()
    assert tok["tokens"] == [2, *(16 + b for b in b"Hello")] and tok["count"] == 6
    assert tok["max_model_len"] == MAX_MODEL_LEN
    assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == "Hello"
    chat = http.post("/tokenize", json={"messages": CHAT}).json()
    assert chat["tokens"][0] == 2 and chat["tokens"].count(2) == 1


def test_completion_greedy_is_deterministic_and_streams_the_same(client, http):
    kwargs = dict(model=MODEL, prompt="Hello", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert a.choices[0].text == b.choices[0].text
    assert a.choices[0].finish_reason == "length"
    assert (a.usage.prompt_tokens, a.usage.completion_tokens, a.usage.total_tokens) == (6, 6, 12)
    with http.stream(
        "POST",
        "/v1/completions",
        json={"model": MODEL, "prompt": "Hello", "max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream": True},
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == a.choices[0].text
    assert [c["choices"][0]["finish_reason"] for c in chunks].count("length") == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # token-id prompts and batches of prompts
    ids = http.post("/tokenize", json={"prompt": "Hello"}).json()["tokens"]
    by_ids = client.completions.create(**{**kwargs, "prompt": ids})
    assert by_ids.choices[0].text == a.choices[0].text
    batch = client.completions.create(**{**kwargs, "prompt": ["Hello", "Bye"]})
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == a.choices[0].text


def test_chat_and_streaming_with_usage(client, http):
    kwargs = dict(model=MODEL, messages=CHAT, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kwargs)
    message = full.choices[0].message
    assert message.role == "assistant" and full.choices[0].finish_reason == "length"
    prompt_tokens = http.post("/tokenize", json={"messages": CHAT}).json()["count"]
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (prompt_tokens, 5)

    stream = client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].usage.prompt_tokens == prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])

    with http.stream(
        "POST", "/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 3, "stream": True}
    ) as r:
        events = _events(r)
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert sum(1 for e in events[:-1] if e["choices"][0]["finish_reason"]) == 1


def test_seed_and_n(client):
    kwargs = dict(
        model=MODEL, prompt="Seed", max_tokens=8, temperature=1.0, n=3, seed=1234, extra_body={"ignore_eos": True}
    )
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # copies get different seeds
    other = client.completions.create(**{**kwargs, "seed": 99})
    assert [c.text for c in other.choices] != [c.text for c in a.choices]
    assert a.usage.completion_tokens == 24
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, n=2, temperature=1.0, seed=5)
    assert [c.index for c in chat.choices] == [0, 1]


def test_logprobs(client):
    out = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=5, temperature=0, logprobs=2, extra_body={"ignore_eos": True}
    )
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert out.choices[0].text in "".join(lp.tokens)  # token strings show special tokens the text skips
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and 1 <= len(top) <= 2
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the best
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    chat = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.bytes == list(entry.token.encode())
    streamed = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
        stream=True,
    )
    tokens = [e.token for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert tokens == [e.token for e in content]


def test_stop_strings(client):
    # The random model likes special tokens; keeping them in the text gives it something to stop on.
    base = dict(
        model=MODEL,
        prompt="Stop here",
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True, "skip_special_tokens": False},
    )
    free = client.completions.create(**base).choices[0].text
    assert len(free) >= 6, free
    needle = free[3:5]
    out = client.completions.create(**base, stop=[needle]).choices[0]
    assert out.finish_reason == "stop" and out.text == free[: free.index(needle)]
    stream = client.completions.create(**base, stop=needle, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == out.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


# ----------------------------------------------------------------------------------------------------------------------
# Errors: status and envelope, always before the first byte
# ----------------------------------------------------------------------------------------------------------------------


def test_bad_requests_400(http):
    post = lambda body, path="/v1/completions": http.post(path, json=body)  # noqa: E731
    r = http.post("/v1/completions", content=b'{"prompt": "x",', headers={"content-type": "application/json"})
    _assert_error(r, 400, match="not valid JSON")
    _assert_error(post({"prompt": "x", "temperature": "hot"}), 400, param="temperature")
    _assert_error(post({"prompt": "x", "top_p": 2}), 400, param="top_p", match="top_p must be")
    _assert_error(post({"prompt": "x", "n": 0}), 400, param="n")
    _assert_error(post({"prompt": "x", "n": 5}), 400, param="n", match="limit")
    _assert_error(post({"prompt": "x", "max_tokens": 0}), 400, param="max_tokens")
    _assert_error(post({"prompt": "x", "logprobs": 21}), 400, param="logprobs")
    _assert_error(post({"prompt": "x", "stop": [""]}), 400, param="stop")
    _assert_error(post({"prompt": "x", "stop": ["s"] * 17}), 400, param="stop")
    _assert_error(post({"prompt": [5, 99999]}), 400, param="prompt", match="outside the vocabulary")
    _assert_error(post({"prompt": []}), 400, param="prompt")
    _assert_error(post({}), 400, param="prompt")
    _assert_error(post({"prompt": "x", "max_tokens": 2, "stream": True, "top_k": -5}), 400, param="top_k")
    _assert_error(post({"messages": []}, "/v1/chat/completions"), 400, match="empty")
    _assert_error(post({"messages": [{"content": "x"}]}, "/v1/chat/completions"), 400, match="role")
    _assert_error(post({"messages": "hi"}, "/v1/chat/completions"), 400, param="messages")
    _assert_error(post({"messages": CHAT, "top_logprobs": 2}, "/v1/chat/completions"), 400, param="top_logprobs")
    _assert_error(
        post({"messages": CHAT, "stream": True, "temperature": -1}, "/v1/chat/completions"), 400, param="temperature"
    )
    _assert_error(post({"tokens": [1, 1000]}, "/detokenize"), 400, param="tokens")
    # Unknown fields are ignored, as OpenAI clients expect.
    assert post({"prompt": "x", "max_tokens": 1, "some_future_field": {"a": 1}}).status_code == 200


def test_context_boundary(http):
    def ask(prompt_len: int, max_tokens: int, path: str = "/v1/completions"):
        return http.post(
            path,
            json={
                "model": MODEL,
                "prompt": [2] + [100] * (prompt_len - 1),
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            },
        )

    ok = ask(MAX_MODEL_LEN - 4, 4)  # exactly the limit
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] == 4
    error = _assert_error(ask(MAX_MODEL_LEN - 3, 4), 400, code="context_length_exceeded", param="prompt")
    assert (
        f"{MAX_MODEL_LEN}" in error["message"]
        and "65 tokens (61 in the prompt, 4 for the completion)" in error["message"]
    )
    # Without max_tokens the rest of the context is the budget; a prompt filling it leaves none.
    filled = http.post("/v1/completions", json={"prompt": [2] * (MAX_MODEL_LEN - 1), "ignore_eos": True})
    assert filled.status_code == 200 and filled.json()["usage"]["completion_tokens"] == 1
    _assert_error(
        http.post("/v1/completions", json={"prompt": [2] * MAX_MODEL_LEN}), 400, code="context_length_exceeded"
    )


def test_unknown_model_404(client, http):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-nope", prompt="x", max_tokens=1)
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found"
    _assert_error(
        http.post("/v1/chat/completions", json={"model": "nope", "messages": CHAT}),
        404,
        code="model_not_found",
        param="model",
    )
    _assert_error(http.get("/v1/nothing-here"), 404)


def test_body_cap_413(http):
    r = http.post("/v1/completions", json={"prompt": "x" * (BODY_CAP + 10), "max_tokens": 1})
    _assert_error(r, 413, code="request_too_large")

    def chunked():  # no Content-Length: counted while reading
        for _ in range(BODY_CAP // 1024 + 2):
            yield b" " * 1024

    _assert_error(http.post("/v1/completions", content=chunked()), 413, code="request_too_large")


def test_api_key_401(server):
    url = server.url
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {API_KEY.upper()}"},
        {"Authorization": f"Bearer {API_KEY}x"},
        {"Authorization": API_KEY},
    ):
        _assert_error(
            httpx.post(url + "/v1/completions", json={"prompt": "x"}, headers=headers), 401, code="invalid_api_key"
        )
    for path in ("/v1/models", "/metrics", "/tokenize"):
        assert httpx.get(url + path).status_code == 401
    assert httpx.get(url + "/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_queue_full_429(server, client, http):
    engine = server.state.engine
    saved = engine.max_active
    engine.max_active = 1
    try:
        with _slow_engine(server, 0.05):
            body = {"model": MODEL, "prompt": "Busy", "max_tokens": 40, "ignore_eos": True, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200  # headers come after admission: it holds the only place for ~2 s
                busy = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
                _assert_error(busy, 429, code="queue_full")
                assert busy.headers["Retry-After"] == "1"
                with pytest.raises(openai.RateLimitError):
                    client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1)
    finally:
        engine.max_active = saved
    _wait_idle(server)


def test_cors_off_by_default(server, http):
    """No --cors-origin: no Access-Control-Allow-Origin on answers or preflights, whatever the Origin."""
    origin = {"Origin": "http://app.example"}
    assert "access-control-allow-origin" not in http.get("/v1/models", headers=origin).headers
    preflight = http.options("/v1/completions", headers={**origin, "Access-Control-Request-Method": "POST"})
    assert preflight.status_code >= 400 and "access-control-allow-origin" not in preflight.headers


def test_not_ready_503(server, http):
    server.state.draining = True
    try:
        assert httpx.get(server.url + "/health").status_code == 503
        _assert_error(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}), 503, code="draining")
    finally:
        server.state.draining = False
    assert httpx.get(server.url + "/health").status_code == 200

    from starlette.testclient import TestClient

    release = threading.Event()

    def slow_load():
        release.wait(10)
        raise RuntimeError("no such checkpoint")

    with TestClient(create_app(load=slow_load)) as loading:
        assert loading.get("/health").status_code == 503
        _assert_error(loading.post("/v1/completions", json={"prompt": "x"}), 503, code="not_ready", match="loading")
        release.set()
        deadline = time.monotonic() + 5
        while "failed" not in loading.post("/v1/completions", json={"prompt": "x"}).json()["error"]["message"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)


def test_engine_fault_500_and_recovery(server, http):
    engine = server.llm.engine
    real_step = engine.step
    faults = iter(range(2))

    def failing_step():
        if next(faults, None) is not None:
            raise RuntimeError("simulated device fault")
        return real_step()

    engine.step = failing_step
    try:
        r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        _assert_error(r, 500, code="engine_error", match="simulated device fault")
        with http.stream("POST", "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "stream": True}) as s:
            assert s.status_code == 200
            events = _events(s)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "engine_error"
    finally:
        del engine.step
    _wait_idle(server)
    ok = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200


# ----------------------------------------------------------------------------------------------------------------------
# Disconnects and load
# ----------------------------------------------------------------------------------------------------------------------


def _abort_count(http) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith('gemma4_jax_request_success_total{finished_reason="abort"}'):
            return float(line.split()[-1])
    return 0.0


def test_disconnects_free_every_page(server, http):
    engine = server.llm.engine
    before = _abort_count(http)
    with _slow_engine(server):

        def give_up(i: int) -> int:
            body = {"model": MODEL, "prompt": f"client {i}", "max_tokens": 40, "ignore_eos": True, "stream": True}
            with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
                with c.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    if i < MAX_NUM_SEQS:  # running: read a few tokens first; the rest give up while queued
                        lines = r.iter_lines()
                        for _ in range(3):
                            next(lines)
            return i

        def give_up_blocking(i: int) -> None:  # a non-streaming client that times out
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(
                    server.url + "/v1/completions",
                    json={"prompt": f"slow {i}", "max_tokens": 40, "ignore_eos": True},
                    headers={"Authorization": f"Bearer {API_KEY}"},
                    timeout=0.3,
                )

        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(give_up, i) for i in range(8)] + [pool.submit(give_up_blocking, i) for i in range(4)]
            for f in futures:
                f.result()
        _wait_idle(server)
        assert engine.num_used_pages == 0
        assert len(engine.free_slots) == engine.config.max_num_seqs
        assert not engine.requests
        assert _abort_count(http) - before >= 10  # nearly all were cut short, not run to the end
    t0 = time.monotonic()
    ok = http.post("/v1/completions", json={"prompt": "after", "max_tokens": 2})
    assert ok.status_code == 200 and time.monotonic() - t0 < 5


def test_concurrent_streaming_clients(server):
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, int, str | None]:
        stream = await client.completions.create(
            model=MODEL,
            prompt=f"load {i % 8}",
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        text, finishes, usage = "", [], None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                if chunk.choices[0].finish_reason:
                    finishes.append(chunk.choices[0].finish_reason)
            if chunk.usage:
                usage = chunk.usage
        assert finishes == ["length"]
        return text, usage.completion_tokens, finishes[0]

    async def burst():
        async with openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60
        ) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(64))), 60)

    def rss_mib() -> float:
        with open("/proc/self/statm") as f:  # the server runs in this process (a thread)
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    rss = []
    for _ in range(3):
        results = asyncio.run(burst())
        assert len(results) == 64 and all(tokens == 6 for _, tokens, _ in results)
        # greedy: the same prompt gives the same text whatever batch it ran in
        for i in range(8, 64):
            assert results[i][0] == results[i % 8][0]
        _wait_idle(server)
        assert server.llm.engine.num_used_pages == 0 and not server.llm.engine.requests
        gc.collect()
        rss.append(rss_mib())
    # Memory flat: after the first (warm-up) burst, two more bursts of 64 clients retain nothing per request.
    assert rss[-1] - rss[0] < 48, f"resident memory grew across bursts: {rss} MiB"
    metrics = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    for name in (
        "gemma4_jax_time_to_first_token_seconds_count",
        "gemma4_jax_inter_token_latency_seconds_count",
        "gemma4_jax_e2e_request_latency_seconds_count",
        "gemma4_jax_request_queue_time_seconds_count",
        "gemma4_jax_generation_tokens_total",
        "gemma4_jax_prompt_tokens_total",
    ):
        value = next(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name + " "))
        assert value >= 64, name
    assert "gemma4_jax_kv_pages_used 0.0" in metrics


HOSTILE = [None, -1, 0, 2**63, -(2**63), 1e308, -1e308, 0.5, "x", "", "9" * 300, [], [1], ["a"], {}, {"a": 1}, True]


# temperature=1e308 is valid (finite) but overflows the sampler's float32 column to inf (harmless: uniform sampling).
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_fuzzed_fields_never_5xx(server, http):
    """Each field of each request, one at a time, set to hostile values: a clear 4xx or a normal answer, never 5xx."""
    bases = {
        "/v1/completions": {"model": MODEL, "prompt": "x", "max_tokens": 1},
        "/v1/chat/completions": {"model": MODEL, "messages": CHAT, "max_tokens": 1},
        "/tokenize": {"prompt": "x"},
        "/detokenize": {"tokens": [16]},
    }
    fields = {
        "/v1/completions": [
            "model",
            "prompt",
            "max_tokens",
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "seed",
            "stop",
            "stop_token_ids",
            "ignore_eos",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "logit_bias",
            "skip_special_tokens",
            "stream",
            "stream_options",
            "user",
            "echo",
            "suffix",
            "best_of",
            "n",
        ],
        "/v1/chat/completions": [
            "messages",
            "max_completion_tokens",
            "tools",
            "tool_choice",
            "response_format",
            "add_generation_prompt",
            "chat_template_kwargs",
            "top_logprobs",
        ],
        "/tokenize": ["prompt", "messages", "add_special_tokens"],
        "/detokenize": ["tokens"],
    }
    for path, names in fields.items():
        for name in names:
            for value in HOSTILE:
                body = {**bases[path], name: value}
                r = http.post(path, json=body)
                assert r.status_code < 500, (path, name, value, r.text)
                if r.status_code >= 400:
                    assert r.json()["error"]["message"], (path, name, value)
    # Declared JSON: a POST body without a JSON Content-Type is refused (415) before it is parsed (issue 16: CSRF).
    json_type = {"content-type": "application/json"}
    for raw in (b"", b"null", b"[]", b"1", b'"s"', b"{", b"\xff\xfe"):
        for path in bases:
            assert http.post(path, content=raw, headers=json_type).status_code == 400, (path, raw)
    nan = b'{"prompt": "x", "temperature": NaN}'
    assert http.post("/v1/completions", content=nan, headers=json_type).status_code == 400
    _wait_idle(server)
    assert server.llm.engine.num_used_pages == 0


def test_bench_serve_against_live_server(server):
    """The serving benchmark drives the live server and reports complete, plausible figures."""
    import asyncio
    import math

    from gemma4_jax.bench.serving_load import format_report, run

    result = asyncio.run(
        run(
            server.url,
            MODEL,
            num_prompts=6,
            input_len=8,
            output_len=4,
            vocab_size=512,
            request_rate=math.inf,
            max_concurrency=3,
            api_key=API_KEY,
        )
    )
    assert result["completed"] == 6 and result["failed"] == 0, result["errors"]
    assert result["output_throughput"] > 0
    assert 0 < result["ttft"]["median_ms"] < 60_000 and result["tpot"]["mean_ms"] > 0
    assert "TTFT" in format_report(result)
    _wait_idle(server)


def test_sigterm_drains_then_stops(server, http):
    """Last: SIGTERM stops admission at once, lets a short request finish, ends a long one with an error event and
    [DONE] before the grace period is over, and leaves no KV page behind."""
    grace = 4
    server.state.config.grace_period_s = server.uvicorn.config.timeout_graceful_shutdown = grace
    engine = server.llm.engine

    def stream(max_tokens: int) -> list:
        body = {"model": MODEL, "prompt": "drain", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as c:
            with c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                return _events(r)

    def decoding() -> bool:  # both past their first decode step: no compile left to eat the grace period
        running = list(engine.running)
        return len(running) == 2 and all(len(r.output_ids) >= 2 for r in running)

    with _slow_engine(server, 0.1), ThreadPoolExecutor(2) as pool:
        short, long = pool.submit(stream, 10), pool.submit(stream, 55)  # ~1 s and ~5.5 s of decoding
        deadline = time.monotonic() + 30
        while not decoding():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        t0 = time.monotonic()
        server.uvicorn.handle_exit(signal.SIGTERM, None)
        time.sleep(0.2)
        assert not server.state.ready
        short_events, long_events = short.result(), long.result()
    assert short_events[-1] == "[DONE]" and short_events[-2]["choices"][0]["finish_reason"] == "length"
    assert long_events[-1] == "[DONE]" and long_events[-2]["error"]["code"] == "aborted"
    server.thread.join(10)
    assert not server.thread.is_alive() and time.monotonic() - t0 < grace + 2
    assert engine.num_used_pages == 0 and not engine.has_unfinished()
