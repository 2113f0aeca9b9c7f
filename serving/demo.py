"""The embedded demo model: the `tiny` preset with random weights and a byte-level tokenizer built in code.

`gemma4-jax generate` with no `--model` runs it, so a fresh install runs end to end with no download (its output is
noise). `byte_level_tokenizer()` builds the demo tokenizer (vocab 512, raw UTF-8 bytes) and
`save_byte_level_tokenizer()` writes it as checkpoint files, so tests and demos need no downloaded tokenizer.
"""

from __future__ import annotations

import json
import os

from tokenizers import AddedToken, decoders, models, processors
from tokenizers import Tokenizer as BackendTokenizer

from gemma4_jax.model import Model, from_config
from gemma4_jax.serving.tokenizer import Tokenizer

# ----------------------------------------------------------------------------------------------------------------------
# The byte-level tokenizer of the demo model
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


def byte_level_backend(extra_specials: dict[str, int] | None = None) -> BackendTokenizer:
    """The demo vocabulary as a `tokenizers` backend; extra_specials: more named special tokens at reserved ids
    (tests give Gemma 4's markers ids of their own this way)."""
    names = {i: name for name, i in {**BYTE_LEVEL_SPECIALS, **(extra_specials or {})}.items()}
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
        byte_level_backend(),
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
    backend = byte_level_backend()
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


# ----------------------------------------------------------------------------------------------------------------------
# The demo model
# ----------------------------------------------------------------------------------------------------------------------


def demo_model() -> tuple[Model, Tokenizer]:
    """The embedded default: the `tiny` preset with random weights and the byte-level tokenizer."""
    return from_config("tiny", dtype="float32", seed=0), byte_level_tokenizer()
