"""`gemma4-jax generate` with structured outputs: --json-schema / --json-object / --regex / --choice / --grammar, and
a per-line `structured_outputs` object in JSONL input; bad or conflicting flags exit 2 with the flag named."""

from __future__ import annotations

import json
import re

import pytest

from gemma4_jax import cli
from gemma4_jax.serving.structured import StructuredOutputs, from_cli


def test_flags_to_constraints(tmp_path):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    assert from_cli(json_schema=str(path)) == StructuredOutputs(json=schema)  # a file
    assert from_cli(json_schema=json.dumps(schema)) == StructuredOutputs(json=schema)  # inline
    assert from_cli(choice="yes,no") == StructuredOutputs(choice=("yes", "no"))
    grammar = tmp_path / "g.lark"
    grammar.write_text('start: "a" | "b"')
    assert from_cli(grammar=str(grammar)) == StructuredOutputs(grammar='start: "a" | "b"')
    assert from_cli(json_object=True) == StructuredOutputs(json_object=True) and from_cli() is None
    with pytest.raises(ValueError, match=r"one structured-output flag; got \['--regex', '--choice'\]"):
        from_cli(regex="a", choice="b")
    with pytest.raises(ValueError, match="--regex: structured_outputs.regex"):
        from_cli(regex="[a-")
    with pytest.raises(ValueError, match="--json-schema: structured_outputs.json is not valid JSON"):
        from_cli(json_schema="{not json")


def test_per_line_constraints_override_the_flags():
    from gemma4_jax.serving.sampling import SamplingParams

    base = SamplingParams(structured_outputs={"choice": ["a"]})
    assert cli._job_params(base, {"prompt": "x"}, "in.jsonl: record 1") is base
    own = cli._job_params(base, {"prompt": "x", "structured_outputs": {"regex": "[0-9]"}}, "in.jsonl: record 2")
    assert own.structured_outputs == StructuredOutputs(regex="[0-9]") and own.max_tokens == base.max_tokens
    with pytest.raises(ValueError, match="in.jsonl: record 3: structured_outputs.grammar"):
        cli._job_params(base, {"prompt": "x", "structured_outputs": {"grammar": "start: nope"}}, "in.jsonl: record 3")


@pytest.mark.slow  # builds and compiles the demo model: ~3 min on a loaded 2-core machine
def test_generate_with_flags_and_per_line_constraints(tmp_path, capsys):
    assert cli.main(["generate", "--regex", "a", "--choice", "b"]) == 2
    assert "--regex" in capsys.readouterr().err
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        json.dumps({"prompt": "x", "structured_outputs": {"regex": "[0-9]{3}"}})
        + "\n"
        + json.dumps({"prompt": "y"})
        + "\n"
        + json.dumps(
            {
                "prompt": "z",
                "structured_outputs": {
                    "json": {
                        "type": "object",
                        "properties": {"ok": {"type": "boolean"}},
                        "required": ["ok"],
                        "additionalProperties": False,
                    }
                },
            }
        )
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    flags = "--choice red,green --temperature 1 --seed 1 --max-tokens 24 --quiet --no-compilation-cache"
    flags += " --max-num-seqs 4 --max-model-len 128 --max-num-batched-tokens 64"  # few, small step shapes
    code = cli.main(["generate", "--input", str(jobs), "--output", str(out), *flags.split()])
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert re.fullmatch("[0-9]{3}", records[0]["text"]) and records[0]["finish_reason"] == "stop"
    assert records[1]["text"] in ("red", "green")  # the flag, for lines without their own
    assert isinstance(json.loads(records[2]["text"])["ok"], bool)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "structured_outputs": {"regex": "[a-"}}) + "\n")
    assert cli.main(["generate", "--input", str(bad), "--quiet"]) == 2
    assert "record 1" in capsys.readouterr().err
