"""Schemathesis over the server's own OpenAPI schema against a real `gemma4-jax serve` process: no 5xx.

The schema describes valid bodies closely (ranges, enums, lengths, the running server's limits: model name, n,
context, vocabulary), so positive generation mostly produces requests the server accepts and that reach the code
behind validation (tokenizer, chat template, sampling, engine); the test checks that most do (2xx), which is what
lets it find a fault there. The server is a tiny two-layer checkpoint with a short context and one sequence slot,
so each request is bounded in time and only a few step shapes compile. The slow variant adds negative data and
schemathesis' coverage phase.
"""

import collections
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest

from gemma4_jax.serving.demo import save_byte_level_tokenizer
from hf_reference import make_text_checkpoint

pytestmark = pytest.mark.skipif(shutil.which("schemathesis") is None, reason="schemathesis is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ckpt_root, tmp_path_factory):
    path = str(ckpt_root / "fuzz_tiny")
    make_text_checkpoint(
        path,
        seed=3,
        vocab_size=512,
        vocab_size_per_layer_input=512,
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
    )
    save_byte_level_tokenizer(path)
    port = _free_port()
    log_path = tmp_path_factory.mktemp("fuzz") / "server.log"
    log = open(log_path, "w")  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, "-m", "gemma4_jax.cli", "serve", "--model", path, "--dtype", "float32", "--port", str(port)]
        + ["--max-model-len", "64", "--max-num-seqs", "1", "--max-num-batched-tokens", "16", "--max-n", "2"]
        + ["--enforce-eager"],  # ready as soon as loaded (the warm-up would outlast the deadline below)
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _schemathesis(url: str, tmp_path, *options: str) -> dict[tuple[str, int], int]:
    """Run schemathesis (failing the test on any 5xx); returns how many requests each (route, status) got."""
    har = tmp_path / "run.har"
    run = subprocess.run(
        ["schemathesis", "run", f"{url}/openapi.json", "--checks", "not_a_server_error", "--workers", "1"]
        + ["--request-timeout", "60", "--seed", "1234", "--no-color", "--report", "har", "--report-har-path", str(har)]
        + list(options),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    counts = collections.Counter()
    for entry in json.loads(har.read_text())["log"]["entries"]:
        route = entry["request"]["url"].removeprefix(url).split("?")[0]
        counts[(route, entry["response"]["status"])] += 1
    return counts


def _report(counts) -> tuple[int, int]:
    total = sum(counts.values())
    ok = sum(n for (_, status), n in counts.items() if 200 <= status < 300)
    print(f"schemathesis: {total} requests, {ok} answered 2xx; by route and status: {dict(sorted(counts.items()))}")
    return total, ok


def test_schemathesis_positive_requests_reach_the_handlers(served, tmp_path):
    counts = _schemathesis(
        served, tmp_path, "--mode", "positive", "--phases", "coverage,fuzzing", "--max-examples", "25"
    )
    total, ok = _report(counts)
    assert not [key for key in counts if key[1] >= 500]
    assert total >= 150 and ok >= 0.75 * total, "the schema no longer describes requests the server accepts"
    for route in ("/tokenize", "/detokenize", "/v1/completions", "/v1/chat/completions"):
        assert counts[(route, 200)] >= 20, (route, counts)


@pytest.mark.slow
def test_schemathesis_all_phases_and_negative_data(served, tmp_path):
    counts = _schemathesis(served, tmp_path, "--mode", "all", "--phases", "coverage,fuzzing", "--max-examples", "100")
    total, _ = _report(counts)
    assert total > 500 and not [key for key in counts if key[1] >= 500]
