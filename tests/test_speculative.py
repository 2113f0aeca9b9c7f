"""Speculative decoding in the engine (serving/speculative.py, the verify step of serving/runner.py).

- greedy speculative generation equals HF's plain greedy and the engine's plain greedy, token for token, for
  prompts of mixed lengths (longer than the sliding window of 8, outputs running past it) in one batch, with the
  oracle drafter (every draft accepted) and the n-gram drafter (few accepted), k = 1..4, pp=2 and tp=2;
- max_tokens reached mid-draft, stop token ids and stop strings inside an accepted run of drafts;
- sampling keeps the target's distribution (not the drafter's): the empirical joint of three sampled tokens under
  an adversarial drafter is within a TV bound of the target's exact joint; seeded sampling reproduces plain
  decoding's tokens exactly;
- configuration: vLLM's dict form, the shorthand, refusals; the n-gram lookup itself.
"""

from __future__ import annotations

import numpy as np
import pytest

import gemma4_jax
from gemma4_jax import SamplingParams
from gemma4_jax.serving.engine import Engine, EngineConfig
from gemma4_jax.serving.speculative import NgramProposer, OracleProposer, SpeculativeConfig
from gemma4_jax.serving.tokenizer import Tokenizer
from helpers import BYTE_VOCAB, PLE_KVSHARE_SOFTCAP, SHORT_WINDOW
from hf_reference import hf_greedy

# The recipe of test_engine.py's "ple_kvshare_window" (the same checkpoint when both files run in one session):
# PLE, KV sharing over both layer kinds, soft-capping, double-wide MLP, a window of 8.
RECIPE = dict(PLE_KVSHARE_SOFTCAP, **SHORT_WINDOW, use_double_wide_mlp=True)
# Pages of 16: no step of these sequences (< 64 tokens) crosses a page-table bucket, so few shapes compile.
ENGINE = dict(page_size=16, max_num_batched_tokens=128, max_num_seqs=4, max_model_len=96)
LENGTHS = (5, 13, 30, 21)  # window 8: all but the first outrun it
NEW = 16


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint("engine_ple_kvshare_window", seed=20, tokenizer=True, **RECIPE)


@pytest.fixture(scope="module")
def model(ckpt):
    return gemma4_jax.from_pretrained(ckpt.path, dtype="float32")


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    return Tokenizer.from_dir(ckpt.path)


def _prompts(lengths=LENGTHS, seed=0):
    rs = np.random.RandomState(seed)
    return [[2] + list(rs.randint(16, BYTE_VOCAB, size=n - 1)) for n in lengths]


@pytest.fixture(scope="module")
def reference(ckpt):
    """HF's plain greedy continuation of each prompt."""
    return {tuple(p): hf_greedy(ckpt.hf, p, NEW) for p in _prompts()}


def _engine(model, k, proposer=None, tokenizer=None, ngram=(1, 3), **overrides):
    if proposer is not None:
        spec = SpeculativeConfig.custom(k)
    else:
        spec = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": ngram[0],
                "prompt_lookup_max": ngram[1]}
    return Engine(model, tokenizer, EngineConfig(**{**ENGINE, **overrides}, speculative_config=spec),
                  proposer=proposer)


def _generate(engine, prompts, params):
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.add_request(p, q) for p, q in zip(prompts, params, strict=True)]
    engine.run_until_done()
    return [engine.release(i) for i in ids]


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)


def _check_greedy(model, reference, k, drafter):
    prompts = _prompts()
    proposer = OracleProposer(reference) if drafter == "oracle" else None
    engine = _engine(model, k, proposer)
    outs = _generate(engine, prompts, GREEDY)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.finish_reason == "length"
        assert out.token_ids == reference[tuple(prompt)], f"prompt of {len(prompt)} tokens diverged from HF greedy"
    stats = engine.spec_stats
    assert stats.num_drafts > 0 and stats.num_draft_tokens >= stats.num_drafts
    assert sum(o.spec_decode.num_draft_tokens for o in outs) == stats.num_draft_tokens
    if drafter == "oracle":  # the oracle is always right: every draft accepted, k + 1 tokens per verify step
        assert stats.num_accepted_tokens == stats.num_draft_tokens
        assert stats.acceptance_rate_per_pos == [1.0] * k
        assert engine.stats["verify_steps"] <= -(-NEW // (k + 1)) + 1
    return engine


def test_greedy_speculative_equals_hf_greedy(model, reference):
    _check_greedy(model, reference, 2, "oracle")


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("drafter", ["oracle", "ngram"])
def test_greedy_speculative_equals_hf_greedy_k(model, reference, drafter, k):
    _check_greedy(model, reference, k, drafter)


@pytest.mark.slow
def test_greedy_speculative_equals_plain_engine(model, reference):
    """The engine's own plain greedy (no speculation) gives the same tokens too, with logprobs of the target."""
    prompts = _prompts()
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, logprobs=2)
    plain = _generate(Engine(model, None, EngineConfig(**ENGINE)), prompts, params)
    spec = _generate(_engine(model, 3, OracleProposer(reference)), prompts, params)
    for a, b in zip(plain, spec, strict=True):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert x.token_id == y.token_id and [t for t, _ in x.top] == [t for t, _ in y.top]
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [dict(pp=2), dict(tp=2)])
def test_greedy_speculative_pipelined_and_tensor_parallel(ckpt, reference, mesh):
    model = gemma4_jax.from_pretrained(ckpt.path, dtype="float32", **mesh)
    for drafter in ("oracle", "ngram"):
        _check_greedy(model, reference, 2, drafter)


