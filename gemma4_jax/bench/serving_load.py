"""Serving load benchmark in the style of `vllm bench serve`: random prompts against a running server.

Requests go to `/v1/completions` as token-id prompts (so prompt lengths are exact whatever the tokenizer), with
`ignore_eos` so every request produces exactly `output_len` tokens, streamed. Arrivals follow a Poisson process at
`request_rate` requests/s (inf: all at once), capped at `max_concurrency` in flight. Reported: request and output
throughput, TTFT, TPOT (time per output token after the first) and ITL (gaps between streamed chunks) as mean /
median / p99, all from the client's side.

Only loopback or the user's own server: the URL is the user's choice, nothing else is contacted. `gemma4-jax bench
--url URL` runs it (cli.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import time

import httpx
import numpy as np

from gemma4_jax.bench.presets import FIRST_ORDINARY_ID


@dataclasses.dataclass
class RequestResult:
    """One streamed request as the client saw it: times in seconds from its send, ITL = gaps between chunks."""

    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)
    output_tokens: int = 0
    error: str = ""


async def _one(
    client: httpx.AsyncClient, url: str, model: str, prompt: list[int], output_len: int, api_key: str | None
) -> RequestResult:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    start = time.perf_counter()
    last = start
    result = RequestResult(ok=False)
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = str(chunk["error"])
                    return result
                now = time.perf_counter()
                if chunk.get("choices"):
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
        result.latency = time.perf_counter() - start
        result.ok = True
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean_ms": float("nan"), "median_ms": float("nan"), "p99_ms": float("nan")}
    a = np.asarray(values) * 1e3
    return {"mean_ms": float(a.mean()), "median_ms": float(np.median(a)), "p99_ms": float(np.percentile(a, 99))}


async def run(
    url: str,
    model: str,
    num_prompts: int,
    input_len: int,
    output_len: int,
    vocab_size: int,
    request_rate: float = math.inf,
    max_concurrency: int | None = None,
    seed: int = 0,
    api_key: str | None = None,
    first_ordinary_id: int = FIRST_ORDINARY_ID,
) -> dict:
    """Send `num_prompts` requests; returns the figures as a dict."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(first_ordinary_id, vocab_size) for _ in range(input_len)] for _ in range(num_prompts)]
    limit = asyncio.Semaphore(max_concurrency or num_prompts)
    timeout = httpx.Timeout(None, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=num_prompts)) as client:

        async def gated(prompt):
            async with limit:
                return await _one(client, url, model, prompt, output_len, api_key)

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(gated(prompt)))
            if math.isfinite(request_rate):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + input_len * len(ok)) / duration,
        "ttft": _stats([r.ttft for r in ok]),
        "tpot": _stats(tpot),
        "itl": _stats([x for r in ok for x in r.itl]),
        "config": {
            "num_prompts": num_prompts,
            "input_len": input_len,
            "output_len": output_len,
            "request_rate": request_rate,
            "max_concurrency": max_concurrency,
        },
    }


def format_report(r: dict) -> str:
    """Human-readable summary of a `run` result: throughputs and TTFT / TPOT / ITL mean, median, p99."""
    lines = [
        f"completed {r['completed']} / failed {r['failed']} in {r['duration_s']:.2f} s",
        f"request throughput  {r['request_throughput']:.2f} req/s",
        f"output throughput   {r['output_throughput']:.1f} tok/s",
        f"total throughput    {r['total_token_throughput']:.1f} tok/s",
    ]
    for name in ("ttft", "tpot", "itl"):
        s = r[name]
        lines.append(
            f"{name.upper():5s} mean {s['mean_ms']:.1f} ms  median {s['median_ms']:.1f} ms  p99 {s['p99_ms']:.1f} ms"
        )
    if r["errors"]:
        lines.append("errors: " + "; ".join(r["errors"]))
    return "\n".join(lines)
