"""Structured outputs: JSON schema, JSON object, regex, choice and grammar constraints, enforced token by token.

Why llguidance (over outlines-core and xgrammar): it needs no torch, builds its tokenizer view straight from the
HF `tokenizer.json` we already load, compiles JSON schemas, regexes and Lark / GBNF grammars lazily (no up-front
automaton over the 262k-token vocabulary, so a new schema costs milliseconds, not seconds) and fills a packed
bitmask of allowed tokens for a whole batch in parallel Rust threads (`fill_next_token_bitmask_par`).

Flow: `StructuredOutputs` (vLLM's `structured_outputs` fields, normalised and hashable) -> a grammar string ->
`Grammars.matcher` (an `LLMatcher` per request, checked at admission: a grammar that does not compile is a
ValueError naming it). Each step the engine asks `Grammars.fill` for the rows' bitmask (B, ceil(V / 32)) int32
(unconstrained rows allow everything), the jitted sampler drops disallowed tokens (sampling.py), and the sampled
token is fed back with `consume_token`. When no row is constrained the step gets no mask at all and runs exactly
as before.

Two Gemma 4 shapes ride on the same machinery: `tool_calls` (forced tool calls in Gemma 4's syntax, built by
`tool_grammar.py`) and `reasoning` (any constraint applied to the answer after an optional thought channel,
`reasoning.thought_grammar`). Their markers are special tokens, referenced by id once the engine's tokenizer is known
(`Grammars`), and as text when a grammar is checked without one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gemma4_jax.serving.reasoning import ANSWER_RULE, thought_grammar
from gemma4_jax.serving.tool_grammar import MarkerFn, marker_for, text_marker, tool_call_grammar

_KINDS = ("json", "json_object", "regex", "choice", "grammar", "tool_calls")
_TOOL_CALL_FIELDS = {"tools", "name", "parallel"}
# JSON as `json.dumps` writes it (", " and ": " separators, no other whitespace): free whitespace lets a model
# (or random weights) wander in blanks until max_tokens instead of closing the structure. A schema may still
# override it with its own "x-guidance" options.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclasses.dataclass(frozen=True)
class StructuredOutputs:
    """One constraint on a request's output (vLLM's `StructuredOutputsParams` names; exactly one is set).

    json: a JSON schema (dict or JSON text; kept as canonical JSON text so the params stay hashable);
    json_object: any JSON object; regex: a regular expression (Rust regex syntax) the whole output matches;
    choice: the output is exactly one of these strings; grammar: a Lark grammar (llguidance's dialect, with a
    `start` rule) or a GBNF / EBNF one (`root ::= ...`, as llama.cpp and vLLM's xgrammar take);
    tool_calls: forced Gemma 4 tool calls, {"tools": OpenAI tools, "name": a named tool_choice or None for
    "required", "parallel": several calls allowed (default true)} (kept as canonical JSON text).

    reasoning: a modifier, not a kind: the constraint applies after an optional Gemma 4 thought channel
    (`<|channel>thought ... <channel|>`), so a thinking model reasons freely and then answers in the structure.
    """

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    tool_calls: str | None = None
    reasoning: bool = False

    def __post_init__(self):
        if self.json is not None and not isinstance(self.json, str):
            if not isinstance(self.json, Mapping):
                raise ValueError("structured_outputs.json must be a JSON schema object, got "
                                 f"{type(self.json).__name__}")
            object.__setattr__(self, "json", json.dumps(self.json))  # key order kept: it is the output order
        elif isinstance(self.json, str):
            try:
                schema = json.loads(self.json)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
            if not isinstance(schema, dict):
                raise ValueError("structured_outputs.json must be a JSON schema object")
        if self.choice is not None:
            if isinstance(self.choice, str) or not isinstance(self.choice, Sequence) or not self.choice:
                raise ValueError("structured_outputs.choice must be a non-empty list of strings")
            if not all(isinstance(c, str) for c in self.choice):
                raise ValueError("structured_outputs.choice must hold strings only")
            object.__setattr__(self, "choice", tuple(self.choice))
        if self.tool_calls is not None:
            object.__setattr__(self, "tool_calls", _canonical_tool_calls(self.tool_calls))
        if not isinstance(self.reasoning, bool):
            raise ValueError(f"structured_outputs.reasoning must be a bool, got {self.reasoning!r}")
        if not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs.json_object must be a bool, got {self.json_object!r}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        chosen = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(chosen) != 1:
            raise ValueError(f"structured_outputs needs exactly one of {list(_KINDS)}; got "
                             f"{chosen or 'none'}")

    @classmethod
    def from_value(cls, value: Any) -> StructuredOutputs | None:
        """None, a StructuredOutputs, or a dict of its fields (unknown keys are refused, not ignored)."""
        if value is None or isinstance(value, StructuredOutputs):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"structured_outputs must be a dict or StructuredOutputs, got {type(value).__name__}")
        unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"structured_outputs: unsupported field(s) {unknown}; supported: "
                             f"{[*_KINDS, 'reasoning']}")
        return cls(**{k: v for k, v in value.items() if v is not None})

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    def grammar_text(self, marker: MarkerFn = text_marker) -> str:
        """The llguidance grammar for this constraint; `marker` writes Gemma 4's markers (tool calls, thought
        channel): token references for a tokenizer that has them as special tokens, else text."""
        if not self.reasoning:
            return self._answer_grammar(marker)
        inline = self._inline_answer(marker)
        return thought_grammar(inline if inline is not None else self._answer_grammar(marker), marker,
                               inline=inline is not None)

    def _inline_answer(self, marker: MarkerFn) -> str | None:
        """The answer as Lark rules under `ANSWER_RULE`, for the kinds that have one (all but a user grammar, which
        goes in as a named subgrammar): one grammar keeps one lexer, so markers shared by the thought and the answer
        (`<|...` as text) lex the same way."""
        from llguidance import LLMatcher, regex_to_lark

        if self.tool_calls is not None:
            spec = json.loads(self.tool_calls)
            return tool_call_grammar(spec["tools"], spec["name"], spec["parallel"], marker, start=ANSWER_RULE)
        if self.json is not None or self.json_object:
            schema = json.loads(self.json) if self.json is not None else {"type": "object"}
            compiled = json.loads(LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS))
            return f"{ANSWER_RULE}: %json {json.dumps(compiled['grammars'][0]['json_schema'])}\n"
        if self.regex is not None:
            return f"{ANSWER_RULE}: /{regex_to_lark(self.regex)}/\n"
        if self.choice is not None:
            return f"{ANSWER_RULE}: " + " | ".join(json.dumps(c) for c in self.choice) + "\n"
        return None

    def _answer_grammar(self, marker: MarkerFn) -> str:
        from llguidance import LLMatcher
        from llguidance.gbnf_to_lark import gbnf_to_lark

        if self.tool_calls is not None:
            spec = json.loads(self.tool_calls)
            return tool_call_grammar(spec["tools"], spec["name"], spec["parallel"], marker)
        if self.json is not None:
            return LLMatcher.grammar_from_json_schema(self.json, defaults=_JSON_OPTIONS)
        if self.json_object:
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            # JSON string literals are valid Lark literals, escapes included.
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choice))
        text = self.grammar
        if "::=" in text:  # GBNF / EBNF
            try:
                text = gbnf_to_lark(text)
            except Exception as e:  # GbnfToLarkError, or a plain exception from its parser
                raise ValueError(f"structured_outputs.grammar: cannot read the GBNF grammar ({e})") from None
        return LLMatcher.grammar_from_lark(text)


def _canonical_tool_calls(value: Any) -> str:
    """The tool_calls field as canonical JSON text {"tools": [...], "name": str | None, "parallel": bool}."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"structured_outputs.tool_calls is not valid JSON: {e}") from None
    if not isinstance(value, Mapping):
        raise ValueError("structured_outputs.tool_calls must be an object with 'tools' (and 'name', 'parallel')")
    unknown = sorted(set(value) - _TOOL_CALL_FIELDS)
    if unknown:
        raise ValueError(f"structured_outputs.tool_calls: unsupported field(s) {unknown}; supported: "
                         f"{sorted(_TOOL_CALL_FIELDS)}")
    tools, name, parallel = value.get("tools"), value.get("name"), value.get("parallel", True)
    if isinstance(tools, str | bytes) or not isinstance(tools, Sequence) or not tools:
        raise ValueError("structured_outputs.tool_calls.tools must be a non-empty list of OpenAI tools")
    if name is not None and not isinstance(name, str):
        raise ValueError("structured_outputs.tool_calls.name must be a function name or null")
    if not isinstance(parallel, bool):
        raise ValueError("structured_outputs.tool_calls.parallel must be a bool")
    return json.dumps({"tools": list(tools), "name": name, "parallel": parallel})


