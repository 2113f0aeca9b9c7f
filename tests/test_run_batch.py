"""`gemma4-jax run-batch` (serving/batch_file.py): OpenAI batch files as `vllm run-batch` runs them: per-line
parameters honoured through the server's own validation, bad lines answered with error lines (the batch goes on),
output flushed per line, and a restart skipping the custom_ids already written (a torn last line cut off first)."""

from __future__ import annotations

import json

import pytest

from gemma4_jax import cli
from gemma4_jax.serving.batch_file import finished_ids, parse_line

LIMITS = ["--max-num-seqs", "2", "--max-model-len", "64", "--max-num-batched-tokens", "16", "--no-compilation-cache"]
CHAT = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    # The same recipe as tests/test_warmup.py: one checkpoint (and its compiled steps) for both files.
    return tiny_checkpoint(
        "warmup_tiny1", seed=5, tokenizer=True, num_hidden_layers=1, layer_types=["full_attention"]
    ).path


def _line(custom_id, url, **body):
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "tiny", **body}})


def _read(path):
    return {r["custom_id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_parse_line_refusals():
    seen: set[str] = set()
    assert parse_line(1, "{nope", seen).error.startswith("line 1: not valid JSON")
    assert "custom_id" in parse_line(2, json.dumps({"url": "/v1/completions", "body": {}}), seen).error
    assert parse_line(3, _line("a", "/v1/completions", prompt="x"), seen).error is None
    assert "appears more than once" in parse_line(4, _line("a", "/v1/completions", prompt="x"), seen).error
    assert "url must be one of" in parse_line(5, _line("b", "/v1/embeddings", input="x"), seen).error
    assert (
        "'stream' is not supported" in parse_line(6, _line("c", "/v1/completions", prompt="x", stream=True), seen).error
    )
    bad_method = json.dumps({"custom_id": "d", "method": "GET", "url": "/v1/completions", "body": {}})
    assert "method must be POST" in parse_line(7, bad_method, seen).error


def test_run_batch_file_and_resume(checkpoint, tmp_path, capsys):
    source, results = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    lines = [
        _line("chat", "/v1/chat/completions", messages=CHAT, max_tokens=3, temperature=0),
        _line("logprobs", "/v1/completions", prompt="abc", max_tokens=2, logprobs=2, n=2),
        _line("echo", "/v1/completions", prompt="echo", max_tokens=1, echo=True),
        "{not json",
        _line("embed", "/v1/embeddings", input="x"),
        _line("bad-temperature", "/v1/completions", prompt="x", temperature=-1),
        _line("chat", "/v1/chat/completions", messages=CHAT),
        _line("too-long", "/v1/completions", prompt="y" * 80, max_tokens=4),
    ]
    source.write_text("\n".join(lines) + "\n")
    assert cli.main(["run-batch", "-i", str(source), "-o", str(results), checkpoint, *LIMITS]) == 0
    err = capsys.readouterr().err
    assert "run-batch" in err and "8/8" in err  # the progress bar, per finished line
    out = _read(results)  # by custom_id: the duplicate's error line is written first, the real "chat" after it
    assert len(results.read_text().splitlines()) == 8
    chat = out["chat"]
    assert chat["response"]["status_code"] == 200 and chat["error"] is None
    assert chat["response"]["body"]["object"] == "chat.completion"
    assert chat["response"]["body"]["usage"]["completion_tokens"] <= 3  # per-line max_tokens
    assert chat["response"]["request_id"] == chat["response"]["body"]["id"] and chat["id"].startswith("batch_req_")
    choices = out["logprobs"]["response"]["body"]["choices"]
    assert len(choices) == 2 and all(len(c["logprobs"]["top_logprobs"][0]) == 2 for c in choices)
    assert out["echo"]["response"]["body"]["choices"][0]["text"].startswith("echo")
    assert out[None]["error"]["message"].startswith("line 4: not valid JSON")
    assert out["embed"]["response"]["status_code"] == 400 and "url must be one of" in out["embed"]["error"]["message"]
    bad = out["bad-temperature"]  # refused by the server's own validation, with its envelope
    assert bad["response"]["status_code"] == 400 and bad["response"]["body"] is None
    assert "temperature" in bad["error"]["message"]
    too_long = out["too-long"]
    assert too_long["response"]["status_code"] == 400 and "maximum context length" in too_long["error"]["message"]

    # Resume: a torn last line (killed mid-write) is cut; custom_ids already answered are skipped, new ones run (and
    # the line without a custom_id, which cannot be recognised, is answered again).
    with results.open("a") as f:
        f.write('{"id": "batch_req_torn", "custom_id": "new"')
    source.write_text("\n".join(lines + [_line("new", "/v1/completions", prompt="more", max_tokens=2)]) + "\n")
    assert cli.main(["run-batch", "-i", str(source), "-o", str(results), checkpoint, *LIMITS, "--quiet"]) == 0
    assert "2 line(s) run (1 with an error), 7 already in" in capsys.readouterr().err
    rows = results.read_text().splitlines()
    assert len(rows) == 10 and json.loads(rows[-1])["custom_id"] == "new"
    assert finished_ids(str(results)) == {"chat", "logprobs", "echo", "embed", "bad-temperature", "too-long", "new"}