def test_max_tokens_mid_draft_and_stops(model, reference, tokenizer):
    prompt = _prompts()[2]
    free = reference[tuple(prompt)]
    engine = _engine(model, 2, OracleProposer(reference), tokenizer)
    # max_tokens = 3 with k = 2: the prefill samples 1 token, so the verify step may draft only 1 (2 tokens left).
    out = _generate(engine, [prompt], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))[0]
    assert out.finish_reason == "length" and out.token_ids == free[:3]
    assert out.spec_decode.num_accepted_tokens == out.spec_decode.num_draft_tokens == 1
    # A stop token accepted in the middle of a run of drafts ends the output there (kept as the last token).
    stop_at = free[4]
    out = _generate(engine, [prompt], SamplingParams(temperature=0.0, max_tokens=NEW, stop_token_ids=[stop_at]))[0]
    assert out.finish_reason == "stop" and out.token_ids == free[: free.index(stop_at) + 1]
    # A stop string inside accepted drafts: the text ends before it, as plain decoding's does.
    text = _generate(engine, [prompt], GREEDY)[0].text
    needle = text[3:5]
    assert needle and needle in text
    out = _generate(engine, [prompt], SamplingParams(temperature=0.0, max_tokens=NEW, stop=[needle],
                                                     ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.text == text[: text.index(needle)]


class _Adversary:
    """Drafts the second token as the one the target ranks last of its top 3 after the first: a drafter whose
    distribution is far from the target's. A verifier that trusted drafts would emit it every time."""

    def __init__(self, worst: dict[int, int]):
        self.worst = worst  # first sampled token -> the target's least likely top-3 token after it

    def propose(self, requests, limits):
        return [[self.worst[r.output_ids[0]]] if limit and len(r.output_ids) == 1 else []
                for r, limit in zip(requests, limits, strict=True)]


def _softmax_top(logits: np.ndarray, top_k: int) -> np.ndarray:
    logits = logits.astype(np.float64)
    cut = np.sort(logits)[-top_k]
    p = np.where(logits >= cut, np.exp(logits - logits.max()), 0.0)
    return p / p.sum()


@pytest.mark.slow  # statistical: 62 s in the suite; the greedy-equality tests stay fast
def test_sampling_keeps_target_distribution(model):
    """3 sampled tokens (top-k 3, temperature 1) under an adversarial drafter, 256 seeds: the empirical joint
    over the 27 outcomes is within TV 0.25 of the target's exact joint (at most ~0.13 expected from sampling
    alone; trusting the drafter's second token would give ~0.7); and each seed emits exactly the tokens plain
    sampling emits with it."""
    prompt = _prompts([6], seed=11)[0]
    top_k, n = 3, 256
    # Exact joint from full forwards: logits at the last 3 positions of prompt + x1 + x2 for all 9 (x1, x2).
    first = _softmax_top(np.asarray(model.logits([prompt]))[0, -1], top_k)
    x1s = np.flatnonzero(first)
    seqs = [prompt + [int(a), int(b)] for a in x1s
            for b in np.flatnonzero(_softmax_top(np.asarray(model.logits([prompt + [int(a)]]))[0, -1], top_k))]
    logits = np.asarray(model.logits(seqs))
    exact, worst = {}, {}
    for seq, row in zip(seqs, logits, strict=True):
        a, b = seq[-2:]
        second = _softmax_top(row[-2], top_k)
        p2 = second[b]
        worst[a] = int(np.flatnonzero(second)[np.argmin(second[np.flatnonzero(second)])])
        p3 = _softmax_top(row[-1], top_k)
        for c in np.flatnonzero(p3):
            exact[(a, b, int(c))] = first[a] * p2 * p3[c]
    assert abs(sum(exact.values()) - 1) < 1e-6
    params = [SamplingParams(temperature=1.0, top_k=top_k, seed=s, max_tokens=3, ignore_eos=True) for s in range(n)]
    engine = _engine(model, 2, _Adversary(worst), max_num_seqs=32, max_num_batched_tokens=256)
    outs = _generate(engine, [prompt] * n, params)
    counts: dict[tuple, int] = {}
    for out in outs:
        counts[tuple(out.token_ids)] = counts.get(tuple(out.token_ids), 0) + 1
    assert set(counts) <= set(exact)
    tv = 0.5 * sum(abs(counts.get(c, 0) / n - p) for c, p in exact.items())
    assert tv < 0.25, f"TV distance {tv:.3f} between speculative samples and the target's distribution"
    assert 0 < engine.spec_stats.num_accepted_tokens < engine.spec_stats.num_draft_tokens
    # Seeds reproduce plain sampling token for token (the verify draws each token with plain decoding's key).
    plain = _generate(Engine(model, None, EngineConfig(**{**ENGINE, "max_num_seqs": 32,
                                                           "max_num_batched_tokens": 256})), [prompt] * 32,
                      params[:32])
    assert [o.token_ids for o in plain] == [o.token_ids for o in outs[:32]]


def test_config_forms_and_refusals():
    cfg = SpeculativeConfig.resolve({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4})
    assert (cfg.method, cfg.num_speculative_tokens, cfg.prompt_lookup_min, cfg.prompt_lookup_max) == ("ngram", 3, 4, 4)
    assert SpeculativeConfig.resolve({"method": "ngram", "num_speculative_tokens": 2}).prompt_lookup_min == 5
    cfg = SpeculativeConfig.resolve(None, "/ckpt/assistant", 4)
    assert (cfg.method, cfg.model, cfg.num_speculative_tokens) == ("draft_model", "/ckpt/assistant", 4)
    assert SpeculativeConfig.resolve(None, None, 0) is None
    bad = [
        ({"method": "eagle", "num_speculative_tokens": 2}, "method must be one of"),
        ({"method": "ngram"}, "needs num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be an int >= 1"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2},
         "must not exceed"),
        ({"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1}, "unsupported key"),
        ({"method": "mtp", "num_speculative_tokens": 2}, "needs 'model'"),
        ({"method": "custom", "num_speculative_tokens": 2}, "method must be one of"),
    ]
    for config, message in bad:
        with pytest.raises(ValueError, match=message):
            SpeculativeConfig.resolve(config)
    with pytest.raises(ValueError, match="contradicts"):
        SpeculativeConfig.resolve({"method": "ngram", "num_speculative_tokens": 2}, None, 3)


def test_engine_refuses_what_it_cannot_run(model):
    with pytest.raises(ValueError, match="needs speculative_config=SpeculativeConfig.custom"):
        Engine(model, None, EngineConfig(**ENGINE), proposer=OracleProposer({}))
    with pytest.raises(ValueError, match="no config.json at '/x'"):  # the assistant is loaded at start-up
        Engine(model, None, EngineConfig(**ENGINE, speculative_config={"method": "mtp", "model": "/x",
                                                                       "num_speculative_tokens": 2}))


def test_ngram_lookup():
    ngram = NgramProposer(1, 3)
    # The longest suffix n-gram that recurs wins ("8 9"; "6 8 9" does not recur), at its latest occurrence.
    assert ngram.lookup(np.array([7, 8, 9, 1, 2, 7, 8, 9, 4, 5, 6, 8, 9]), 3) == [4, 5, 6]
    assert ngram.lookup(np.array([1, 2, 3, 1, 2, 3, 1, 2]), 5) == [3, 1, 2]
    assert ngram.lookup(np.array([5, 5, 5, 5, 5, 5]), 3) == [5, 5, 5]  # a run: not the match abutting the suffix
    assert ngram.lookup(np.array([1, 2, 3, 4]), 3) == []  # nothing recurs
    assert NgramProposer(2, 2).lookup(np.array([5, 6, 1, 9, 6]), 2) == []  # only a 1-gram recurs


def test_spec_decode_counters_and_metrics():
    from gemma4_jax.serving.metrics import ServerMetrics
    from gemma4_jax.serving.requests import SpecDecodeStats

    stats = SpecDecodeStats()
    stats.record(3, 2)
    stats.record(1, 0)
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (2, 4, 2)
    assert stats.accepted_per_pos == [1, 1, 0] and stats.acceptance_rate_per_pos == [0.5, 1.0, 0.0]
    assert stats.mean_accepted_length == 2.0 and stats.acceptance_rate == 0.5
    metrics = ServerMetrics()
    metrics.update_spec_decode(stats)
    stats.record(2, 2)
    metrics.update_spec_decode(stats)  # only the increase is added
    body = metrics.render().decode()
    assert "gemma4_jax_spec_decode_num_draft_tokens_total 6.0" in body
    assert "gemma4_jax_spec_decode_num_accepted_tokens_total 4.0" in body
    assert 'gemma4_jax_spec_decode_num_accepted_tokens_per_pos_total{position="1"} 2.0' in body
