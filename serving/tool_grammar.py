"""Gemma 4 tool calls as a grammar: `tool_choice` "required" or a named function, enforced token by token.

A forced call is written in Gemma 4's own syntax (the one `tool_calls.py` parses and the chat template writes into
the history), with each tool's JSON-schema parameters translated into that syntax rather than into JSON:

    <|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|><|tool_call>call:...<tool_call|><|tool_response>

keys bare (in the template's `dictsort` order), strings between `<|"|>` delimiters with no escapes, numbers,
true / false / null bare, objects `{k:v,...}`, arrays `[a,b]`. The markers (`<|tool_call>`, `<tool_call|>`, `<|"|>`,
`<|tool_response>`) are special tokens of the Gemma 4 tokenizer: a `MarkerFn` writes each one as a token reference
(`<[id]>`) when the tokenizer has it as a special token, or as a text literal otherwise (tokenizers without them).

`tool_call_grammar` builds the Lark grammar (llguidance's dialect); `structured.StructuredOutputs(tool_calls=...)`
carries the request and `structured.Grammars` compiles it against the engine's tokenizer. Numbers use llguidance's
JSON-schema compiler inline (`%json {...}`: bounds and `multipleOf` as JSON Schema means them; a JSON number is
written the same way in Gemma 4's syntax). A schema keyword this translation cannot enforce is a `ToolSchemaError`
naming the keyword and where it is, never silently dropped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gemma4_jax.serving.tool_calls import STRING_DELIM, TOOL_CALL_END, TOOL_CALL_START, TOOL_RESPONSE_START

MarkerFn = Callable[[str], str]  # a marker string -> its Lark form: `<[id]>` for a special token, else a literal

# Keys written bare (as the template writes argument keys); any other key goes between string delimiters.
_BARE_KEY_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
# Text inside a Gemma 4 string: anything without `<|` or `|>`, so that no marker (`<|"|>`, `<tool_call|>`, ...) can be
# spelled out in plain text and end the string or the call early for the parser.
_STRING_TEXT = r"/(?s:.*)/ & ~/(?s:.*)(<\||\|>)(?s:.*)/"
_NUMBER = r"/-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/"
# JSON written as json.dumps writes a scalar: no blanks for a model to wander in (see structured._JSON_OPTIONS).
_X_GUIDANCE = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
# Formats enforced for strings (the rest are refused, not ignored); the regexes are the formats' plain shapes.
_FORMATS = {
    "date": r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    "time": r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])",
    "date-time": r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
    r"(\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])",
    "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    "ipv4": r"((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])",
    "email": r"[A-Za-z0-9._%+-]{1,32}@[A-Za-z0-9-]{1,32}(\.[A-Za-z0-9-]{1,16}){1,3}",
}
# Keywords that describe without constraining.
_ANNOTATIONS = {
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "deprecated",
    "readOnly",
    "writeOnly",
    "strict",
}
_TYPE_KEYWORDS = {
    "string": {"minLength", "maxLength", "pattern", "format"},
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
    "boolean": set(),
    "null": set(),
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "minItems", "maxItems"},
}
_TYPES = tuple(_TYPE_KEYWORDS)


class ToolSchemaError(ValueError):
    """A tool's parameter schema uses something the Gemma 4 call grammar cannot enforce (the keyword is named)."""


def text_marker(marker: str) -> str:
    """A marker as a Lark text literal (for tokenizers where it is not one special token)."""
    return json.dumps(marker)


def marker_for(tokenizer: Any) -> MarkerFn:
    """The `MarkerFn` of a tokenizer (serving.tokenizer.Tokenizer): a special token's id reference, else the text."""
    special = set(tokenizer.all_special_ids)

    def marker(text: str) -> str:
        token_id = tokenizer.token_to_id(text)
        return f"<[{token_id}]>" if token_id is not None and token_id in special else text_marker(text)

    return marker


def _lit(text: str) -> str:
    return json.dumps(text)


