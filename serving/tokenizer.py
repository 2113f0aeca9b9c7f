"""Tokenizer, chat template and streaming detokenizer of the serving engine.

Three pieces sit between the HTTP layer and the token-level engine:

- `Tokenizer` wraps a Hugging Face `tokenizers.Tokenizer` (the Rust library, never `transformers`, so serving runs
  without torch) loaded from a checkpoint directory. It owns the Gemma BOS rule (exactly one `<bos>` at the start of
  every prompt), the stop token ids, and the chat template, rendered with jinja2 the way transformers renders it so
  prompts are byte-identical to the reference implementation.
- `IncrementalDetokenizer` turns one request's generated ids into text deltas for streaming, decoding only a small
  window of recent tokens per step and never emitting half of a multi-byte UTF-8 character.
- `StopChecker` applies OpenAI-style stop strings to the streamed text: the output ends *before* the stop string,
  and a suffix that might still become a stop string is held back until it is decided.

`byte_level_tokenizer()` builds, in code, the tokenizer of the tiny demo model (vocab 512, raw UTF-8 bytes), and
`save_byte_level_tokenizer()` writes it as checkpoint files so tests and demos need no downloaded tokenizer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import cached_property
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, processors
from tokenizers import Tokenizer as BackendTokenizer

REPLACEMENT_CHAR = "\ufffd"

# The named special tokens transformers exposes to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Names a message's reasoning is passed under; transformers 5 copies it under all of them (see `_alias_reasoning`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


# ----------------------------------------------------------------------------------------------------------------------
# Chat template rendering (mirrors transformers.utils.chat_template_utils)
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


def _alias_reasoning(message: dict) -> dict:
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
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------------


def _read_json(path: str, required: bool = False) -> dict | None:
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


def _token_content(value: Any) -> str | None:
    # Special tokens are saved either as plain strings or as serialized AddedTokens ({"content": ..., ...}).
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _id_list(value: Any, where: str) -> list[int]:
    # `eos_token_id` in config/generation_config is an int, a list of ints, or null.
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return list(value)
    raise ValueError(f"{where}: a token id must be an int or a list of ints, got {value!r}")


def _load_chat_template(path: str, tokenizer_config: Mapping[str, Any]) -> str | dict[str, str] | None:
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
        template = _read_json(json_file).get("chat_template")
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


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what serving needs around it: special ids, stop ids, the BOS rule, the chat
    template. Build one with `Tokenizer.from_dir(checkpoint_dir)` or `byte_level_tokenizer()`.

    Args:
        backend: the Rust tokenizer; its post-processor (tokenizer.json's) is used as is, as transformers 5 does.
        bos_token, eos_token, pad_token, unk_token: special token strings; each must be in the vocabulary if given.
        add_bos_token: whether `encode(..., add_special_tokens=True)` and `encode_chat` guarantee exactly one BOS in
            front (adding it when the post-processor does not, collapsing a doubled one). None means "yes when there
            is a BOS token": Gemma is BOS-sensitive. False leaves the ids as the backend makes them (transformers
            5.23 likewise keeps a BOS-adding post-processor whatever `add_bos_token` says).
        chat_template: a jinja template, named templates {"default": ..., "tool_use": ...}, or None.
        stop_token_ids: ids that end generation besides `eos_token` (e.g. generation_config's `eos_token_id` list).
        template_tokens: extra special token strings exposed to the chat template by name (e.g. {"boi_token": ...}).
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos_token: bool | None = None,
        chat_template: str | Mapping[str, str] | None = None,
        stop_token_ids: Iterable[int] = (),
        template_tokens: Mapping[str, str] | None = None,
    ) -> None:
        self.backend = backend
        self._tokens = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token, "unk_token": unk_token}
        self._ids: dict[str, int | None] = {}
        for name, token in self._tokens.items():
            token_id = None if token is None else backend.token_to_id(token)
            if token is not None and token_id is None:
                raise ValueError(f"{name} {token!r} is not in the tokenizer's vocabulary")
            self._ids[name] = token_id
        self.add_bos_token = self._ids["bos_token"] is not None if add_bos_token is None else bool(add_bos_token)
        if self.add_bos_token and self._ids["bos_token"] is None:
            raise ValueError("add_bos_token is set but the tokenizer has no bos_token")
        self.chat_template = dict(chat_template) if isinstance(chat_template, Mapping) else chat_template
        self._compiled_templates: dict[str, jinja2.Template] = {}
        self._extra_stop_ids = frozenset(int(i) for i in stop_token_ids)
        # What templates see as `bos_token`, `eos_token`, ...: transformers passes its special_tokens_map.
        self.template_tokens = {name: token for name, token in self._tokens.items() if token is not None}
        self.template_tokens.update(template_tokens or {})

    # -- loading ---------------------------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load from a checkpoint directory.

        Reads tokenizer.json (required), tokenizer_config.json, special_tokens_map.json, chat_template.jinja /
        chat_template.json, generation_config.json (stop ids: `eos_token_id`, int or list) and config.json
        (fallback for bos/eos/pad ids, also from its `text_config`). All but tokenizer.json are optional.

        Raises:
            FileNotFoundError: no directory or no tokenizer.json in it.
            ValueError: a file is corrupt or inconsistent (the message names the file).
        """
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer directory {path} not found")
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"{tokenizer_file} not found: the checkpoint has no (fast) tokenizer")
        try:
            backend = BackendTokenizer.from_file(tokenizer_file)
        except Exception as e:  # the Rust side raises a bare Exception with the serde message
            raise ValueError(f"{tokenizer_file} is not a valid tokenizer.json: {e}") from e

        config = _read_json(os.path.join(path, "tokenizer_config.json")) or {}
        special_map = _read_json(os.path.join(path, "special_tokens_map.json")) or {}
        generation_config = _read_json(os.path.join(path, "generation_config.json"))
        model_config = _read_json(os.path.join(path, "config.json")) or {}
        text_config = model_config.get("text_config") if isinstance(model_config.get("text_config"), dict) else {}

        def model_config_ids(key: str) -> list[int]:
            # Multimodal Gemma 4 configs keep the token ids in `text_config`.
            value = model_config.get(key)
            return _id_list(text_config.get(key) if value is None else value, f"config.json in {path} ({key})")

        # Tokens declared in tokenizer_config but missing from tokenizer.json would otherwise encode as plain text.
        for index, entry in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
            content = _token_content(entry)
            if content is None or backend.token_to_id(content) is not None:
                continue
            options = {k: entry[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in entry}
            token = AddedToken(content, special=bool(entry.get("special", False)), **options)
            if token.special:
                backend.add_special_tokens([token])
            else:
                backend.add_tokens([token])
            if backend.token_to_id(content) != int(index):
                raise ValueError(
                    f"tokenizer_config.json in {path} declares {content!r} as id {index}, but tokenizer.json "
                    f"would give it id {backend.token_to_id(content)}"
                )

        def token_for(name: str) -> str | None:
            token = _token_content(config.get(name))
            if token is None:
                token = _token_content(special_map.get(name))
            if token is None:
                # Fall back to the model config's id, e.g. a checkpoint that ships only tokenizer.json.
                ids = model_config_ids(f"{name}_id")
                if not ids and generation_config:
                    ids = _id_list(generation_config.get(f"{name}_id"), f"generation_config.json in {path}")
                token = backend.id_to_token(ids[0]) if ids else None
            return token

        tokens = {name: token_for(name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
        template_tokens = {}
        for source in (special_map, config):  # tokenizer_config wins over special_tokens_map
            for name, value in source.items():
                if name.endswith("_token") and _token_content(value) is not None:
                    template_tokens[name] = _token_content(value)
            extra = source.get("extra_special_tokens")
            if isinstance(extra, Mapping):  # transformers 5: model-specific named tokens (image_token, ...)
                template_tokens.update({k: _token_content(v) for k, v in extra.items() if _token_content(v)})
        template_tokens.update({name: token for name, token in tokens.items() if token is not None})

        if generation_config is not None:
            stop_ids = _id_list(generation_config.get("eos_token_id"), f"generation_config.json in {path}")
        else:
            stop_ids = model_config_ids("eos_token_id")
        add_bos = config.get("add_bos_token")
        try:
            return cls(
                backend,
                **tokens,
                add_bos_token=None if add_bos is None else bool(add_bos),
                chat_template=_load_chat_template(path, config),
                stop_token_ids=stop_ids,
                template_tokens=template_tokens,
            )
        except ValueError as e:
            raise ValueError(f"tokenizer in {path}: {e}") from e

    # -- vocabulary ------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._ids["bos_token"]

    @property
    def eos_token_id(self) -> int | None:
        return self._ids["eos_token"]

    @property
    def pad_token_id(self) -> int | None:
        return self._ids["pad_token"]

    @property
    def unk_token_id(self) -> int | None:
        return self._ids["unk_token"]

    @property
    def bos_token(self) -> str | None:
        return self._tokens["bos_token"]

    @property
    def eos_token(self) -> str | None:
        return self._tokens["eos_token"]

    @property
    def pad_token(self) -> str | None:
        return self._tokens["pad_token"]

    @cached_property
    def stop_token_ids(self) -> frozenset[int]:
        """Ids that end generation: the EOS token plus generation_config's `eos_token_id` (Gemma 4: {1, 106})."""
        eos = {self.eos_token_id} if self.eos_token_id is not None else set()
        return frozenset(eos | self._extra_stop_ids)

    @cached_property
    def all_special_ids(self) -> list[int]:
        """Sorted ids of every special token: added tokens flagged special plus bos/eos/pad/unk."""
        ids = {i for i, token in self.backend.get_added_tokens_decoder().items() if token.special}
        ids.update(i for i in self._ids.values() if i is not None)
        return sorted(ids)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # -- encode / decode -------------------------------------------------------------------------------------------

    def _fix_bos(self, ids: list[int]) -> list[int]:
        # Gemma degrades badly on a doubled or missing BOS, so collapse a leading run of BOS ids (post-processor BOS
        # + a literal "<bos>" in the text) and add one when nothing did.
        bos = self.bos_token_id
        start = 0
        while start + 1 < len(ids) and ids[start] == bos and ids[start + 1] == bos:
            start += 1
        ids = ids[start:]
        if not ids or ids[0] != bos:
            ids = [bos, *ids]
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids [T]. With `add_special_tokens` (and `add_bos_token`) the ids start with exactly one BOS,
        whether it comes from the post-processor, from a literal "<bos>" at the start of `text`, or from here.
        Without, no BOS is added (a literal "<bos>" in the text still encodes as the BOS id, as one inside the text
        does in both cases: special-token strings in user text are not escaped)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token:
            ids = self._fix_bos(ids)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Ids [T] -> text. Incomplete UTF-8 at the end decodes to U+FFFD (see `IncrementalDetokenizer`)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # -- chat ------------------------------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def _template(self, tools: Any, name: str | None) -> jinja2.Template:
        if not self.chat_template:
            raise ValueError(
                "this tokenizer has no chat template (no chat_template.jinja, chat_template.json or 'chat_template' "
                "in tokenizer_config.json): pass a prompt instead of messages"
            )
        if isinstance(self.chat_template, dict):
            if name is not None:
                key = name
            elif tools is not None and "tool_use" in self.chat_template:
                key = "tool_use"
            else:
                key = "default"
            if key not in self.chat_template:
                raise ValueError(f"no chat template named {key!r}; have {sorted(self.chat_template)}")
            source = self.chat_template[key]
        else:
            if name is not None and name != "default":
                raise ValueError(f"no chat template named {name!r}; the tokenizer has a single template")
            key, source = "default", self.chat_template
        if key not in self._compiled_templates:
            self._compiled_templates[key] = compile_chat_template(source)
        return self._compiled_templates[key]

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        template_name: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a chat to the prompt string, as `transformers` `apply_chat_template(..., tokenize=False)` does.

        Args:
            messages: [{"role": str, "content": str | list of {"type": "text", "text": ...} parts, ...}, ...];
                passed to the template as given, minus keys whose value is None (as transformers does).
            add_generation_prompt: end with the header of a model turn (note: transformers defaults to False).
            tools: JSON schemas of callable tools (OpenAI `tools` entries), exposed as `tools`.
            template_name: pick one of several named templates; default "tool_use" with tools, else "default".
            **kwargs: extra template variables (e.g. `enable_thinking=True`); they override special tokens.

        Raises:
            ValueError: bad messages (index named), no chat template, or the template raised an error.
        """
        validate_messages(messages)
        if tools is not None:
            if isinstance(tools, Mapping) or not isinstance(tools, Sequence):
                raise ValueError("tools must be a list of JSON-schema dicts")
            for i, tool in enumerate(tools):
                if not isinstance(tool, Mapping):
                    raise ValueError(f"tool {i} must be a JSON-schema dict, got {type(tool).__name__}")
            tools = [dict(tool) for tool in tools]
        template = self._template(tools, template_name)
        chat = [_alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in messages]
        variables = {**self.template_tokens, **kwargs}
        variables.setdefault("documents", None)
        try:
            return template.render(messages=chat, tools=tools, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            # raise_exception() in templates signals a client error ("roles must alternate"), not a server fault.
            raise ValueError(f"chat template error: {e}") from e

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Render the chat (see `apply_chat_template`) and encode it without the post-processor, since the template
        writes `<bos>` itself; the result still starts with exactly one BOS (added if the template wrote none)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs)
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if self.add_bos_token:
            ids = self._fix_bos(ids)
        return ids


# ----------------------------------------------------------------------------------------------------------------------
# Streaming detokenization
# ----------------------------------------------------------------------------------------------------------------------


class IncrementalDetokenizer:
    """Turns one request's generated ids into streamable text deltas (the prefix/read offset scheme of vLLM and TGI).

    Each step decodes two short windows, ids[prefix_offset:read_offset] (already emitted, kept as context so
    decoders that treat the first token specially, e.g. SentencePiece's leading space, see it mid-text) and
    ids[prefix_offset:], and emits the difference. While the new text ends with U+FFFD the token may be the first
    bytes of a multi-byte character, so nothing is emitted until it completes. Cost per token is O(window), not
    O(sequence).

    For valid UTF-8 output, "".join(deltas) + flush() == tokenizer.decode(generated_ids) for decoders that do not
    strip the first token's leading space (Gemma's, byte-fallback BPE, byte-level); with such decoders the stream
    keeps that space, as vLLM does.

    Args:
        tokenizer: the request's `Tokenizer`.
        prompt_ids: the prompt [T]; only its last few ids are kept, as decoding context.
        skip_special_tokens: drop special tokens from the text, as in `Tokenizer.decode`.
    """

    # Prompt ids kept as context (vLLM uses 5 as well).
    CONTEXT_TOKENS = 5
    # A UTF-8 character spans at most 4 byte tokens; a window still ending in U+FFFD after this many held ids is a
    # real replacement character or invalid bytes, and is emitted rather than held (keeps the window bounded).
    MAX_HELD_TOKENS = 8
    # Consecutive tokens that add no text (skipped specials) grow the context; past this it is cut back.
    MAX_CONTEXT_TOKENS = 32

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = [int(i) for i in prompt_ids[-self.CONTEXT_TOKENS :]]
        # Do not start the context inside a multi-byte character: its stray continuation bytes would decode to
        # U+FFFD, and a byte-fallback decoder turns a whole byte run into U+FFFD when part of it is invalid.
        start = len(prompt_ids) - len(context)
        while (
            start > 0 and len(context) < self.CONTEXT_TOKENS + 4 and self._decode(context).startswith(REPLACEMENT_CHAR)
        ):
            start -= 1
            context.insert(0, int(prompt_ids[start]))
        self._ids: list[int] = context  # context + generated ids
        self._num_context = len(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._pieces: list[str] = []  # every delta emitted so far

    @property
    def text(self) -> str:
        """The text emitted so far (the concatenation of the deltas)."""
        return "".join(self._pieces)

    @property
    def token_ids(self) -> list[int]:
        """The generated ids added so far."""
        return self._ids[self._num_context :]

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.backend.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _step(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        held = len(self._ids) - self._read_offset
        if not final and new_text.endswith(REPLACEMENT_CHAR) and held < self.MAX_HELD_TOKENS:
            return ""
        delta = new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
        if delta:
            self._prefix_offset = self._read_offset
        elif self._read_offset - self._prefix_offset >= self.MAX_CONTEXT_TOKENS:
            self._prefix_offset = self._read_offset - self.CONTEXT_TOKENS
        self._read_offset = len(self._ids)
        if delta:
            self._pieces.append(delta)
        return delta

    def add(self, token_id: int) -> str:
        """Append one generated id; returns the text it completes (often "", e.g. mid-character)."""
        self._ids.append(int(token_id))
        return self._step(final=False)

    def extend(self, token_ids: Iterable[int]) -> str:
        """Append several ids (e.g. accepted speculative tokens); returns the concatenated delta."""
        return "".join(self.add(t) for t in token_ids)

    def flush(self) -> str:
        """At the end of the request: emit what is held back, U+FFFD included if the output ends mid-character."""
        if self._read_offset == len(self._ids):
            return ""
        return self._step(final=True)


# ----------------------------------------------------------------------------------------------------------------------
# Stop strings
# ----------------------------------------------------------------------------------------------------------------------


def find_stop(text: str, stop: Sequence[str], start: int = 0) -> tuple[int, str] | None:
    """Earliest occurrence, at index >= `start`, of any of the `stop` strings in `text`.

    Returns (index, stop string) or None. On a tie (same index) the longest stop string wins.
    """
    best: tuple[int, str] | None = None
    for s in stop:
        i = text.find(s, start)
        if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(s) > len(best[1]))):
            best = (i, s)
    return best


def partial_stop_length(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string (text to hold back)."""
    longest = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


class StopChecker:
    """Applies stop strings to one request's streamed text (OpenAI/vLLM semantics).

    Feed every detokenizer delta to `process`; it returns the text safe to send now. A suffix that could be the
    start of a stop string is held back until the next delta decides it. At the first delta that completes a stop
    string, `stopped` becomes True and `text` ends right before it (after it with `include_stop_str_in_output`); if
    several are complete then, the earliest-starting one wins. That `process` call returns the rest up to there;
    later calls return "" (the engine should end the request). When generation ends for another reason (EOS,
    length), `flush()` releases the held-back suffix.

    Cost per delta is O(len(delta) + total stop length): only the held-back suffix (shorter than the longest stop
    string) is searched again, and the output is kept as a list of pieces.

    Args:
        stop: the stop strings (non-empty; a single str is accepted).
        include_stop_str_in_output: keep the matched stop string in the output (vLLM's option).
    """

    def __init__(self, stop: Sequence[str] | str | None = (), include_stop_str_in_output: bool = False) -> None:
        stop = [stop] if isinstance(stop, str) else list(stop or ())
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self.stop = stop
        self.include_stop_str_in_output = include_stop_str_in_output
        self.stopped = False
        self.stop_reason: str | None = None  # the matched stop string
        self._pieces: list[str] = []  # text already returned
        self._held = ""  # text received, not yet returned: a proper prefix of some stop string

    @property
    def text(self) -> str:
        """All output text so far, held-back suffix included (truncated at the stop string once stopped)."""
        return "".join(self._pieces) + self._held

    @property
    def held_back(self) -> str:
        """Text received but not yet returned (a possible stop-string prefix)."""
        return self._held

    def process(self, delta: str) -> str:
        """Add a text delta; returns the text that can be streamed now (may be "")."""
        if self.stopped or not delta:
            return ""
        # A stop string that starts in already returned text would have left its beginning held back, so searching
        # held + delta finds every new match.
        buffer = self._held + delta
        match = find_stop(buffer, self.stop)
        if match is not None:
            index, stop_string = match
            out = buffer[: index + len(stop_string) if self.include_stop_str_in_output else index]
            self.stopped, self.stop_reason, self._held = True, stop_string, ""
        else:
            safe = len(buffer) - partial_stop_length(buffer, self.stop)
            out, self._held = buffer[:safe], buffer[safe:]
        if out:
            self._pieces.append(out)
        return out

    def flush(self) -> str:
        """Generation ended without a stop string: release the held-back suffix."""
        out, self._held = self._held, ""
        if out:
            self._pieces.append(out)
        return out


# ----------------------------------------------------------------------------------------------------------------------
# The embedded byte-level tokenizer of the demo model
# ----------------------------------------------------------------------------------------------------------------------

# Special ids of the demo tokenizer (Gemma's order for 0..3). Ids 7..15 and 272..511 are reserved "<unusedK>" specials.
BYTE_LEVEL_SPECIALS = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<unk>": 3,
    "<start_of_turn>": 4,
    "<end_of_turn>": 5,
    "<mask>": 6,
}
BYTE_LEVEL_FIRST_BYTE_ID = 16  # byte b is id 16 + b, token "<0xBB>" (SentencePiece byte-fallback naming)
BYTE_LEVEL_VOCAB_SIZE = 512

# Gemma-style: the system message is folded into the first user turn; "assistant" is spoken as "model".
BYTE_LEVEL_CHAT_TEMPLATE = """{%- macro render_content(content) -%}
{%- if content is string -%}
{{- content | trim -}}
{%- else -%}
{%- for part in content if part['type'] == 'text' -%}
{{- part['text'] | trim -}}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- if messages[0]['role'] == 'system' -%}
{%- set first_user_prefix = render_content(messages[0]['content']) + '\n\n' -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set first_user_prefix = '' -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{{- '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') -}}
{{- render_content(message['content']) -}}
{{- '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<start_of_turn>model\n' -}}
{%- endif -%}
"""


def _byte_level_backend() -> BackendTokenizer:
    names = {i: name for name, i in BYTE_LEVEL_SPECIALS.items()}
    unused = 0
    vocab: dict[str, int] = {}
    for i in range(BYTE_LEVEL_VOCAB_SIZE):
        if i in names:
            vocab[names[i]] = i
        elif BYTE_LEVEL_FIRST_BYTE_ID <= i < BYTE_LEVEL_FIRST_BYTE_ID + 256:
            vocab[f"<0x{i - BYTE_LEVEL_FIRST_BYTE_ID:02X}>"] = i
        else:
            vocab[f"<unused{unused}>"] = i
            unused += 1
    # BPE without merges and with byte_fallback: every character misses the vocabulary and falls back to its UTF-8
    # bytes, so any text round-trips exactly and multi-byte characters span several tokens.
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    specials = [tok for tok, i in sorted(vocab.items(), key=lambda kv: kv[1]) if not tok.startswith("<0x")]
    backend.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in specials])
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BYTE_LEVEL_SPECIALS["<bos>"])]
    )
    return backend


