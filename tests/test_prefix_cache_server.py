"""Prefix caching through the HTTP server: vLLM's metric names in /metrics advance with a repeated prompt, and
`POST /reset_prefix_cache` forgets the cached blocks (the same prompt then misses)."""

from __future__ import annotations

import re

import httpx
import pytest
from test_server import live_server

import gemma4_jax
from gemma4_jax.serving.demo import save_byte_level_tokenizer
from gemma4_jax.serving.server import ServerConfig, create_app
from hf_reference import make_text_checkpoint

API_KEY = "prefix-key"


@pytest.fixture(scope="module")
def http(ckpt_root):
    path = str(ckpt_root / "prefix_server_tiny")
    make_text_checkpoint(
        path,
        seed=13,
        vocab_size=512,
        vocab_size_per_layer_input=512,
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
    )
    save_byte_level_tokenizer(path)
    llm = gemma4_jax.LLM(
        path, dtype="float32", max_num_seqs=2, max_model_len=128, page_size=16, max_num_batched_tokens=64
    )
    app = create_app(llm, ServerConfig(served_model_name="m", api_key=API_KEY))
    with (
        live_server(app) as (url, _, _),
        httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {API_KEY}"}) as client,
    ):
        yield client


def _counters(http: httpx.Client) -> tuple[float, float]:
    text = http.get("/metrics").text
    values = [
        float(re.search(rf"^gemma4_jax_prefix_cache_{name}_total (\S+)$", text, re.M).group(1))
        for name in ("queries", "hits")
    ]
    return values[0], values[1]


def test_metrics_and_reset(http):
    prompt = list(range(20, 60))  # 40 tokens: two full blocks of 16 can be reused
    body = {"model": "m", "prompt": prompt, "max_tokens": 2, "temperature": 0}
    assert http.post("/v1/completions", json=body).status_code == 200
    queries, hits = _counters(http)
    assert (queries, hits) == (40, 0)
    assert http.post("/v1/completions", json=body).status_code == 200
    assert _counters(http) == (80, 32)
    # Like every POST here it must be declared JSON (a web page cannot send that cross-origin without a preflight),
    # body or not.
    assert http.post("/reset_prefix_cache").status_code == 415
    assert _counters(http) == (80, 32)
    reset = http.post("/reset_prefix_cache", headers={"Content-Type": "application/json"})
    assert reset.status_code == 200
    assert http.post("/v1/completions", json=body).status_code == 200
    assert _counters(http) == (120, 32)  # the reset cache missed