class _SchemaGrammar:
    """Lark rules for JSON-schema values written in Gemma 4's argument syntax; `value(schema)` -> a rule name."""

    def __init__(self, marker: MarkerFn, root: Mapping[str, Any]):
        self.marker = marker
        self.root = root
        self.rules: list[str] = []
        self._count = 0
        self._refs: dict[str, str] = {}
        self._any: str | None = None
        self._string: str | None = None

    def _rule(self, prefix: str, body: str) -> str:
        self._count += 1
        name = f"{prefix}_{self._count}"
        self.rules.append(f"{name}: {body}")
        return name

    def _terminal(self, body: str) -> str:
        self._count += 1
        name = f"T_{self._count}"
        self.rules.append(f"{name}: {body}")
        return name

    def quoted(self, text_rule: str) -> str:
        q = self.marker(STRING_DELIM)
        return f"{q} {text_rule} {q}"

    def string_rule(self, body: str) -> str:
        """A Gemma 4 string whose text matches the terminal expression `body`."""
        q = self.marker(STRING_DELIM)
        if q.startswith("<["):  # a special token: no text can be taken for it
            return self._rule("str", self.quoted(self._terminal(body)))
        # The delimiter as text: the closing one is part of the string's terminal, or the lexer, reading the text
        # greedily, would take its '<' as more text and never close the string.
        return self._rule("str", f"{q} {self._terminal(f'{self._terminal(body)} {q}')}")

    def free_string(self) -> str:
        if self._string is None:
            self._string = self.string_rule(_STRING_TEXT)
        return self._string

    def key(self, name: str) -> str:
        if name and set(name) <= _BARE_KEY_CHARS:
            return _lit(name + ":")
        if "<|" in name or "|>" in name:
            raise ToolSchemaError(f"property name {name!r} contains a Gemma 4 marker ('<|' or '|>')")
        return f'{self.quoted(_lit(name))} ":"'

    def literal(self, value: Any, where: str) -> str:
        """An enum / const value written in Gemma 4 syntax, as Lark."""
        if isinstance(value, str):
            if "<|" in value or "|>" in value:
                raise ToolSchemaError(f"{where}: the value {value!r} contains a Gemma 4 marker ('<|' or '|>')")
            return self.quoted(_lit(value)) if value else self.quoted("")
        if isinstance(value, bool) or value is None:
            return _lit(json.dumps(value))
        if isinstance(value, int | float):
            return _lit(json.dumps(value))
        if isinstance(value, Mapping):
            parts = [f"{self.key(str(k))} {self.literal(v, where)}" for k, v in sorted(value.items())]
            return '"{" ' + ' "," '.join(parts) + ' "}"' if parts else '"{}"'
        if isinstance(value, list | tuple):
            items = [self.literal(v, where) for v in value]
            return '"[" ' + ' "," '.join(items) + ' "]"' if items else '"[]"'
        raise ToolSchemaError(f"{where}: unsupported literal {value!r}")

    def any_value(self) -> str:
        """Any value (an empty schema): strings, numbers, literals, objects with bare keys, arrays."""
        if self._any is None:
            self._any = name = "any_value"
            string, number = self.free_string(), self._terminal(_NUMBER)
            key = self._terminal(r"/[A-Za-z_][A-Za-z0-9_]*:/")
            self.rules.append(
                f'{name}: {string} | {number} | "true" | "false" | "null" '
                f'| "{{" ({key} {name} ("," {key} {name})*)? "}}" | "[" ({name} ("," {name})*)? "]"'
            )
        return self._any

    def value(self, schema: Any, where: str) -> str:
        """The rule for one value of `schema` (a JSON-schema dict or a bool) at `where` (a path for errors)."""
        if schema is True or schema == {}:
            return self.any_value()
        if not isinstance(schema, Mapping):
            raise ToolSchemaError(f"{where}: a schema must be an object, got {schema!r}")
        if "$ref" in schema:
            return self.ref(schema, where)
        if "const" in schema:
            return self._rule("const", self.literal(schema["const"], where))
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise ToolSchemaError(f"{where}.enum must be a non-empty list")
            return self._rule("enum", " | ".join(self.literal(v, where) for v in values))
        for combinator in ("anyOf", "oneOf"):  # oneOf as anyOf: one alternative is written at a time
            if combinator in schema:
                options = schema[combinator]
                if not isinstance(options, list) or not options:
                    raise ToolSchemaError(f"{where}.{combinator} must be a non-empty list")
                base = {k: v for k, v in schema.items() if k != combinator}
                alts = [
                    self.value({**base, **o} if base else o, f"{where}.{combinator}.{i}") for i, o in enumerate(options)
                ]
                return self._rule("alt", " | ".join(alts))
        if "allOf" in schema:
            parts = schema["allOf"]
            if not isinstance(parts, list) or len(parts) != 1:
                raise ToolSchemaError(f"{where}.allOf with more than one schema is not supported in tool parameters")
            base = {k: v for k, v in schema.items() if k != "allOf"}
            return self.value({**base, **parts[0]}, f"{where}.allOf.0")
        types = schema.get("type")
        if types is None:
            types = self._implied_type(schema)
        types = [types] if isinstance(types, str) else list(types or [])
        if schema.get("nullable") is True and "null" not in types:
            types.append("null")
        if not types:
            self._check_keywords(schema, set(), where)
            return self.any_value()
        for t in types:
            if t not in _TYPES:
                raise ToolSchemaError(f"{where}.type {t!r} is not a JSON Schema type")
        allowed = set().union(*(_TYPE_KEYWORDS[t] for t in types))
        self._check_keywords(schema, allowed, where)
        alts = [self._typed(t, schema, where) for t in types]
        return alts[0] if len(alts) == 1 else self._rule("alt", " | ".join(alts))

    @staticmethod
    def _implied_type(schema: Mapping[str, Any]) -> str | None:
        for t, keywords in _TYPE_KEYWORDS.items():
            if t not in ("integer", "boolean", "null") and keywords & set(schema):
                return t
        return None

    @staticmethod
    def _check_keywords(schema: Mapping[str, Any], allowed: set[str], where: str) -> None:
        for key in schema:
            if key in allowed or key in _ANNOTATIONS or key in ("type", "nullable", "$defs", "definitions"):
                continue
            if key.startswith("x-"):
                continue
            raise ToolSchemaError(f"{where}: the keyword {key!r} is not supported in tool parameters")

    def ref(self, schema: Mapping[str, Any], where: str) -> str:
        ref = schema["$ref"]
        if len(schema) > 1 and set(schema) - {"$ref"} - _ANNOTATIONS:
            raise ToolSchemaError(f"{where}: $ref beside other keywords is not supported in tool parameters")
        if ref not in self._refs:
            parts = ref.split("/") if isinstance(ref, str) else []
            if len(parts) != 3 or parts[0] != "#" or parts[1] not in ("$defs", "definitions"):
                raise ToolSchemaError(f"{where}: only local references (#/$defs/NAME) are supported, got {ref!r}")
            target = self.root.get(parts[1], {}).get(parts[2])
            if target is None:
                raise ToolSchemaError(f"{where}: the reference {ref!r} points to nothing")
            self._count += 1
            name = f"ref_{self._count}"
            self._refs[ref] = name  # before the body, so a recursive schema refers to itself
            self.rules.append(f"{name}: {self.value(target, ref)}")
        return self._refs[ref]

    def _typed(self, t: str, schema: Mapping[str, Any], where: str) -> str:
        if t == "string":
            return self._string_rule(schema, where)
        if t in ("integer", "number"):
            keys = _TYPE_KEYWORDS[t] & set(schema)
            if not keys and t == "number":
                return self._rule("num", self._terminal(_NUMBER))
            sub = {"type": t, **{k: schema[k] for k in keys}, "x-guidance": _X_GUIDANCE}
            return self._rule("num", "%json " + json.dumps(sub))
        if t == "boolean":
            return self._rule("bool", '"true" | "false"')
        if t == "null":
            return self._rule("null", '"null"')
        if t == "object":
            return self.object_rule(schema, where)
        return self._array_rule(schema, where)

    def _string_rule(self, schema: Mapping[str, Any], where: str) -> str:
        from llguidance import regex_to_lark

        shapes = []
        if "format" in schema:
            if schema["format"] not in _FORMATS:
                raise ToolSchemaError(
                    f"{where}: string format {schema['format']!r} is not supported in tool "
                    f"parameters (supported: {sorted(_FORMATS)})"
                )
            shapes.append(_FORMATS[schema["format"]])
        if "pattern" in schema:  # matched whole: a full match is also a match anywhere, as JSON Schema asks
            shapes.append(schema["pattern"].removeprefix("^").removesuffix("$"))
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        if low or high is not None:
            shapes.append(f"(?s:.{{{low},{'' if high is None else high}}})")
        if not shapes:
            return self.free_string()
        return self.string_rule(" & ".join(["/" + regex_to_lark(s, "dw") + "/" for s in shapes] + [_STRING_TEXT]))

    def object_rule(self, schema: Mapping[str, Any], where: str) -> str:
        properties = schema.get("properties") or {}
        required = schema.get("required") or []
        if not isinstance(properties, Mapping) or not isinstance(required, list):
            raise ToolSchemaError(f"{where}: properties must be an object and required a list")
        members = dict(properties)
        for name in required:
            if name not in members:
                if schema.get("additionalProperties") is False:
                    raise ToolSchemaError(f"{where}: required property {name!r} is not allowed by its properties")
                members[name] = schema.get("additionalProperties", True)
        if not members:
            extra = schema.get("additionalProperties", True)
            if extra is False:
                return self._rule("obj", '"{}"')
            key = self._terminal(r"/[A-Za-z_][A-Za-z0-9_]*:/")
            value = self.value(extra, f"{where}.additionalProperties")
            return self._rule("obj", f'"{{" ({key} {value} ("," {key} {value})*)? "}}"')
        # Only the declared properties are written (a subset of what the schema allows), in the template's order.
        # first: the members from i on, at least one written; after: the same, each after a comma. The tail after
        # member i may be empty only when none of it is required.
        names = sorted(members)
        first = after = None
        tail_required = False
        for name in reversed(names):
            member = f"{self.key(name)} {self.value(members[name], f'{where}.properties.{name}')}"
            rest = "" if after is None else f" {after}" + ("" if tail_required else "?")
            if name in required:
                first, after = self._rule("m", member + rest), self._rule("m", f'"," {member}{rest}')
                tail_required = True
            else:
                first = self._rule("m", member + rest + (f" | {first}" if first else ""))
                after = self._rule("m", f'"," {member}{rest}' + (f" | {after}" if after else ""))
        return self._rule("obj", f'"{{" {first}{"" if tail_required else "?"} "}}"')

    def _array_rule(self, schema: Mapping[str, Any], where: str) -> str:
        items = schema.get("items", True)
        if isinstance(items, list):
            raise ToolSchemaError(f"{where}.items as a list (tuple form) is not supported in tool parameters")
        item = self.value(items, f"{where}.items")
        low, high = int(schema.get("minItems", 0)), schema.get("maxItems")
        if high is not None and int(high) < low:
            raise ToolSchemaError(f"{where}: maxItems {high} < minItems {low}")
        if high == 0:
            return self._rule("arr", '"[]"')
        more = f'("," {item}){{{max(low - 1, 0)},{"" if high is None else int(high) - 1}}}'
        body = f"{item} {more}"
        return self._rule("arr", f'"[" {body} "]"' if low else f'"[" ({body})? "]"')


