"""Structured-output overhead: decode steps with every row constrained by a JSON schema against the same steps
unconstrained, in the same process, and the grammar compile time per schema.

The mask's host cost grows with the vocabulary's token trie, so the byte-level demo tokenizer (512 ids) would
flatter it: this trains a byte-level BPE tokenizer with the model's vocabulary size (bench-100m: 32768) on Python
source text from the standard library, then runs the bench-100m model (random weights, float32) at batch 64.
Each schema ends in a required array of at least 24 numbers, so no constrained row finishes inside the timed
steps (a row that did would shrink the batch and flatter the constrained steps; the run checks it).

    python benchmarks/structured.py [--batch 64] [--steps 24] [--vocab 32768] [--pairs 3]

Prints: median decode step time unconstrained / constrained (interleaved A B A B ..., the first pair a warm-up), the
mask fill time per step (host, llguidance's parallel fill), the matcher updates per step (host), the overhead as a
fraction of the unconstrained step against the 10 % goal (per pair, and their median), the first-use compile time
of the masked step shape, and the grammar compile time per schema (validate + first matcher), with the 1-minute load
average at each run.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sysconfig
import tempfile
import time

import numpy as np


def train_tokenizer(vocab_size: int, path: str) -> None:
    """A byte-level BPE tokenizer.json with `vocab_size` ids (specials first) trained on stdlib sources."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:400]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(files, trainer)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}, f)


# Numbers with a bounded fraction (multipleOf): each one token or a few, every one followed by ", ".
_LONG = {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 100, "multipleOf": 0.5},
         "minItems": 24, "maxItems": 32}
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                      "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                               "maxItems": 4},
                                      "scores": _LONG},
     "required": ["name", "age", "tags", "scores"], "additionalProperties": False},
    {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"},
                                      "when": {"type": "string", "format": "date"},
                                      "kind": {"enum": ["a", "b", "c"]},
                                      "score": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.01},
                                      "series": _LONG},
     "required": ["id", "when", "kind", "score", "series"], "additionalProperties": False},
    {"type": "object", "properties": {"mixed": {"type": "array", "items": {"anyOf": [
        {"type": "integer"}, {"type": "string", "maxLength": 5}]}, "maxItems": 8}, "values": _LONG},
     "required": ["mixed", "values"], "additionalProperties": False},
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--pairs", type=int, default=3, help="timed A B pairs after the warm-up pair; the overhead is "
                   "their median (the step time drifts ~10%% between runs on this machine)")
    args = p.parse_args()

    import jax

    import gemma4_jax
    from gemma4_jax.bench.presets import bench_config
    from gemma4_jax.serving.sampling import SamplingParams
    from gemma4_jax.serving.structured import Grammars, StructuredOutputs
    from gemma4_jax.serving.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train_tokenizer(args.vocab, tmp)
        tokenizer = Tokenizer.from_dir(tmp)
        print(f"tokenizer: {tokenizer.vocab_size} ids, trained in {time.perf_counter() - t0:.1f} s")
    cfg = bench_config("bench-100m")
    model = gemma4_jax.from_config(cfg, dtype="float32")
    llm = gemma4_jax.LLM(model, tokenizer=tokenizer, max_num_seqs=args.batch, max_model_len=512,
                         max_num_batched_tokens=4096, compilation_cache=False)
    engine = llm.engine

    t0 = time.perf_counter()
    grammars = Grammars(tokenizer, cfg.text.vocab_size, [1])
    print(f"llguidance tokenizer view: {time.perf_counter() - t0:.2f} s (once per engine)")
    for i, schema in enumerate(SCHEMAS):
        t0 = time.perf_counter()
        grammars.matcher(StructuredOutputs(json=schema))
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        grammars.matcher(StructuredOutputs(json=schema))
        cached = time.perf_counter() - t0
        print(f"schema {i}: compile + first matcher {first * 1000:.1f} ms, cached {1000 * cached:.2f} ms")

    rng = np.random.default_rng(0)
    prompts = rng.integers(16, tokenizer.vocab_size, size=(args.batch, 32)).tolist()

    def timed(fn, into: list):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            into.append(time.perf_counter() - t)
            return out
        return wrapper

    def run(constrained: bool) -> dict:
        """One batch: median decode step (ms), mask fill and matcher updates per step (ms, host), first step (s)."""
        ids = []
        for i, prompt in enumerate(prompts):
            so = {"json": SCHEMAS[i % len(SCHEMAS)]} if constrained else None
            ids.append(engine.add_request(prompt, SamplingParams(temperature=1.0, seed=i, max_tokens=args.steps + 4,
                                                                 ignore_eos=not constrained, structured_outputs=so)))
        fill, consume = [], []
        grammars = engine._grammars
        if grammars is not None:
            grammars.fill = timed(type(grammars).fill.__get__(grammars), fill)
        append = engine._append
        engine._append = timed(append, consume)  # _append feeds each sampled token to its row's matcher
        while any(engine.requests[r].num_computed < len(engine.requests[r].prompt_ids) for r in ids):
            engine.step()  # prefill all rows
        t0 = time.perf_counter()
        engine.step()
        first = time.perf_counter() - t0
        times = []
        fill.clear()
        consume.clear()
        for _ in range(args.steps):
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
        running = sum(engine.requests[r].finish_reason is None for r in ids)
        if running < len(ids):
            raise SystemExit(f"{len(ids) - running} rows finished inside the timed steps: the batch shrank")
        for rid in ids:
            engine.release(rid)
        if grammars is not None:
            del grammars.fill
        engine._append = append
        per_step = lambda xs: 1000 * sum(xs) / args.steps  # noqa: E731
        # The median: on a shared machine a few steps stall on other processes and would swamp a mean.
        return {"step": 1000 * float(np.median(times)), "fill": per_step(fill), "consume": per_step(consume),
                "first": first, "load": os.getloadavg()[0]}

    print(f"devices: {jax.devices()[0].device_kind}; batch {args.batch}; {args.steps} decode steps each")
    results = {}
    for label in ("unconstrained", "constrained") * (1 + args.pairs):  # interleaved, A B A B ...
        r = run(label == "constrained")
        results.setdefault(label, []).append(r)
        print(f"  {label:13s} step {r['step']:7.2f} ms  mask fill {r['fill']:6.2f} ms  token appends "
              f"{r['consume']:5.2f} ms  first step {r['first']:5.2f} s  (load {r['load']:.2f})")
    pairs = list(zip(results["unconstrained"][1:], results["constrained"][1:], strict=True))  # the first warms up
    ratios = [(masked["step"] - free["step"]) / free["step"] for free, masked in pairs]
    free, masked = pairs[int(np.argsort(ratios)[len(ratios) // 2])]  # the median pair
    overhead = (masked["step"] - free["step"]) / free["step"]
    print(f"overhead per pair: {', '.join(f'{100 * r:+.1f}%' for r in ratios)}")
    print(f"overhead (median pair): {masked['step'] - free['step']:.2f} ms per decode step = {100 * overhead:.1f}% of "
          f"the unconstrained step ({free['step']:.2f} ms; goal < 10%: {'met' if overhead < 0.10 else 'MISSED'}); "
          f"mask fill {masked['fill']:.2f} ms = {100 * masked['fill'] / free['step']:.1f}%, matcher updates "
          f"{masked['consume'] - free['consume']:.2f} ms = "
          f"{100 * (masked['consume'] - free['consume']) / free['step']:.1f}% (load {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
