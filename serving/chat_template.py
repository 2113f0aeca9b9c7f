"""Chat-template machinery of the tokenizer: loading a checkpoint's templates, compiling them, checking messages.

Mirrors transformers.utils.chat_template_utils so rendered prompts are byte-identical to the reference
implementation: the same sandboxed jinja2 environment (whitespace rules, `tojson`, `raise_exception`,
`strftime_now`, a `namespace()` that refuses underscore attributes, the `{% generation %}` tag), the same
precedence among chat_template.jinja / chat_template.json / tokenizer_config.json, and the same aliasing of a
message's reasoning field. `serving.tokenizer.Tokenizer` renders chats with what this file provides.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Names a message's reasoning is passed under; transformers 5 copies it under all of them (see `alias_reasoning`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


# ----------------------------------------------------------------------------------------------------------------------
# Template environment (mirrors transformers.utils.chat_template_utils)
# ----------------------------------------------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body unchanged.

    Some Hub templates mark assistant spans with this tag for training masks; without the extension they would not
    even parse, and serving never needs the mask.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes, as transformers does: they lead to CPython internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False):
    # Jinja's own tojson escapes HTML characters (<, >, &, ') and has no indent; HF templates rely on plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the sandboxed environment transformers uses (same whitespace rules and globals).

    Templates come from checkpoints, i.e. untrusted code: the immutable sandbox forbids attribute tricks and
    mutation of the inputs.
    """
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not compile: {e.message} (line {e.lineno})") from e


def alias_reasoning(message: dict) -> dict:
    # transformers 5 fills `reasoning_content` (and `thinking`) from whichever reasoning field the caller used.
    reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    """Check a chat: a non-empty list of dicts, each with a str `role` and a `content`.

    `content` is a string or a list of OpenAI-style parts (dicts with a str `type`; text parts carry a str `text`).
    It may be None only on an assistant message that carries `tool_calls`. Raises ValueError naming the index.
    """
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ValueError("messages is empty: a chat needs at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"message {i} has no 'role' (a non-empty string is required)")
        if "content" not in message:
            raise ValueError(f"message {i} (role {role!r}) has no 'content'")
        content = message["content"]
        if content is None:
            if not message.get("tool_calls"):
                raise ValueError(f"message {i} (role {role!r}) has content None and no tool_calls")
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
                    raise ValueError(f"message {i} content part {j} must be a dict with a string 'type'")
                if part["type"] == "text" and not isinstance(part.get("text"), str):
                    raise ValueError(f"message {i} content part {j} is a text part without a string 'text'")
        elif not isinstance(content, str):
            raise ValueError(f"message {i} content must be a string or a list of parts, got {type(content).__name__}")


# ----------------------------------------------------------------------------------------------------------------------
# Loading templates from a checkpoint directory
# ----------------------------------------------------------------------------------------------------------------------


def read_json(path: str, required: bool = False) -> dict | None:
    """Parse a JSON object file; None when absent (FileNotFoundError if `required`), ValueError naming it if bad."""
    if not os.path.isfile(path):
        if required:
            raise FileNotFoundError(f"{path} not found")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def load_chat_template(path: str, tokenizer_config: Mapping[str, Any]) -> str | dict[str, str] | None:
    """The checkpoint's chat template: one string, or named templates {"default": ..., "tool_use": ...}.

    Precedence as in transformers: chat_template.jinja, then chat_template.json, then tokenizer_config.json;
    `additional_chat_templates/<name>.jinja` adds named ones.
    """
    template: str | dict[str, str] | None = None
    jinja_file = os.path.join(path, "chat_template.jinja")
    json_file = os.path.join(path, "chat_template.json")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            template = f.read()
    elif os.path.isfile(json_file):
        template = read_json(json_file).get("chat_template")
        if template is None:
            raise ValueError(f"{json_file} has no 'chat_template' key")
    else:
        template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        # tokenizer_config.json stores several templates as [{"name": ..., "template": ...}, ...].
        template = {entry["name"]: entry["template"] for entry in template}
    extra_dir = os.path.join(path, "additional_chat_templates")
    if os.path.isdir(extra_dir):
        named = dict(template) if isinstance(template, dict) else ({"default": template} if template else {})
        for name in sorted(os.listdir(extra_dir)):
            if name.endswith(".jinja"):
                with open(os.path.join(extra_dir, name), encoding="utf-8") as f:
                    named[name[: -len(".jinja")]] = f.read()
        template = named or None
    if template is not None and not isinstance(template, str | dict):
        raise ValueError(f"chat template in {path} must be a string, got {type(template).__name__}")
    return template
