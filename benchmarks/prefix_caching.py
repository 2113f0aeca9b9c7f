"""Prefix caching benchmark: multi-turn chat sharing a long system prompt, caching on vs off in the same run
(docs/prefix_caching.md).

Workload (as vLLM's multi-turn prefix-caching benchmarks): C conversations x T turns. Every conversation starts with
the same system prompt; turn t's prompt is turn t-1's prompt + its answer + a new user message. A turn is sent when
the conversation's previous answer is back; the turns of all conversations run as one wave (C requests in flight,
max_num_seqs at a time). Two engines over the same weights, caching on and off, run the waves alternately, so the
machine's load falls on both alike; each first runs the whole workload once with other random tokens (compiles every
shape), then resets its cache and runs it timed.

Reported per engine: prompt-token hit rate (vLLM's prefix_cache_hits / prefix_cache_queries) against the ideal (the
fraction of prompt tokens some earlier request had already computed: its own previous turn, or the system prompt of
an earlier conversation, even one still running; "blocks": the same in whole blocks, what a block cache can
reuse), mean / p50 TTFT, throughput (prompt + generated tokens per wall second), and whether the
greedy tokens of both engines agree. Then the cost of caching on a workload with no shared prefix (random prompts of
the same lengths): wall time on vs off, alternated over repeats.

Usage: python benchmarks/prefix_caching.py [--preset tiny] [--conversations 32] [--turns 8] [--system-len 1024]
       [--user-len 32] [--output-len 16] [--max-num-seqs 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from gemma4_jax.bench.presets import FIRST_ORDINARY_ID, bench_config
from gemma4_jax.model import from_config
from gemma4_jax.serving.engine import Engine, EngineConfig
from gemma4_jax.serving.sampling import SamplingParams


class Chat:
    """The conversations of one engine: their histories grow with that engine's own answers."""

    def __init__(self, engine: Engine, system: list[int], users: list[list[list[int]]], output_len: int):
        self.engine, self.system, self.users = engine, system, users
        self.params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        self.history = [list(system) for _ in users]
        self.answers: list[list[int]] = []
        self.ttft: list[float] = []
        self.wall = 0.0
        self.tokens = 0  # prompt + generated
        self.ideal = 0  # prompt tokens an earlier request had computed
        self.ideal_blocks = 0  # the same in whole blocks, the prompt's last token excluded (what a cache can reuse)
        self.prompt_tokens = 0

    def wave(self, turn: int) -> None:
        """Turn `turn` of every conversation, all in flight at once."""
        engine = self.engine
        prompts = [h + u[turn] for h, u in zip(self.history, self.users, strict=True)]
        for c, prompt in enumerate(prompts):
            earlier = len(self.history[c]) - 1 if turn else (len(self.system) if c else 0)
            self.ideal += earlier  # the previous turn's tokens minus its last answer token (never fed)
            page = engine.config.page_size
            self.ideal_blocks += min(earlier, len(prompt) - 1) // page * page
            self.prompt_tokens += len(prompt)
        t0 = time.perf_counter()
        ids = [engine.add_request(p, self.params) for p in prompts]
        first: dict[str, float] = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.token_ids and out.request_id not in first:
                    first[out.request_id] = time.perf_counter()
        self.wall += time.perf_counter() - t0
        outs = [engine.release(i) for i in ids]
        self.ttft += [first[i] - t0 for i in ids]
        for c, (prompt, out) in enumerate(zip(prompts, outs, strict=True)):
            self.history[c] = prompt + out.token_ids
            self.answers.append(out.token_ids)
            self.tokens += len(prompt) + len(out.token_ids)


def _tokens(rng, n: int, vocab: int) -> list[int]:
    return rng.integers(FIRST_ORDINARY_ID, vocab, size=n).tolist()


def _workload(seed: int, args, vocab: int):
    rng = np.random.default_rng(seed)
    system = [2, *_tokens(rng, args.system_len - 1, vocab)]
    users = [[_tokens(rng, args.user_len, vocab) for _ in range(args.turns)] for _ in range(args.conversations)]
    return system, users


def _chat(model, args, seed: int, engines: dict[str, Engine]) -> dict[str, Chat]:
    system, users = _workload(seed, args, model.config.text.vocab_size)
    chats = {}
    for name, engine in engines.items():
        engine.reset_prefix_cache()
        q0, h0, c0 = engine.stats["prefix_cache_queries"], engine.stats["prefix_cache_hits"], engine.stats["compiles"]
        chats[name] = Chat(engine, system, users, args.output_len)
        chats[name].before = (q0, h0, c0)
    for turn in range(args.turns):
        for chat in chats.values():  # alternate: load falls on both alike
            chat.wave(turn)
    return chats


