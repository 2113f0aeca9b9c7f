"""A soak of the HTTP server (issue 16): a mixed load against a live uvicorn server on 127.0.0.1 serving a tiny
image + audio checkpoint, with the checks a long-running deployment needs at the end.

Workers send, at random (seeded): valid completions and chats, streamed or not, some with an image or an audio
clip; invalid requests of every kind the server refuses (bad JSON, wrong types and ranges, unknown model, no key,
wrong Content-Type or Host, lone surrogates, a seed that overflows, never-admittable n, over the context, bad
media, an oversized body); clients that disconnect mid-stream or give up waiting. Meanwhile /health is polled and a
probe on the server's event loop measures its stalls. At the end: every answer was expected (no 5xx), no KV page
is in use, resident memory did not grow after the warm-up, and the worst /health latency and event-loop stall are
printed and bounded.

A warm-up first runs the same load until no new step shape compiles (compiled code is memory that stays). The short
variant (15 s of load, about a minute in all) runs with the suite; the `slow` one soaks for 3 minutes.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import gc
import json
import os
import random
import threading
import time

import httpx
import pytest

pytest.importorskip("PIL")

from test_server import live_server  # noqa: E402

import gemma4_jax  # noqa: E402
from gemma4_jax.serving.mm_inputs import ServingLimits  # noqa: E402
from gemma4_jax.serving.server import ServerConfig, create_app  # noqa: E402
from mm_fixtures import make_mm_checkpoint, noise, png_bytes, wav_bytes  # noqa: E402

API_KEY = "soak-key"
MODEL = "soak-mm"
MAX_MODEL_LEN = 128
AUTH = {"Authorization": f"Bearer {API_KEY}"}
JSON = {"content-type": "application/json"}
IMAGE = "data:image/png;base64," + base64.b64encode(png_bytes(40, 60, seed=3)).decode()
AUDIO = base64.b64encode(wav_bytes(noise(2900, seed=4))).decode()
BODY_CAP = 256 * 1024
WORKERS = 6


@pytest.fixture(scope="module")
def server(ckpt_root):
    path = str(ckpt_root / "soak_mm")
    make_mm_checkpoint(path, seed=31)
    llm = gemma4_jax.LLM(
        path, dtype="float32", max_num_batched_tokens=64, max_model_len=MAX_MODEL_LEN, max_num_seqs=2, page_size=32
    )
    config = ServerConfig(
        served_model_name=MODEL,
        api_key=API_KEY,
        max_queue=8,  # so that bursts meet 429s
        max_n=2,
        max_body_bytes=BODY_CAP,
        media_limits=ServingLimits(max_images=2, max_audios=1, max_audio_seconds=1.0),
    )
    app = create_app(llm, config)
    with live_server(app) as (url, uv, thread):
        yield type("Live", (), {"url": url, "llm": llm, "state": app.state.server})


# ----------------------------------------------------------------------------------------------------------------------
# The mixed load: each kind of request with the statuses it may get
# ----------------------------------------------------------------------------------------------------------------------

BUSY = {429}  # any admitted request may meet a full queue under load


def _image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _chat(content, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 3, **extra}


def _valid(rng: random.Random, kind: int | None = None) -> tuple[str, dict, set[int]]:
    kind = rng.randrange(6) if kind is None else kind
    stream = rng.random() < 0.5
    if kind == 0:
        body = {"model": MODEL, "prompt": f"soak {rng.randrange(50)}", "max_tokens": rng.randint(1, 6)}
        return "/v1/completions", {**body, "stream": stream, "n": rng.randint(1, 2)}, {200} | BUSY
    if kind == 1:
        return "/v1/chat/completions", _chat(f"hello {rng.randrange(50)}", stream=stream), {200} | BUSY
    if kind == 2:
        parts = [_image_part(IMAGE), {"type": "text", "text": "what?"}]
        return "/v1/chat/completions", _chat(parts, stream=stream), {200} | BUSY
    if kind == 3:
        parts = [
            {"type": "input_audio", "input_audio": {"data": AUDIO, "format": "wav"}},
            {"type": "text", "text": "?"},
        ]
        return "/v1/chat/completions", _chat(parts, stream=stream), {200} | BUSY
    if kind == 4:
        return "/tokenize", {"messages": [{"role": "user", "content": f"count {rng.randrange(99)}"}]}, {200}
    return "/detokenize", {"tokens": [rng.randrange(16, 272) for _ in range(8)]}, {200}


# (path, body or raw bytes, extra headers, expected status)
_INVALID = [
    ("/v1/completions", b'{"prompt": "x",', JSON, 400),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, {}, 400),
    ("/v1/completions", {"prompt": "x", "top_p": 2}, {}, 400),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, {}, 404),
    ("/v1/completions", {"prompt": "x", "seed": 2**64 - 1, "n": 2}, {}, 400),
    ("/v1/completions", {"prompt": "x", "n": 2, "max_tokens": MAX_MODEL_LEN}, {}, 400),
    ("/v1/completions", {"prompt": ["a"] * 6, "n": 2, "max_tokens": 1}, {}, 400),  # 12 > 2 + 8: never admitted
    ("/v1/completions", json.dumps({"prompt": "bad \ud800"}).encode(), JSON, 400),
    ("/v1/completions", json.dumps({"prompt": "x"}).encode(), {"content-type": "text/plain"}, 415),
    ("/v1/completions", {"prompt": "x"}, {"Authorization": "Bearer wrong"}, 401),
    ("/v1/completions", {"prompt": "x"}, {"Host": "evil.example"}, 400),
    ("/v1/completions", {"prompt": "x" * (BODY_CAP + 1)}, {}, 413),
    (
        "/v1/chat/completions",
        _chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]),
        {},
        400,
    ),
    (
        "/v1/chat/completions",
        _chat([{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]),
        {},
        400,
    ),
    ("/v1/chat/completions", _chat("x", n=3), {}, 400),
    ("/v1/chat/completions", {"messages": []}, {}, 400),
    ("/tokenize", {"prompt": "x", "messages": []}, {}, 400),
    ("/detokenize", {"tokens": [1, 99999]}, {}, 400),
]


class Soak:
    def __init__(self, url: str):
        self.url = url
        self.statuses: collections.Counter = collections.Counter()
        self.unexpected: list = []
        self.disconnects = 0
        self.requests = 0

    def check(self, path: str, status: int, expected: set[int], text: str = "") -> None:
        self.requests += 1
        self.statuses[status] += 1
        if status not in expected:
            self.unexpected.append((path, status, text[:300]))

    async def one(self, client: httpx.AsyncClient, rng: random.Random) -> None:
        roll = rng.random()
        if roll < 0.3:  # invalid
            path, body, headers, status = rng.choice(_INVALID)
            kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
            r = await client.post(path, headers={**AUTH, **headers}, **kwargs)
            self.check(path, r.status_code, {status}, r.text)
            if r.status_code >= 400:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            return
        path, body, expected = _valid(rng)
        if roll < 0.4 and path.startswith("/v1/"):  # a client that goes away
            self.disconnects += 1
            if body.get("stream"):
                async with client.stream("POST", path, json=body, headers=AUTH) as r:
                    self.check(path, r.status_code, expected)
                    async for _ in r.aiter_lines():
                        break
            else:
                try:
                    r = await client.post(path, json=body, headers=AUTH, timeout=0.05)
                    self.check(path, r.status_code, expected, r.text)
                except httpx.TimeoutException:
                    pass
            return
        if body.get("stream"):
            async with client.stream("POST", path, json=body, headers=AUTH) as r:
                if r.status_code != 200:
                    await r.aread()
                    self.check(path, r.status_code, expected, r.text)
                    return
                lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
            self.check(path, r.status_code, expected)
            if lines[-1] != "data: [DONE]" or any('"error"' in line for line in lines):
                self.unexpected.append((path, "stream", lines[-2:]))
            return
        r = await client.post(path, json=body, headers=AUTH)
        self.check(path, r.status_code, expected, r.text)

    async def run(self, seconds: float, workers: int, seed: int) -> None:
        deadline = time.monotonic() + seconds
        limits = httpx.Limits(max_connections=workers * 2)
        async with httpx.AsyncClient(base_url=self.url, timeout=120, limits=limits) as client:

            async def worker(i: int) -> None:
                rng = random.Random(seed * 1000 + i)
                while time.monotonic() < deadline:
                    await self.one(client, rng)

            await asyncio.gather(*(worker(i) for i in range(workers)))


# ----------------------------------------------------------------------------------------------------------------------
# Probes
# ----------------------------------------------------------------------------------------------------------------------


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:  # the server runs in this process (a thread)
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class HealthProbe(threading.Thread):
    """Polls /health every 50 ms from its own thread; keeps the worst latency and any non-200."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.worst, self.polls, self.failures = url, 0.0, 0, []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                status = c.get("/health").status_code
                self.worst = max(self.worst, time.perf_counter() - t0)
                self.polls += 1
                if status != 200:
                    self.failures.append(status)
                time.sleep(0.05)


