"""Structured outputs through the engine, on random weights: the grammar, not the model, guarantees validity.

55 JSON schemas (nested objects, arrays, enums, bounded numbers, required fields, anyOf, string formats, consts)
x 2 seeds at temperature 1 -> every output parses and validates with the `jsonschema` library; regex, choice and
grammar (Lark and GBNF) outputs always match; a structure cut by max_tokens ends with "length"; constrained and
unconstrained rows share a batch without changing the unconstrained rows' tokens or logprobs; bad constraints are
refused at admission with the field named.
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
from gemma4_jax.serving.structured import StructuredOutputs

S = {"type": "string", "maxLength": 6}
I = {"type": "integer", "minimum": -50, "maximum": 50}  # noqa: E741
# Decimals are bounded with multipleOf: an unbounded fraction is grammar-valid at every length, and random weights
# keep extending it until max_tokens (which would end with "length", never with invalid text labelled "stop").
N = {"type": "number", "minimum": 0, "maximum": 10, "multipleOf": 0.5}
B = {"type": "boolean"}


def obj(props: dict, required: list | None = None, extra: bool = False) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": extra}


def arr(items: dict, lo: int = 0, hi: int = 3) -> dict:
    return {"type": "array", "items": items, "minItems": lo, "maxItems": hi}


def schemas() -> list[dict]:
    out = [
        obj({"name": S}), obj({"age": I}), obj({"score": N}), obj({"ok": B}), obj({"name": S, "age": I, "ok": B}),
        obj({"a": S, "b": S}, required=["a"]), obj({"a": I, "b": N}, required=[]),
        obj({"color": {"enum": ["red", "green", "blue"]}}), obj({"level": {"enum": [1, 2, 3, "max", None]}}),
        obj({"kind": {"const": "point"}, "x": I, "y": I}),
        obj({"tags": arr(S)}), obj({"ids": arr(I, 1, 4)}), obj({"matrix": arr(arr(I, 1, 2), 1, 2)}),
        obj({"inner": obj({"deep": obj({"v": I})})}), obj({"people": arr(obj({"name": S, "age": I}), 0, 2)}),
        obj({"v": {"anyOf": [S, I]}}), obj({"v": {"anyOf": [B, {"type": "null"}]}}),
        obj({"v": {"anyOf": [obj({"a": I}), obj({"b": S})]}}),
        obj({"when": {"type": "string", "format": "date"}}), obj({"at": {"type": "string", "format": "time"}}),
        obj({"id": {"type": "string", "format": "uuid"}}), obj({"ip": {"type": "string", "format": "ipv4"}}),
        obj({"mail": {"type": "string", "format": "email", "maxLength": 20}}),
        obj({"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"}}),
        obj({"p": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1, "multipleOf": 0.125}}),
        obj({"n": {"type": "integer", "minimum": 100, "maximum": 105}}),
        obj({"neg": {"type": "integer", "maximum": -1, "minimum": -9}}),
        obj({"s": {"type": "string", "minLength": 2, "maxLength": 3}}),
        obj({"nothing": {"type": "null"}}), obj({}),
        arr(I, 1, 3), arr(S, 0, 2), arr(B, 2, 2), arr(obj({"k": S}), 1, 2),
        {"type": "string", "maxLength": 8}, {"type": "integer", "minimum": 0, "maximum": 9}, B,
        {"enum": ["alpha", "beta"]}, {"anyOf": [I, arr(I, 0, 2)]},
        obj({"meta": obj({"created": {"type": "string", "format": "date"}, "n": I}), "items": arr(S, 0, 2)}),
        obj({"a": obj({"b": obj({"c": obj({"d": B})})})}),
        obj({"point": obj({"x": N, "y": N}), "label": {"enum": ["p", "q"]}}),
        obj({"opt": S, "req": I}, required=["req"]),
        obj({"list": arr({"enum": ["x", "y", "z"]}, 1, 3)}),
        obj({"pair": {"type": "array", "prefixItems": [I, S], "items": False, "minItems": 2}}),
        obj({"flag": B, "count": {"type": "integer", "minimum": 0, "maximum": 3}, "name": S}),
        obj({"v": {"oneOf": [{"type": "integer", "minimum": 0, "maximum": 5}, {"type": "string", "maxLength": 2}]}}),
        obj({"u": {"type": ["integer", "null"], "minimum": 0, "maximum": 9}}),
        obj({"email_list": arr({"type": "string", "format": "email", "maxLength": 12}, 0, 2)}),
        obj({"grid": arr(arr(B, 2, 2), 2, 2)}),
        obj({"x": {"type": "number", "minimum": -1, "maximum": 1, "multipleOf": 0.25}}),
        obj({"title": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 5}}),
        obj({"v": {"allOf": [{"type": "integer"}, {"minimum": 1, "maximum": 3}]}}),
        obj({"nested": arr(obj({"id": I, "tags": arr(S, 0, 1)}), 1, 2)}),
        obj({"date": {"type": "string", "format": "date"}, "count": I, "ok": B}),
    ]
    assert len(out) >= 50
    return out


@pytest.fixture(scope="module")
def llm():
    model = gemma4_jax.from_config("tiny", dtype="float32", seed=5)
    return gemma4_jax.LLM(model, tokenizer=byte_level_tokenizer(), max_num_seqs=64, max_model_len=1024,
                          max_num_batched_tokens=256, compilation_cache=False)


def test_json_schemas_always_validate(llm):
    cases = [(schema, seed) for schema in schemas() for seed in (0, 1)]
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=400, structured_outputs={"json": schema})
              for schema, seed in cases]
    outs = llm.generate(["JSON:"] * len(cases), params, use_tqdm=False)
    bad = [(schema, seed, out.text) for (schema, seed), out in zip(cases, outs) if out.finish_reason != "stop"]
    assert not bad, bad[:3]
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    for (schema, _), out in zip(cases, outs):
        jsonschema.Draft202012Validator(schema, format_checker=checker).validate(json.loads(out.text))


def test_json_object_regex_choice_and_grammars(llm):
    lark = 'start: "(" num ")" | "(" num "," num ")"\nnum: /[0-9]{1,2}/'
    gbnf = 'root ::= "ab" tail\ntail ::= "x" | "yz"'
    specs = [({"regex": r"[0-9]{3}-[a-z]{2,4}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
             ({"choice": ["yes", "no", "maybe \"so\""]}, lambda t: t in ("yes", "no", "maybe \"so\"")),
             ({"grammar": lark}, lambda t: re.fullmatch(r"\([0-9]{1,2}(,[0-9]{1,2})*\)", t)),
             ({"grammar": gbnf}, lambda t: t in ("abx", "abyz"))]
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=64, structured_outputs=spec)
              for spec, _ in specs for s in range(4)]
    outs = llm.generate(["x"] * len(params), params, use_tqdm=False)
    for i, out in enumerate(outs):
        spec, ok = specs[i // 4]
        assert out.finish_reason == "stop" and ok(out.text), (spec, out.text)
    # Any JSON object: keys, values and numbers are unbounded, so random weights may run into max_tokens ("length",
    # a valid prefix); a finished one is always an object.
    outs = llm.generate(["x"] * 4, [SamplingParams(temperature=1.0, seed=s, max_tokens=200,
                                                   structured_outputs={"json_object": True}) for s in range(4)],
                        use_tqdm=False)
    finished = [out for out in outs if out.finish_reason == "stop"]
    assert all(isinstance(json.loads(out.text), dict) for out in finished)
    assert all(out.text.startswith("{") for out in outs)


def test_structure_cut_by_max_tokens_ends_with_length(llm):
    schema = obj({"tags": arr({"type": "string", "maxLength": 30}, 3, 3)})
    out = llm.generate(["x"], SamplingParams(temperature=1.0, seed=0, max_tokens=5,
                                             structured_outputs={"json": schema}), use_tqdm=False)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5


def test_mixed_batch_leaves_unconstrained_rows_alone(llm):
    """The same batch with the third row unconstrained, then constrained: rows 1-2 keep their tokens and top ids
    exactly and their logprobs to float32 rounding (the mask only touches its own row, and logprobs are of the raw
    logits). Not to the bit: a constrained row moves the batch to the constrained program (counts and a mask) and its
    first token to a one-token step (serving/engine.py, "Constrained steps"), other compiled programs."""
    free = SamplingParams(temperature=1.0, seed=11, max_tokens=12, logprobs=2, ignore_eos=True)
    other = SamplingParams(temperature=1.0, seed=3, max_tokens=12)
    alone = llm.generate(["Hello", "World", "Z"], [free, free, other], use_tqdm=False)
    constrained = SamplingParams(temperature=1.0, seed=3, max_tokens=12, structured_outputs={"regex": "[ab]+"})
    mixed = llm.generate(["Hello", "World", "Z"], [free, free, constrained], use_tqdm=False)
    for a, m in zip(alone[:2], mixed[:2]):
        assert a.token_ids == m.token_ids
        np.testing.assert_allclose([lp.logprob for lp in m.logprobs], [lp.logprob for lp in a.logprobs],
                                   rtol=1e-5, atol=1e-6)
        assert [[i for i, _ in lp.top] for lp in a.logprobs] == [[i for i, _ in lp.top] for lp in m.logprobs]
        np.testing.assert_allclose([[v for _, v in lp.top] for lp in m.logprobs],
                                   [[v for _, v in lp.top] for lp in a.logprobs], rtol=1e-5, atol=1e-6)
    assert re.fullmatch("[ab]+", mixed[2].text) and not re.fullmatch("[ab]+", alone[2].text)


def test_penalties_logprobs_n_and_stop_strings_with_a_grammar(llm):
    params = SamplingParams(temperature=0.9, seed=2, max_tokens=40, n=2, logprobs=3, repetition_penalty=1.3,
                            stop=["9"], structured_outputs={"regex": "[0-9a-c]{8}"})
    outs = llm.generate(["q"], params, use_tqdm=False)
    assert len(outs) == 2
    for out in outs:
        assert re.fullmatch("[0-9a-c]*", out.text) and "9" not in out.text
        assert len(out.logprobs) == len(out.token_ids) and all(len(lp.top) == 3 for lp in out.logprobs)


@pytest.mark.parametrize("bad, message", [
    ({"regex": "[a-"}, "structured_outputs.regex"),
    ({"json": '{"type": "object"'}, "structured_outputs.json is not valid JSON"),
    ({"choice": []}, "non-empty list"),
    ({"json_object": True, "regex": "a"}, "exactly one of"),
    ({"grammar": "start: undefined_rule"}, "structured_outputs.grammar"),
    ({"jsn": {}}, r"unsupported field\(s\) \['jsn'\]"),
])
def test_bad_constraints_are_refused(llm, bad, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(["x"], SamplingParams(max_tokens=4, structured_outputs=bad), use_tqdm=False)
    assert not llm.engine.has_unfinished()


def test_params_stay_hashable_and_keep_key_order():
    spec = StructuredOutputs.from_value({"json": {"b": 1, "a": 2}})
    assert spec.json == '{"b": 1, "a": 2}'
    assert hash(SamplingParams(structured_outputs={"choice": ["x", "y"]})) == hash(
        SamplingParams(structured_outputs=StructuredOutputs(choice=("x", "y"))))


def test_pipelined_model_follows_the_grammar(llm, monkeypatch):
    """pp=2: the bitmask rides with the sampling inputs to the last stage, filled once the first stage is dispatched
    (pipeline_runner: DeferredMask); same tokens as one stage."""
    from gemma4_jax.serving import step_builder

    fills = []
    fill = step_builder.DeferredMask.fill
    monkeypatch.setattr(step_builder.DeferredMask, "fill", lambda self: fills.append(1) or fill(self))
    staged = gemma4_jax.LLM(gemma4_jax.from_config("tiny", dtype="float32", seed=5, pp=2),
                            tokenizer=byte_level_tokenizer(), max_num_seqs=4, max_model_len=256,
                            max_num_batched_tokens=256, compilation_cache=False)
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=16, structured_outputs={"regex": "[a-f]{3}[0-9]"})
              for s in range(3)]
    outs = staged.generate(["p"] * 3, params, use_tqdm=False)
    assert fills  # the pipelined steps deferred their masks
    single = llm.generate(["p"] * 3, params, use_tqdm=False)
    for out, one in zip(outs, single):
        assert re.fullmatch("[a-f]{3}[0-9]", out.text) and out.finish_reason == "stop"
        assert out.token_ids == one.token_ids


def test_grammar_masks_are_filled_while_the_forward_runs(llm, monkeypatch):
    """A step whose sampled rows have grammars (and no penalties or logprobs) runs split: the forward is
    dispatched, then the host fills the masks, then the sampler runs (serving/runner.py, Runner.step). Same tokens
    and logprobs as the one-program step with the mask filled first."""
    from gemma4_jax.serving import runner as runner_lib
    from gemma4_jax.serving import step_builder

    events = []

    def recorded(name, fn):
        def call(*args, **kwargs):
            events.append(name)
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(runner_lib, "forward_logits", recorded("forward", runner_lib.forward_logits))
    monkeypatch.setattr(runner_lib, "sample_logits", recorded("sample", runner_lib.sample_logits))
    monkeypatch.setattr(step_builder.DeferredMask, "fill", recorded("fill", step_builder.DeferredMask.fill))
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=10, structured_outputs={"regex": "[a-f]{4}[0-9]"})
              for s in range(3)] + [SamplingParams(temperature=1.0, seed=7, max_tokens=10)]
    split = llm.generate(["p", "q", "r", "s"], params, use_tqdm=False)
    assert events and events[:3] == ["forward", "fill", "sample"]
    assert len(events) % 3 == 0 and all(events[i:i + 3] == ["forward", "fill", "sample"]
                                        for i in range(0, len(events), 3))
    events.clear()
    monkeypatch.setattr(llm.engine.runner, "splits_sampling", False)
    whole = llm.generate(["p", "q", "r", "s"], params, use_tqdm=False)
    assert not events
    for a, b in zip(split, whole):
        assert a.token_ids == b.token_ids and a.text == b.text
    assert all(re.fullmatch("[a-f]{4}[0-9]", out.text) for out in split[:3])
