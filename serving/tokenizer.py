"""The tokenizer of the serving engine: a Hugging Face `tokenizers.Tokenizer` plus what serving needs around it.

`Tokenizer` wraps the Rust library (never `transformers`, so serving runs without torch) loaded from a checkpoint
directory. It owns the Gemma BOS rule (exactly one `<bos>` at the start of every prompt), the special and stop token
ids, and the chat template, rendered with `serving.chat_template` the way transformers renders it so prompts are
byte-identical to the reference implementation.

Control-token text that a client writes inside chat messages (e.g. a turn marker typed into a user message) is
plain text when `encode_chat(..., split_special_tokens=True)` (what the server does): `hide_special_text` puts a
sentinel in place of each special-token string in the messages before the template runs, and `encode_chat_text`
encodes each sentinel as the token string spelled out in ordinary tokens. Only what the template itself writes
becomes a control token, so a message cannot open or close a turn (role injection). The offline `LLM.chat` keeps
the transformers behaviour (special-token strings anywhere in the rendered chat are control tokens), which callers
use to place media placeholders in the text.

Streaming text out of generated ids (`IncrementalDetokenizer`, stop strings) lives in `serving.detokenizer`; the
demo model's byte-level tokenizer, built in code, lives in `serving.demo`.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from typing import Any

import jinja2
from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

from gemma4_jax.serving.chat_template import (
    alias_reasoning,
    compile_chat_template,
    load_chat_template,
    read_json,
    validate_messages,
)

# What `Tokenizer.hide_special_text` puts in place of a special-token string in a message: private-use characters
# around a per-process random nonce and the token id in hex. A client cannot write one by accident, and one it forges
# only spells out a special token as plain text, which it could type anyway.
_SENTINEL_PREFIX = f"\ue000{secrets.token_hex(8)}"
_SENTINEL = re.compile(f"{_SENTINEL_PREFIX}([0-9a-f]+)\ue001")


class TooManyTokens(ValueError):
    """A text encodes to `num_tokens` (without a BOS the encoder may still add), over the caller's `limit`."""

    def __init__(self, num_tokens: int, limit: int):
        super().__init__(f"the text is {num_tokens} tokens, over the limit of {limit}")
        self.num_tokens = num_tokens
        self.limit = limit