def byte_level_tokenizer() -> Tokenizer:
    """The demo model's tokenizer, built in code: vocab 512, UTF-8 bytes at ids 16..271.

    Ids: <pad> 0, <eos> 1, <bos> 2, <unk> 3, <start_of_turn> 4, <end_of_turn> 5, <mask> 6, reserved <unusedK> 7..15
    and 272..511 (all special), byte b at 16 + b. Stops on {1, 5}. Chat template: `BYTE_LEVEL_CHAT_TEMPLATE`.
    """
    return Tokenizer(
        _byte_level_backend(),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
        chat_template=BYTE_LEVEL_CHAT_TEMPLATE,
        stop_token_ids=[BYTE_LEVEL_SPECIALS["<eos>"], BYTE_LEVEL_SPECIALS["<end_of_turn>"]],
    )


def save_byte_level_tokenizer(path: str | os.PathLike, generation_config: bool = True) -> None:
    """Write the demo tokenizer into a checkpoint directory: tokenizer.json and tokenizer_config.json (with the chat
    template), plus generation_config.json (stop ids [1, 5]) unless `generation_config` is False or one exists."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    backend = _byte_level_backend()
    backend.save(os.path.join(path, "tokenizer.json"))
    added = backend.get_added_tokens_decoder()
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
        "added_tokens_decoder": {
            str(i): {
                "content": t.content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, t in sorted(added.items())
        },
        "chat_template": BYTE_LEVEL_CHAT_TEMPLATE,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    generation_file = os.path.join(path, "generation_config.json")
    if generation_config and not os.path.exists(generation_file):
        stop = [BYTE_LEVEL_SPECIALS["<eos>"], BYTE_LEVEL_SPECIALS["<end_of_turn>"]]
        with open(generation_file, "w", encoding="utf-8") as f:
            json.dump({"bos_token_id": 2, "eos_token_id": stop, "pad_token_id": 0}, f, indent=2)