def _function(tool: Any, i: int) -> tuple[str, Any]:
    """(name, parameters) of an OpenAI `tools` entry."""
    function = tool.get("function") if isinstance(tool, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ToolSchemaError(f"tools.{i}: expected {{'type': 'function', 'function': {{'name': ..., ...}}}}")
    return function["name"], function.get("parameters")


def tool_call_grammar(
    tools: Sequence[Mapping[str, Any]],
    name: str | None = None,
    parallel: bool = True,
    marker: MarkerFn = text_marker,
    start: str = "start",
) -> str:
    """The Lark grammar of a model turn made of forced Gemma 4 tool calls.

    tools: OpenAI `tools` entries ({"type": "function", "function": {"name", "parameters"}}); name: a named
    tool_choice (exactly one call of it), or None for "required" (one call of any tool, or several when `parallel`);
    marker: how markers are written (`marker_for(tokenizer)`). The turn may end with `<|tool_response>` (where Gemma 4
    hands over to the tool) or the end of generation; `start` names the top rule (another name to embed it). Raises
    ToolSchemaError for a schema it cannot enforce.
    """
    if not tools:
        raise ToolSchemaError("forced tool calls need at least one tool")
    functions = []
    for i, tool in enumerate(tools):
        fname, params = _function(tool, i)
        if name is None or fname == name:
            functions.append((i, fname, params))
    if not functions:
        raise ToolSchemaError(f"tool_choice names {name!r}, which is not one of the tools")
    builder = _SchemaGrammar(marker, {})
    alts = []
    for i, fname, params in functions:
        where = f"tools.{i}.function.parameters"
        if params is None:
            args = '"{}"'
        else:
            if not isinstance(params, Mapping) or params.get("type", "object") != "object":
                raise ToolSchemaError(f"{where}: tool parameters must be an object schema")
            builder.root = params
            args = builder.value({**params, "type": "object"}, where)
        alts.append(f"{_lit('call:' + fname)} {args}")
    calls = "call+" if parallel and name is None else "call"
    head = [
        f"{start}: {calls} end?",
        f"call: {marker(TOOL_CALL_START)} ({' | '.join(alts)}) {marker(TOOL_CALL_END)}",
        f"end: {marker(TOOL_RESPONSE_START)}",
    ]
    return "\n".join(head + builder.rules) + "\n"