# ----------------------------------------------------------------------------------------------------------------------
# Reading tokenizer files
# ----------------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------------


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what serving needs around it: special ids, stop ids, the BOS rule, the chat
    template. Build one with `Tokenizer.from_dir(checkpoint_dir)` or `serving.demo.byte_level_tokenizer()`.

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

        config = read_json(os.path.join(path, "tokenizer_config.json")) or {}
        special_map = read_json(os.path.join(path, "special_tokens_map.json")) or {}
        generation_config = read_json(os.path.join(path, "generation_config.json"))
        model_config = read_json(os.path.join(path, "config.json")) or {}
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
                chat_template=load_chat_template(path, config),
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

    def encode(self, text: str, add_special_tokens: bool = True, *, max_tokens: int | None = None) -> list[int]:
        """Text -> ids [T]. With `add_special_tokens` (and `add_bos_token`) the ids start with exactly one BOS,
        whether it comes from the post-processor, from a literal "<bos>" at the start of `text`, or from here.
        Without, no BOS is added (a literal "<bos>" in the text still encodes as the BOS id, as one inside the text
        does in both cases: special-token strings in user text are not escaped). With `max_tokens`, a text whose
        encoding is longer raises `TooManyTokens` before its ids are made into a Python list."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = self._encode_many([text], add_special_tokens, max_tokens=max_tokens)[0]
        if add_special_tokens and self.add_bos_token:
            ids = self._fix_bos(ids)
        return ids

    def _encode_many(
        self,
        texts: list[str],
        add_special_tokens: bool,
        backend: BackendTokenizer | None = None,
        max_tokens: int | None = None,
    ) -> list[list[int]]:
        # encode_batch, even for one text: the Rust library releases the GIL there (not in `encode`), so a long
        # prompt tokenized in a worker thread does not stall the server's event loop. Same ids as `encode`. Making
        # the ids a Python list holds the GIL (about 15 ms per million), hence the length check first.
        encodings = (backend or self.backend).encode_batch(texts, add_special_tokens=add_special_tokens)
        if max_tokens is not None:
            total = sum(len(encoding) for encoding in encodings)
            if total > max_tokens:
                raise TooManyTokens(total, max_tokens)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Ids [T] -> text. Incomplete UTF-8 at the end decodes to U+FFFD (streaming holds such endings back: see
        `serving.detokenizer.IncrementalDetokenizer`)."""
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
        chat = [alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in messages]
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
        *,
        split_special_tokens: bool = False,
        **kwargs: Any,
    ) -> list[int]:
        """Render the chat (see `apply_chat_template`) and encode it without the post-processor, since the template
        writes `<bos>` itself; the result still starts with exactly one BOS (added if the template wrote none).

        split_special_tokens: special-token strings inside the messages, tools and template variables are plain text
        (only the template's own markers are control tokens); off, they are control tokens, as in transformers."""
        if split_special_tokens:
            messages, tools, kwargs = self.hide_special_text((messages, tools, kwargs))
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs)
        return self.encode_chat_text(text)

    # -- control-token text in messages ----------------------------------------------------------------------------

    @cached_property
    def _special_text(self) -> tuple[re.Pattern | None, dict[str, int]]:
        """A pattern matching every special-token string (longest first), and each string's id."""
        ids = {self.id_to_token(i): i for i in self.all_special_ids}
        ids.pop(None, None)
        if not ids:
            return None, {}
        return re.compile("|".join(map(re.escape, sorted(ids, key=len, reverse=True)))), ids

    def hide_special_text(self, value: Any) -> Any:
        """`value` (messages, tools, template variables: nested dicts, lists and tuples) with every special-token
        string inside its strings replaced by a sentinel that `encode_chat_text` encodes as plain text. Keys and
        non-string values are kept."""
        pattern, ids = self._special_text
        if pattern is None:
            return value
        prefix = _SENTINEL_PREFIX

        def hide(item: Any) -> Any:
            if isinstance(item, str):
                return pattern.sub(lambda m: f"{prefix}{ids[m.group()]:x}\ue001", item)
            if isinstance(item, Mapping):
                return {k: hide(v) for k, v in item.items()}
            if isinstance(item, list | tuple):
                return type(item)(hide(v) for v in item)
            return item

        return hide(value)

    @cached_property
    def _plain_backend(self) -> BackendTokenizer:
        # A copy that reads special-token strings as ordinary text (HF's split_special_tokens).
        backend = BackendTokenizer.from_str(self.backend.to_str())
        backend.encode_special_tokens = True
        return backend

    def encode_chat_text(self, text: str, *, max_tokens: int | None = None) -> list[int]:
        """A rendered chat -> ids [T]: encoded without the post-processor (the template writes `<bos>`), starting
        with exactly one BOS; the sentinels of `hide_special_text` become their token string as plain text.
        `max_tokens` as in `encode`."""
        pieces = _SENTINEL.split(text)
        ids = []
        if len(pieces) == 1:
            ids = self._encode_many([text], add_special_tokens=False, max_tokens=max_tokens)[0]
        else:
            # pieces alternate: text around the sentinels, then the hidden token ids (hex)
            literals = {int(h, 16) for h in pieces[1::2]}
            spelled = dict(
                zip(
                    literals,
                    self._encode_many([self.id_to_token(i) or "" for i in literals], False, self._plain_backend),
                    strict=True,
                )
            )
            segments = self._encode_many(pieces[0::2], add_special_tokens=False, max_tokens=max_tokens)
            for i, segment in enumerate(segments):
                ids += segment
                if 2 * i + 1 < len(pieces):
                    ids += spelled[int(pieces[2 * i + 1], 16)]
        if self.add_bos_token:
            ids = self._fix_bos(ids)
        return ids