async def _loop_stalls(worst: list[float]) -> None:
    """On the server's event loop: how late a 10 ms sleep wakes up (its worst stall)."""
    loop = asyncio.get_running_loop()
    while True:
        t0 = loop.time()
        await asyncio.sleep(0.01)
        worst[0] = max(worst[0], loop.time() - t0 - 0.01)


def _wait_idle(server, timeout: float = 30.0) -> None:
    engine = server.llm.engine
    deadline = time.monotonic() + timeout
    while engine.num_used_pages or server.state.engine.num_active or engine.has_unfinished():
        assert time.monotonic() < deadline, f"not idle: {engine.num_used_pages} pages in use"
        time.sleep(0.05)


# ----------------------------------------------------------------------------------------------------------------------
# The soak
# ----------------------------------------------------------------------------------------------------------------------


def _warm_up(server, max_seconds: float = 30.0) -> int:
    """Compile what the load needs (compiled code is memory that stays): each valid kind alone and twice at once
    (batch buckets, prefill chunks of text, image and audio prompts, the towers), then the mixed load in 3 s rounds
    until two in a row compile no new step shape. Returns the number of compiled shapes."""
    engine = server.llm.engine
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=300) as c:
        for kind in range(4):
            path, body, _ = _valid(random.Random(kind), kind)
            for n in (1, 2):
                assert c.post(path, json={**body, "stream": False, "n": n}).status_code == 200
    deadline, quiet = time.monotonic() + max_seconds, 0
    for i in range(100):
        before = engine.stats["compiles"]
        asyncio.run(Soak(server.url).run(3, workers=WORKERS, seed=1000 + i))
        _wait_idle(server)
        quiet = quiet + 1 if engine.stats["compiles"] == before else 0
        if quiet == 2 or time.monotonic() > deadline:
            return engine.stats["compiles"]
    raise AssertionError("unreachable")


