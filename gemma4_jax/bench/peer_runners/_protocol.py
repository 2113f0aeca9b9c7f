"""The line protocol between `gemma4-jax bench --peers` (peers.py) and one system's runner process.

Every system (ours, HF transformers, vLLM CPU, llama.cpp) runs in its own process, started with the python of its
own virtual environment, so this file imports only the standard library: it is loaded from the runner's folder,
not from the gemma4_jax package, and must work in a venv where gemma4_jax is not installed.

Protocol, after `python <runner>.py SPEC.json`:
1. the runner loads its model, warms up every batch size on the spec's warm-up prompts (all compiles, lazy
   initialisation and allocator growth happen here), then emits `{"ready": true, "info": {...}}`;
2. for each stdin line `{"cmd": "run", "batch": B, "num_prompts": N}` it generates `output_len` greedy tokens for
   each of the first N timed prompts, at most B sequences in flight, and emits `{"wall_s",
   "output_tokens", "tokens", "extra"}`; `{"cmd": "quit"}` ends it.
Messages go to the original stdout with a marker prefix; the runner's own stdout (library banners, C code writing
to fd 1) is sent to stderr, so nothing a library prints can be mistaken for a message.

SPEC.json: {"checkpoint": path, "dtype": "float32"|"bfloat16", "batch_sizes": [64, 1], "output_len": 64,
"max_model_len": 192, "warmup_prompts": [[ids]], "timed_prompts": [[ids]], "threads": 2, "options": {...}}.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

MARKER = "@@peer-runner "

# A runner's system: (prompts, batch) -> the generated token ids of each prompt, in order.
RunFn = Callable[[Sequence[Sequence[int]], int], list[list[int]]]


def _claim_stdout() -> Any:
    """A private handle on the real stdout; fd 1 is pointed at stderr from now on."""
    sys.stdout.flush()
    private = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return private


_OUT = None


def emit(message: dict[str, Any]) -> None:
    """Send one message to the orchestrator."""
    _OUT.write(MARKER + json.dumps(message) + "\n")
    _OUT.flush()


def log(text: str) -> None:
    print(f"[runner] {text}", file=sys.stderr, flush=True)


# Per-run facts a runner may add (e.g. our engine's compile count during the run); emitted with the run, then reset.
EXTRA: dict[str, Any] = {}


def batched(run_batch: Callable[[Sequence[Sequence[int]]], list[list[int]]]) -> RunFn:
    """A RunFn from a function that generates for one group of prompts at once: groups of `batch` in order."""

    def run(prompts: Sequence[Sequence[int]], batch: int) -> list[list[int]]:
        tokens: list[list[int]] = []
        for start in range(0, len(prompts), batch):
            tokens.extend(run_batch(prompts[start : start + batch]))
        return tokens

    return run


def serve(make: Callable[[dict[str, Any]], tuple[RunFn, dict[str, Any]]]) -> None:
    """Run the protocol: `make(spec)` loads the system and returns its RunFn and a dict describing it."""
    global _OUT
    _OUT = _claim_stdout()
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    try:
        t0 = time.perf_counter()
        run, info = make(spec)
        info["load_s"] = time.perf_counter() - t0
        warmup_s = {}
        for batch in spec["batch_sizes"]:
            log(f"warm-up at batch {batch}")
            t0 = time.perf_counter()
            tokens = run(spec["warmup_prompts"][: max(batch, 1) * 2], batch)
            if any(len(t) != spec["output_len"] for t in tokens):
                raise RuntimeError(f"warm-up produced {[len(t) for t in tokens]} tokens, not {spec['output_len']}")
            warmup_s[str(batch)] = time.perf_counter() - t0
        info["warmup_s"] = warmup_s
    except Exception as e:  # the orchestrator reports it and skips this system
        emit({"ready": False, "error": f"{type(e).__name__}: {e}"})
        raise
    emit({"ready": True, "info": info})
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "quit":
            break
        prompts = spec["timed_prompts"][: command["num_prompts"]]
        EXTRA.clear()
        t0 = time.perf_counter()
        tokens = run(prompts, command["batch"])
        wall = time.perf_counter() - t0
        emit(
            {
                "wall_s": wall,
                "output_tokens": sum(len(t) for t in tokens),
                "tokens": tokens,
                "extra": dict(EXTRA),
            }
        )
