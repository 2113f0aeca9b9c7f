"""Speculative decoding benchmark: tokens per target step and speed-up over plain decoding (docs/speculative.md).

Random weights give the n-gram drafter little to accept, so the oracle drafter (speculative.OracleProposer: the
target's own plain greedy output) measures the verify path at full acceptance, beside the (k + 1)x ideal. Each
configuration runs once to compile and once timed; the decode phase alone is timed (the prompts are prefilled by
a first step that every variant shares).

`--drafters oracle,ngram,assistant`: "assistant" drafts with the preset's MTP assistant (random weights,
`<preset>-assistant`, e.g. tiny-assistant, e2b-assistant): acceptance is near 0 with random weights, so what it
measures is the drafter's cost: the draft-to-target cost ratio (host time in the jitted draft call over the rest)
and the time of one draft round (`draft_ms`: the mean over the run; `draft_round_ms`: the median of 20 repeated
rounds on the first decode step's rows, robust to a loaded machine; `step_ms`: the median engine step).
`--pp 2`: a pipelined target; the assistant runs on the stage holding the later of its source layers
(speculative.drafter_stage) and reads a source layer on another stage as its rows' pages moved across.

Usage: python benchmarks/speculative.py [--preset tiny] [--batch-sizes 1,8] [--ks 2,4] [--new-tokens 32]
       [--drafters oracle,ngram,assistant] [--pp 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from gemma4_jax.assistant_config import ASSISTANT_TARGETS
from gemma4_jax.bench.presets import random_prompts
from gemma4_jax.model import assistant_from_config, from_config
from gemma4_jax.serving.engine import Engine, EngineConfig
from gemma4_jax.serving.sampling import SamplingParams
from gemma4_jax.serving.speculative import NgramProposer, OracleProposer, SpeculativeConfig, drafter_mesh


class _Timed:
    """Wraps a proposer and adds up the host time it spends drafting."""

    def __init__(self, proposer):
        self.proposer, self.seconds = proposer, 0.0

    def propose(self, requests, limits):
        t0 = time.perf_counter()
        drafts = self.proposer.propose(requests, limits)
        self.seconds += time.perf_counter() - t0
        return drafts


def _decode(model, prompts, new_tokens, engine_kw, k=0, proposer=None, assistant=None):
    """(decode seconds, outputs, engine, drafting seconds, draft rounds, {"step_ms", "draft_round_ms"}) of one
    timed run after a compile run. proposer: a proposer object; assistant: an AssistantModel (method "mtp");
    neither: plain decoding."""
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for _run in range(2):  # the first run compiles, the second is timed
        timer = _Timed(proposer) if proposer is not None else None
        spec = SpeculativeConfig.custom(k) if proposer is not None else None
        if assistant is not None:
            spec = SpeculativeConfig("mtp", k, model=assistant)
        engine = Engine(model, None, EngineConfig(**engine_kw, speculative_config=spec), proposer=timer)
        ids = [engine.add_request(p, params) for p in prompts]
        engine.step()  # the prefill (and first token) of every prompt
        medians = {}
        if assistant is not None:  # repeated rounds on the same rows and pools (a round changes nothing)
            rows = [r for r in engine.running if r.in_decode]
            rounds = []
            for _ in range(20):
                t0 = time.perf_counter()
                engine.proposer.propose_from(engine.cache, rows, [k] * len(rows))
                rounds.append(time.perf_counter() - t0)
            medians["draft_round_ms"] = 1e3 * statistics.median(rounds)
        drafted0 = engine.proposer.draft_time_s if assistant is not None else 0.0
        calls0 = engine.proposer.draft_calls if assistant is not None else 0
        steps = []
        while engine.has_unfinished():
            t0 = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - t0)
        seconds = sum(steps)
        medians["step_ms"] = 1e3 * statistics.median(steps)
        outs = [engine.release(i) for i in ids]
    drafting = timer.seconds if timer is not None else 0.0
    rounds = engine.stats.get("verify_steps", 0)
    if assistant is not None:  # the jitted draft call, synchronised by its drafts' transfer to the host
        drafting = engine.proposer.draft_time_s - drafted0
        rounds = engine.proposer.draft_calls - calls0
    return seconds, outs, engine, drafting, rounds, medians


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--ks", default="2,4")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--drafters", default="oracle,ngram", help="comma list of oracle, ngram, assistant")
    ap.add_argument("--pp", type=int, default=1, help="pipeline stages of the target")
    ap.add_argument("--output", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    drafters = args.drafters.split(",")
    if set(drafters) - {"oracle", "ngram", "assistant"}:
        ap.error(f"--drafters: unknown {sorted(set(drafters) - {'oracle', 'ngram', 'assistant'})}")
    model = from_config(args.preset, dtype=args.dtype, seed=0, pp=args.pp)
    assistant = None
    if "assistant" in drafters:
        names = [a for a, t in ASSISTANT_TARGETS.items() if t == args.preset]
        if not names:
            ap.error(f"--drafters assistant: no assistant preset drafts for {args.preset!r} "
                     f"(those with one: {sorted(ASSISTANT_TARGETS.values())})")
        assistant = assistant_from_config(names[0], dtype=args.dtype, seed=1, mesh=drafter_mesh(model))
    vocab = model.config.text.vocab_size
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = random_prompts(batch, args.prompt_len, vocab, seed=batch)
        engine_kw = dict(max_num_seqs=max(batch, 1), max_model_len=args.prompt_len + args.new_tokens + 8,
                         max_num_batched_tokens=max(batch * args.prompt_len, 16), page_size=16)
        plain_s, plain, engine, _, _, medians = _decode(model, prompts, args.new_tokens, engine_kw)
        decoded = sum(len(o.token_ids) - 1 for o in plain)
        plain_step = plain_s / max(engine.stats["steps"] - 1, 1)
        rows.append(dict(batch=batch, drafter="none", k=0, tokens_per_step=1.0, seconds=plain_s,
                         tokens_per_s=decoded / plain_s, speedup=1.0, ideal=1.0, draft_cost_ratio=0.0, **medians))
        greedy = {tuple(p): o.token_ids for p, o in zip(prompts, plain, strict=True)}
        for k in [int(k) for k in args.ks.split(",")]:
            proposers = {"oracle": OracleProposer(greedy), "ngram": NgramProposer(1, 3), "assistant": None}
            for name in drafters:
                seconds, outs, engine, drafting, rounds, medians = _decode(
                    model, prompts, args.new_tokens, engine_kw, k, proposers[name],
                    assistant if name == "assistant" else None)
                if [o.token_ids for o in outs] != [o.token_ids for o in plain]:
                    raise AssertionError(f"{name} k={k} batch {batch}: speculative greedy differs from plain")
                stats = engine.spec_stats
                target_step = (seconds - drafting) / max(engine.stats["steps"] - 1, 1)
                rows.append(dict(batch=batch, drafter=name, k=k, tokens_per_step=stats.mean_accepted_length,
                                 acceptance=stats.acceptance_rate, seconds=seconds, tokens_per_s=decoded / seconds,
                                 speedup=plain_s / seconds, ideal=float(k + 1) if name == "oracle" else None,
                                 verify_vs_decode_step=target_step / plain_step,
                                 draft_cost_ratio=drafting / max(seconds - drafting, 1e-9),
                                 draft_ms=1e3 * drafting / max(rounds, 1), **medians,
                                 acceptance_per_pos=stats.acceptance_rate_per_pos))
    load = os.getloadavg()
    result = dict(preset=args.preset, dtype=args.dtype, pp=args.pp, prompt_len=args.prompt_len,
                  new_tokens=args.new_tokens, load_average=load, rows=rows)
    print(f"preset {args.preset} ({args.dtype}, pp={args.pp}), prompt {args.prompt_len}, {args.new_tokens} new "
          f"tokens; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"{'batch':>5} {'drafter':>7} {'k':>2} {'tok/step':>8} {'accept':>6} {'tok/s':>8} {'speedup':>7} "
          f"{'ideal':>5} {'verify/decode':>13} {'draft/target':>12} {'draft ms':>8} {'round ms':>8} {'step ms':>7}")
    for r in rows:
        print(f"{r['batch']:>5} {r['drafter']:>7} {r['k']:>2} {r['tokens_per_step']:>8.2f} "
              f"{r.get('acceptance', 1.0):>6.2f} {r['tokens_per_s']:>8.1f} {r['speedup']:>7.2f} "
              f"{r['ideal'] or float('nan'):>5.1f} {r.get('verify_vs_decode_step', 1.0):>13.2f} "
              f"{r['draft_cost_ratio']:>12.4f} {r.get('draft_ms', 0.0):>8.2f} {r.get('draft_round_ms', 0.0):>8.2f} "
              f"{r['step_ms']:>7.2f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