def _summary(chat: Chat) -> dict:
    q0, h0, c0 = chat.before
    stats = chat.engine.stats
    queries, hits = stats["prefix_cache_queries"] - q0, stats["prefix_cache_hits"] - h0
    return {
        "hit_rate": hits / max(queries, 1),
        "ideal_hit_rate": chat.ideal / max(chat.prompt_tokens, 1),
        "ideal_block_hit_rate": chat.ideal_blocks / max(chat.prompt_tokens, 1),
        "prompt_tokens": chat.prompt_tokens,
        "hit_tokens": hits,
        "wall_s": chat.wall,
        "tok_s": chat.tokens / chat.wall,
        "ttft_mean_ms": 1e3 * float(np.mean(chat.ttft)),
        "ttft_p50_ms": 1e3 * float(np.median(chat.ttft)),
        "timed_compiles": stats["compiles"] - c0,
        "evictions": chat.engine.blocks.full.evictions,
    }


def _no_shared(model, args, engines: dict[str, Engine]) -> dict:
    """Random prompts of the chat's mean prompt length, no shared prefix: wall time per engine over repeats,
    alternated (min over repeats: the least disturbed run)."""
    vocab = model.config.text.vocab_size
    length = args.system_len + args.user_len * (args.turns + 1) // 2 + args.output_len * args.turns // 2
    length = min(length, args.max_model_len - args.output_len)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    times: dict[str, list[float]] = {name: [] for name in engines}
    for rep in range(args.repeats + 1):  # the first compiles
        rng = np.random.default_rng(1000 + rep)
        prompts = [[2, *_tokens(rng, length - 1, vocab)] for _ in range(args.conversations)]
        for name, engine in engines.items():
            engine.reset_prefix_cache()
            t0 = time.perf_counter()
            ids = [engine.add_request(p, params) for p in prompts]
            engine.run_until_done()
            for i in ids:
                engine.release(i)
            if rep:
                times[name].append(time.perf_counter() - t0)
    best = {name: min(t) for name, t in times.items()}
    return {"prompt_len": length, "wall_s": times, "best_s": best, "overhead": best["on"] / best["off"] - 1.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--conversations", type=int, default=32)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--system-len", type=int, default=1024)
    ap.add_argument("--user-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of the no-shared-prefix workload")
    ap.add_argument("--prefix-cache-windows", type=int, default=None, help="EngineConfig.prefix_cache_windows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.max_model_len = args.system_len + args.turns * (args.user_len + args.output_len) + 16

    model = from_config(bench_config(args.preset), dtype="float32", seed=args.seed)
    options = dict(
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        page_size=args.page_size,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    engines = {
        "on": Engine(model, None, EngineConfig(**options, prefix_cache_windows=args.prefix_cache_windows)),
        "off": Engine(model, None, EngineConfig(**options, enable_prefix_caching=False)),
    }
    load0 = os.getloadavg()
    _chat(model, args, args.seed + 1, engines)  # compiles every shape of the workload
    chats = _chat(model, args, args.seed, engines)
    results = {name: _summary(chat) for name, chat in chats.items()}
    same = chats["on"].answers == chats["off"].answers
    overhead = _no_shared(model, args, engines)
    load1 = os.getloadavg()
    report = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "chat": results,
        "greedy_tokens_equal": same,
        "no_shared_prefix": overhead,
        "load_avg": [load0, load1],
    }
    on, off = results["on"], results["off"]
    print(
        f"{args.preset}: {args.conversations} conversations x {args.turns} turns, system prompt {args.system_len} "
        f"tokens, user {args.user_len}, answers {args.output_len}; max_num_seqs {args.max_num_seqs}; "
        f"load average {load0[0]:.2f} -> {load1[0]:.2f}"
    )
    print(
        f"{'':8}{'hit_rate':>10}{'ideal':>8}{'blocks':>8}{'wall_s':>9}{'tok/s':>10}{'ttft_mean_ms':>14}{'ttft_p50_ms':>13}"
        f"{'compiles':>10}"
    )
    for name, r in results.items():
        print(
            f"{name:8}{r['hit_rate']:>10.3f}{r['ideal_hit_rate']:>8.3f}{r['ideal_block_hit_rate']:>8.3f}{r['wall_s']:>9.2f}{r['tok_s']:>10.0f}"
            f"{r['ttft_mean_ms']:>14.1f}{r['ttft_p50_ms']:>13.1f}{r['timed_compiles']:>10}"
        )
    print(
        f"caching on: {off['wall_s'] / on['wall_s']:.2f}x throughput, TTFT "
        f"{off['ttft_mean_ms'] / on['ttft_mean_ms']:.2f}x lower; greedy tokens equal: {same}"
    )
    print(
        f"no shared prefix ({args.conversations} prompts of {overhead['prompt_len']} tokens): on "
        f"{overhead['best_s']['on']:.2f} s, off {overhead['best_s']['off']:.2f} s (best of {args.repeats}): "
        f"overhead {100 * overhead['overhead']:+.1f}%"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