def _file_or_text(value: str) -> str:
    """A command-line value that is a file's path (its contents) or the text itself."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    return value


def from_cli(
    json_schema: str | None = None,
    json_object: bool = False,
    regex: str | None = None,
    choice: str | None = None,
    grammar: str | None = None,
) -> StructuredOutputs | None:
    """`gemma4-jax generate`'s constraint flags -> StructuredOutputs (None when none is given; ValueError naming the
    flag when several are, or when one is malformed). json_schema and grammar: a file, or the text inline; choice:
    comma-separated."""
    given = {"--json-schema": json_schema, "--json-object": json_object or None, "--regex": regex,
             "--choice": choice, "--grammar": grammar}
    chosen = [flag for flag, value in given.items() if value is not None]
    if not chosen:
        return None
    if len(chosen) > 1:
        raise ValueError(f"give one structured-output flag; got {chosen}")
    try:
        if json_schema is not None:
            spec = StructuredOutputs(json=_file_or_text(json_schema))
        elif json_object:
            spec = StructuredOutputs(json_object=True)
        elif regex is not None:
            spec = StructuredOutputs(regex=regex)
        elif choice is not None:
            spec = StructuredOutputs(choice=[c for c in choice.split(",") if c])
        else:
            spec = StructuredOutputs(grammar=_file_or_text(grammar))
        check_grammar(spec)
    except ValueError as e:
        raise ValueError(f"{chosen[0]}: {e}") from None
    return spec


def check_grammar(spec: StructuredOutputs) -> str:
    """A constraint's grammar, checked without a tokenizer (syntax, unsupported schema keywords): ValueError naming
    the problem. The engine checks it again against its tokenizer at admission."""
    from llguidance import LLMatcher

    try:
        text = spec.grammar_text()
        is_error, messages = LLMatcher.validate_grammar_with_warnings(text)
    except ValueError:
        raise
    except Exception as e:  # llguidance raises plain exceptions for some malformed inputs
        raise ValueError(f"structured_outputs.{spec.kind}: {e}") from None
    if is_error:
        raise ValueError(f"structured_outputs.{spec.kind}: the grammar does not compile: {messages[0]}")
    return text


class Grammars:
    """Grammar matching for one tokenizer and vocabulary: per-request matchers and the batch bitmask.

    tokenizer: the engine's Tokenizer (its HF backend is handed to llguidance); vocab_size: the model's logits
    width V (may exceed the tokenizer's; the extra ids are never allowed); eos_ids: the ids that end generation.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Sequence[int]):
        import llguidance

        backend = tokenizer.backend
        self.tokenizer = llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab_size,
                                                eos_token=sorted(set(int(i) for i in eos_ids)) or None)
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self._executor = llguidance.LLExecutor()
        self._checked: dict[StructuredOutputs, str] = {}
        self._marker = marker_for(tokenizer)  # Gemma 4's markers as token references where they are special

    def grammar(self, spec: StructuredOutputs) -> str:
        """The compiled-and-checked grammar text of a constraint (cached); ValueError when it does not compile."""
        from llguidance import LLMatcher

        if spec not in self._checked:
            text = spec.grammar_text(self._marker)
            is_error, messages = LLMatcher.validate_grammar_with_warnings(text, self.tokenizer)
            if is_error:
                raise ValueError(f"structured_outputs.{spec.kind}: the grammar does not compile: {messages[0]}")
            self._checked[spec] = text
        return self._checked[spec]

    def matcher(self, spec: StructuredOutputs):
        """A fresh LLMatcher at the start of the output."""
        from llguidance import LLMatcher

        matcher = LLMatcher(self.tokenizer, self.grammar(spec), log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured_outputs.{spec.kind}: {matcher.get_error()}")
        return matcher

    def fill(self, matchers: Sequence[Any], rows: int) -> np.ndarray:
        """Bitmask (rows, ceil(V / 32)) int32 of the allowed next tokens: bit t % 32 of word t // 32. Rows whose
        matcher is None (unconstrained, padding) allow every token."""
        from llguidance.numpy import fill_next_token_bitmask_par

        mask = np.full((rows, self.words), -1, np.int32)
        constrained = [(m, i) for i, m in enumerate(matchers) if m is not None]
        if constrained:
            fill_next_token_bitmask_par(self._executor, constrained, mask)
        return mask

    def fill_drafts(self, matchers: Sequence[Any], drafts: Sequence[Sequence[int]], rows: int,
                    positions: int) -> np.ndarray:
        """The masks of a speculative verify step: (rows, positions, ceil(V / 32)) int32, position j of row b
        allowing the tokens the row's grammar takes after its drafts d_1 .. d_j (drafts[b], at most positions - 1
        tokens, each accepted by the grammar: `grammar_prefix`). Positions past a row's drafts, and rows whose
        matcher is None, allow every token. The matchers are left as they were: llguidance walks each row's drafts
        on a scratch state, all rows in parallel threads."""
        from llguidance.numpy import fill_next_token_bitmask_par, fill_next_token_bitmask_par_with_draft_tokens

        mask = np.full((rows * positions, self.words), -1, np.int32)
        constrained = [(m, i * positions, [int(t) for t in d]) for i, (m, d) in enumerate(zip(matchers, drafts))
                       if m is not None]
        longest = max((len(draft) for _, _, draft in constrained), default=0)
        if longest >= positions:  # the fill would write into the next row's masks
            raise ValueError(f"{longest} drafts do not fit a verify step of {positions} positions")
        drafted = [row for row in constrained if row[2]]
        undrafted = [(m, index) for m, index, draft in constrained if not draft]  # llguidance refuses empty drafts
        if drafted:
            fill_next_token_bitmask_par_with_draft_tokens(self._executor, drafted, mask)
        if undrafted:
            fill_next_token_bitmask_par(self._executor, undrafted, mask)
        return mask.reshape(rows, positions, self.words)


def grammar_prefix(matcher: Any, draft: Sequence[int]) -> list[int]:
    """The longest prefix of `draft` (token ids) that the matcher's grammar accepts from its current state; the
    matcher is not advanced. A constrained row's speculative drafts are cut here, so the verify step only ever
    checks drafts its masks can accept (the first rejected one would be rejected there anyway)."""
    draft = [int(t) for t in draft]
    return draft[: matcher.validate_tokens(draft)] if draft else []
