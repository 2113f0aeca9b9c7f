"""Speculative decoding with constrained rows (serving/structured.py `grammar_prefix` / `Grammars.fill_drafts`,
serving/sampling.py `verify` with per-position masks).

A constrained row's drafts are cut at the first token its grammar rejects, and the verify step masks position j
with the grammar's state after d_1 .. d_j. So, on random weights, in one batch of JSON-schema, regex, choice and
unconstrained rows, k = 1..3, with the oracle drafter (the plain output as drafts: every draft used) and the n-gram
drafter: greedy output equals the engine's plain constrained output token for token, seeded sampling too (verify
keeps plain decoding's per-token keys), every JSON output validates with `jsonschema`, and the grammar's drafts
are really used (accepted > 0 on the constrained rows).
"""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

import gemma4_jax
from gemma4_jax import SamplingParams
from gemma4_jax.serving.demo import byte_level_tokenizer
from gemma4_jax.serving.engine import Engine, EngineConfig
from gemma4_jax.serving.speculative import OracleProposer, SpeculativeConfig
from gemma4_jax.serving.structured import Grammars, StructuredOutputs, grammar_prefix

ENGINE = dict(page_size=16, max_num_batched_tokens=256, max_num_seqs=8, max_model_len=192)
S = {"type": "string", "maxLength": 5}
I = {"type": "integer", "minimum": -20, "maximum": 20}  # noqa: E741
SCHEMAS = [
    {"type": "object", "properties": {"name": S, "age": I, "ok": {"type": "boolean"}},
     "required": ["name", "age", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["x", "yy", "z"]}, "maxItems": 3},
                                      "when": {"type": "string", "format": "date"}},
     "required": ["tags", "when"], "additionalProperties": False},
]
REGEX = r"[0-9]{2,4}-[a-z]{2,5}"
CHOICES = ["alpha", "beta", "gamma delta"]
# (prompt, constraint) per row: distinct prompts, since the oracle knows continuations by prompt.
ROWS = [("Person as JSON:", {"json": SCHEMAS[0]}), ("Free text one", None), ("Tags as JSON:", {"json": SCHEMAS[1]}),
        ("Code:", {"regex": REGEX}), ("Pick one:", {"choice": CHOICES}), ("Free text two", None)]
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def model():
    return gemma4_jax.from_config("tiny", dtype="float32", seed=5)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


def _params(temperature: float) -> list[SamplingParams]:
    # Unconstrained rows run to max_tokens; constrained ones end when their structure does (EOS is allowed then).
    return [SamplingParams(temperature=temperature, seed=i, max_tokens=MAX_TOKENS, ignore_eos=so is None,
                           structured_outputs=so) for i, (_, so) in enumerate(ROWS)]


def _generate(model, tokenizer, params, k=None, proposer=None):
    spec = None
    if proposer is not None:
        spec = SpeculativeConfig.custom(k)
    elif k is not None:
        spec = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1, "prompt_lookup_max": 2}
    engine = Engine(model, tokenizer, EngineConfig(**ENGINE, speculative_config=spec), proposer=proposer)
    ids = [engine.add_request(tokenizer.encode(p), q) for (p, _), q in zip(ROWS, params, strict=True)]
    engine.run_until_done()
    return engine, [engine.release(i) for i in ids]


def _check_valid(outs) -> None:
    for (_, so), out in zip(ROWS, outs, strict=True):
        if so is None:
            assert out.finish_reason == "length"
            continue
        assert out.finish_reason == "stop", (so, out.text)
        if "json" in so:
            jsonschema.Draft202012Validator(so["json"], format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
                                            ).validate(json.loads(out.text))
        elif "regex" in so:
            assert re.fullmatch(REGEX, out.text), out.text
        else:
            assert out.text in CHOICES


@pytest.fixture(scope="module")
def plain(model, tokenizer):
    """The engine's plain (non-speculative) outputs, greedy and seeded sampling."""
    return {t: _generate(model, tokenizer, _params(t))[1] for t in (0.0, 1.0)}


@pytest.mark.parametrize("k", [pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow), 3])
def test_greedy_constrained_speculative_equals_plain(model, tokenizer, plain, k):
    """k = 3 is the one fast case (compiles dominate: each k is another verify program family)."""
    reference = plain[0.0]
    _check_valid(reference)
    continuations = {tuple(tokenizer.encode(p)): out.token_ids for (p, _), out in zip(ROWS, reference, strict=True)}
    for proposer in (OracleProposer(continuations), None):  # the oracle, then n-gram prompt lookup
        engine, outs = _generate(model, tokenizer, _params(0.0), k, proposer)
        for (_, so), out, ref in zip(ROWS, outs, reference, strict=True):
            assert out.token_ids == ref.token_ids, (so, proposer, out.text, ref.text)
            assert out.finish_reason == ref.finish_reason
        _check_valid(outs)
        if proposer is not None:  # every draft of every constrained row is the plain output: all used
            for (_, so), out in zip(ROWS, outs, strict=True):
                if so is not None:
                    stats = out.spec_decode
                    assert stats.num_draft_tokens > 0
                    assert stats.num_accepted_tokens == stats.num_draft_tokens, so
            assert engine.stats["verify_steps"] < MAX_TOKENS


def test_sampled_constrained_speculative_equals_plain(model, tokenizer, plain):
    """Seeded sampling: verify draws each token with plain decoding's key for it, so with the plain output as
    drafts the constrained rows' tokens are the plain ones, and drafts are accepted."""
    reference = plain[1.0]
    _check_valid(reference)
    continuations = {tuple(tokenizer.encode(p)): out.token_ids for (p, _), out in zip(ROWS, reference, strict=True)}
    engine, outs = _generate(model, tokenizer, _params(1.0), 3, OracleProposer(continuations))
    assert [o.token_ids for o in outs] == [r.token_ids for r in reference]
    _check_valid(outs)
    assert engine.spec_stats.num_accepted_tokens == engine.spec_stats.num_draft_tokens > 0


def test_fill_drafts_and_grammar_prefix(tokenizer):
    """fill_drafts' position j == the matcher's own mask after consuming d_1 .. d_j; the matcher is left as it
    was; grammar_prefix cuts at the first rejected token without advancing the matcher."""
    grammars = Grammars(tokenizer, 512, [tokenizer.eos_token_id])
    matcher = grammars.matcher(StructuredOutputs(json=SCHEMAS[0]))
    text = tokenizer.encode('{"name": "ab", "age": 7', add_special_tokens=False)
    matcher.consume_tokens(text[:3])
    draft = text[3:8]
    assert grammar_prefix(matcher, draft + [ord("}")]) == draft  # a key's text, then a brace it cannot take
    assert grammar_prefix(matcher, [ord("x")]) == []
    masks = grammars.fill_drafts([None, matcher], [[], draft], 2, len(draft) + 2)  # (rows, T, W)
    assert masks.shape == (2, len(draft) + 2, grammars.words)
    assert (masks[0] == -1).all() and (masks[1, -1] == -1).all()  # unconstrained row, position past the drafts
    for j in range(len(draft) + 1):
        expect = grammars.fill([matcher], 1)[0]
        np.testing.assert_array_equal(masks[1, j], expect, err_msg=f"position {j}")
        if j < len(draft):
            assert matcher.consume_token(draft[j])
    matcher.rollback(len(draft))
    assert grammar_prefix(matcher, draft) == draft  # rolled back to where fill_drafts found it
    with pytest.raises(ValueError, match="do not fit"):
        grammars.fill_drafts([matcher], [draft], 1, len(draft))