@pytest.mark.parametrize(
    # Both slow for now: late in the full suite (one process, ~400 tests before it), XLA's CPU compiler crashed
    # twice (SIGABRT, SIGSEGV) inside the engine thread's compile during this test's warm-up; alone, and with the
    # suite's server tests, it passes. Until that is understood it runs with `-m slow`, not in .ci/run.
    "seconds", [pytest.param(15, id="short", marks=pytest.mark.slow),
                pytest.param(180, id="3min", marks=pytest.mark.slow)]
)
def test_soak(server, seconds):
    engine = server.llm.engine
    compiled = _warm_up(server)
    gc.collect()
    rss_start = _rss_mib()

    stall = [0.0]
    monitor = asyncio.run_coroutine_threadsafe(_loop_stalls(stall), server.state.loop)
    health = HealthProbe(server.url)
    health.start()
    soak = Soak(server.url)
    t0 = time.monotonic()
    try:
        asyncio.run(soak.run(seconds, workers=WORKERS, seed=seconds))
    finally:
        health.stop.set()
        health.join(10)
        monitor.cancel()
    elapsed = time.monotonic() - t0
    _wait_idle(server)
    gc.collect()
    rss_end = _rss_mib()
    pages = engine.num_used_pages
    new_shapes = engine.stats["compiles"] - compiled

    by_status = dict(sorted(soak.statuses.items()))
    print(
        f"\nsoak {elapsed:.0f} s after a warm-up of {compiled} compiled shapes: {soak.requests} requests "
        f"({soak.disconnects} disconnecting), by status {by_status}; /health worst {health.worst * 1000:.0f} ms over "
        f"{health.polls} polls; event-loop worst stall {stall[0] * 1000:.0f} ms; RSS {rss_start:.0f} -> "
        f"{rss_end:.0f} MiB; KV pages in use {pages}; shapes compiled during the soak {new_shapes}"
    )
    assert not soak.unexpected, soak.unexpected[:10]
    assert not [s for s in soak.statuses if s >= 500]
    assert not health.failures, health.failures[:10]
    assert pages == 0 and not engine.requests and server.state.engine.num_active == 0
    assert soak.requests > 10 * seconds and {200, 400, 413, 415}.issubset(soak.statuses)
    # The bar is ~0.1 s; the bound leaves room for a machine shared with other work (figures: docs/server.md).
    assert health.worst < 0.5 and stall[0] < 0.5, (health.worst, stall[0])
    # Memory flat after the warm-up: allocator noise, not a per-request leak (1 KiB per request would show as
    # several MiB); a step shape first met during the soak brings its compiled code (tens of MiB).
    assert rss_end - rss_start < 32 + 48 * new_shapes, f"resident memory grew: {rss_start:.0f} -> {rss_end:.0f} MiB"
