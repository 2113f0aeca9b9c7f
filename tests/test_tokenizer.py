"""Tests of serving/tokenizer.py, chat_template.py, detokenizer.py and the demo tokenizer of serving/demo.py: parity
with transformers (encode, decode, chat template), the one-BOS rule, the incremental detokenizer on random Unicode,
stop strings, and the error messages of checkpoint loading."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer

from gemma4_jax.serving.demo import BYTE_LEVEL_SPECIALS, byte_level_tokenizer, save_byte_level_tokenizer
from gemma4_jax.serving.detokenizer import (
    REPLACEMENT_CHAR,
    IncrementalDetokenizer,
    StopChecker,
    find_stop,
    partial_stop_length,
)
from gemma4_jax.serving.tokenizer import Tokenizer

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
FIRST_BYTE_ID = len(SPECIALS)  # byte-fallback tokens <0x00>..<0xFF> follow the specials

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Gemma is a family of lightweight open models.",
    "Streaming detokenization must never split a character in two.",
    "Stop strings end the output before they appear.",
    "Les élèves étudient la tokenisation à l'école.",
    "Hello world, hello model, hello user!",
]

# A Gemma-3-like template: system folded into the first user turn, strict alternation, assistant -> model, tools
# rendered with tojson (indent, non-ASCII), loop controls and a namespace.
GEMMA_LIKE_TEMPLATE = """{{ bos_token }}
{%- if tools %}
{{- '<start_of_turn>system\nTools:\n' + (tools | tojson(indent=2)) + '<end_of_turn>\n' -}}
{%- endif %}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- set ns = namespace(turns=0) -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {%- set ns.turns = ns.turns + 1 -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- else -%}
                {%- continue -%}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
    {%- if enable_thinking is defined and enable_thinking %}{{ '<think>' }}{% endif -%}
{%- endif -%}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "  4  "},
        {"role": "user", "content": "Und auf Deutsch? 中文呢？ 👍🏽"},
    ],
    [
        {"role": "system", "content": [{"type": "text", "text": "Answer in French."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe <this>."}]},
    ],
    [
        {"role": "user", "content": [{"type": "text", "text": "part one "}, {"type": "text", "text": " part two"}]},
        {"role": "assistant", "content": "ok", "tool_calls": None},
        {"role": "user", "content": "\n\ttrailing whitespace\n"},
    ],
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Météo <actuelle> & prévisions",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures: checkpoint directories
# ----------------------------------------------------------------------------------------------------------------------


def build_bpe_backend(post_processor: bool = True) -> BackendTokenizer:
    """A small BPE with byte fallback and Gemma's pipeline, trained on SENTENCES; ids: SPECIALS, 256 bytes, merges."""
    trained = BackendTokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizers.Replace(" ", "▁")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[], show_progress=False)
    trained.train_from_iterator(SENTENCES, trainer=trainer)
    learned = json.loads(trained.to_str())["model"]
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    vocab.update({f"<0x{b:02X}>": FIRST_BYTE_ID + b for b in range(256)})
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    backend = BackendTokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    # The pipeline transformers' GemmaTokenizer imposes (normalizer first, so the Split sees no spaces).
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    if post_processor:
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)]
        )
    return backend


def write_checkpoint(path, backend: BackendTokenizer, chat_template: str | None = GEMMA_LIKE_TEMPLATE, **config):
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    tokenizer_config.update(config)
    tokenizer_config = {k: v for k, v in tokenizer_config.items() if v is not None}
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, ensure_ascii=False))
    return path


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("bpe"), build_bpe_backend())


@pytest.fixture(scope="module")
def byte_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("byte")
    save_byte_level_tokenizer(path)
    return path


@pytest.fixture(scope="module", params=["bpe", "byte"])
def pair(request, bpe_dir, byte_dir):
    """(ours, transformers reference) loaded from the same checkpoint directory."""
    transformers = pytest.importorskip("transformers")
    path = bpe_dir if request.param == "bpe" else byte_dir
    return Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(str(path))


def random_text(rng: random.Random, length: int) -> str:
    pools = [
        "abcdefghijklmnopqrstuvwxyz ABCXYZ.,!?'\n\t",
        "éèàçüößñ",
        "".join(chr(c) for c in range(0x4E00, 0x4E40)),  # CJK: 3 bytes
        "".join(chr(c) for c in range(0x1F600, 0x1F640)),  # emoji: 4 bytes
        "\u0301\u0308\u0327\u200d\ufe0f",  # combining marks, ZWJ, variation selector
        "👩‍👩‍👧🏽",
    ]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(length))


# ----------------------------------------------------------------------------------------------------------------------
# Parity with transformers
# ----------------------------------------------------------------------------------------------------------------------

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "Les élèves étudient à l'école: 中文, emoji 👍🏽 and e\u0301.",
    "<start_of_turn>user\nhi<end_of_turn>\n",
    "",
    "line\nbreaks\tand\ttabs",
]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(pair, text):
    ours, ref = pair
    ids = ours.encode(text)
    assert ids == ref(text)["input_ids"]
    assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
    assert ours.vocab_size == len(ref)
    assert set(ref.all_special_ids) <= set(ours.all_special_ids)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (2, 1, 0)


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(pair, conversation, add_generation_prompt):
    ours, ref = pair
    messages = CONVERSATIONS[conversation]
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = ours.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    ref_ids = ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, return_dict=False)
    assert ids == list(ref_ids)
    assert ids.count(ours.bos_token_id) == 1 and ids[0] == ours.bos_token_id


def test_chat_template_tools_and_kwargs_match_transformers(bpe_dir):
    transformers = pytest.importorskip("transformers")
    ours, ref = Tokenizer.from_dir(bpe_dir), transformers.AutoTokenizer.from_pretrained(str(bpe_dir))
    messages = CONVERSATIONS[1]
    text = ours.apply_chat_template(messages, tools=TOOLS, enable_thinking=True)
    assert text == ref.apply_chat_template(
        messages, tools=TOOLS, tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert "Météo <actuelle> & prévisions" in text and '\n  {\n    "type": "function"' in text
    assert text.endswith("<start_of_turn>model\n<think>")


def test_byte_level_template_and_ids():
    tok = byte_level_tokenizer()
    assert tok.vocab_size == 512
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.token_to_id("<start_of_turn>") == BYTE_LEVEL_SPECIALS["<start_of_turn>"] == 4
    assert tok.token_to_id("<end_of_turn>") == BYTE_LEVEL_SPECIALS["<end_of_turn>"] == 5
    assert tok.stop_token_ids == {1, 5}
    assert tok.token_to_id("<0x00>") == 16 and tok.token_to_id("<0xFF>") == 271
    assert tok.id_to_token(511) is not None and 511 in tok.all_special_ids
    text = "Grüße, 世界! 🧑‍🚀 <0x41>\x00"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == [16 + b for b in text.encode("utf-8")]
    assert tok.decode(ids) == text
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    assert tok.apply_chat_template(messages) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    )
    ids = tok.encode_chat(messages)
    assert ids[:2] == [2, 4] and ids.count(2) == 1 and ids[-7:] == [4, *tok.encode("model\n", add_special_tokens=False)]


def test_from_dir_round_trips_byte_level(byte_dir):
    tok = Tokenizer.from_dir(byte_dir)
    assert tok.stop_token_ids == {1, 5} and tok.vocab_size == 512
    assert tok.apply_chat_template(CONVERSATIONS[1]) == byte_level_tokenizer().apply_chat_template(CONVERSATIONS[1])


# ----------------------------------------------------------------------------------------------------------------------
# Exactly one BOS
# ----------------------------------------------------------------------------------------------------------------------


def _assert_one_bos(ids, bos=2):
    assert ids[0] == bos and ids.count(bos) == 1, ids


@pytest.mark.parametrize("post_processor", [True, False])
@pytest.mark.parametrize("add_bos_token", [True, None])
def test_exactly_one_bos(tmp_path, post_processor, add_bos_token):
    # Cover BOS from the post-processor, from add_bos_token, and from neither (we add it: Gemma needs it).
    path = write_checkpoint(tmp_path, build_bpe_backend(post_processor), add_bos_token=add_bos_token)
    tok = Tokenizer.from_dir(path)
    for text in ["Hello world", "<bos>Hello world", "<bos><bos>Hello", "<bos>", ""]:
        _assert_one_bos(tok.encode(text))
    assert 2 not in tok.encode("Hello world", add_special_tokens=False)
    _assert_one_bos(tok.encode_chat(CONVERSATIONS[1]))
    # A template without {{ bos_token }}: encode_chat still starts with one BOS.
    tok.chat_template = GEMMA_LIKE_TEMPLATE.replace("{{ bos_token }}", "")
    tok._compiled_templates.clear()
    _assert_one_bos(tok.encode_chat(CONVERSATIONS[0]))


@pytest.mark.parametrize("post_processor", [True, False])
def test_add_bos_token_false_leaves_backend_ids(tmp_path, post_processor):
    # Explicit add_bos_token=False: the ids are the post-processor's, as in transformers 5.23 (which keeps a
    # BOS-adding post-processor even then).
    transformers = pytest.importorskip("transformers")
    path = write_checkpoint(tmp_path, build_bpe_backend(post_processor), add_bos_token=False)
    tok = Tokenizer.from_dir(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(path))
    assert tok.encode("Hello world") == ref("Hello world")["input_ids"]
    assert (tok.encode("Hello world")[0] == 2) == post_processor


# ----------------------------------------------------------------------------------------------------------------------
# Incremental detokenizer
# ----------------------------------------------------------------------------------------------------------------------


class _SpyTokenizer(Tokenizer):
    """Records the longest id list passed to the backend's decode, to check the per-token window stays bounded."""

    def __init__(self, inner: Tokenizer):
        self.__dict__.update(inner.__dict__)
        self.max_decode_len = 0
        outer = self

        class Backend:
            def decode(self, ids, skip_special_tokens=True):
                outer.max_decode_len = max(outer.max_decode_len, len(ids))
                return inner.backend.decode(ids, skip_special_tokens=skip_special_tokens)

        self.backend = Backend()


def _stream(tok, prompt_ids, ids, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip_special_tokens)
    deltas = [detok.add(t) for t in ids]
    deltas.append(detok.flush())
    return deltas, detok


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_incremental_detokenizer_random_unicode(kind, bpe_dir):
    tok = byte_level_tokenizer() if kind == "byte" else Tokenizer.from_dir(bpe_dir)
    rng = random.Random(1234)
    multi_token_chars = 0
    for _ in range(60):
        text = random_text(rng, rng.randint(1, 40))
        prompt = tok.encode(random_text(rng, rng.randint(0, 12)))
        ids = tok.encode(text, add_special_tokens=False)
        multi_token_chars += len(ids) > len(text)
        deltas, detok = _stream(tok, prompt, ids)
        assert not any(REPLACEMENT_CHAR in d for d in deltas), (text, deltas)
        assert "".join(deltas) == tok.decode(ids) == detok.text
        assert detok.token_ids == ids
        other = IncrementalDetokenizer(tok, prompt)
        assert other.extend(ids) + other.flush() == detok.text
        if kind == "byte":
            assert "".join(deltas) == text
    assert multi_token_chars > 30  # the strings did split characters over several tokens


def test_incremental_detokenizer_specials_and_bounded_window():
    tok = byte_level_tokenizer()
    spy = _SpyTokenizer(tok)
    text = "日本語とEnglishと絵文字🎉 " * 200
    ids = tok.encode(text, add_special_tokens=False) + [5, 1]  # end_of_turn, eos
    prompt = tok.encode_chat([{"role": "user", "content": "写一首诗"}])
    deltas, _ = _stream(spy, prompt, ids)
    assert "".join(deltas) == text and spy.max_decode_len <= 20
    # With skip_special_tokens=False the specials appear, exactly as in decode.
    deltas, _ = _stream(tok, prompt, ids, skip_special_tokens=False)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=False) == text + "<end_of_turn><eos>"
    # A long run of tokens that add no text must not grow the window either.
    spy.max_decode_len = 0
    deltas, _ = _stream(spy, prompt, [5] * 300 + tok.encode("done ✓", add_special_tokens=False))
    assert "".join(deltas) == "done ✓" and spy.max_decode_len <= 40


def test_incremental_detokenizer_holds_partial_character_and_flushes():
    tok = byte_level_tokenizer()
    ids = tok.encode("a😀", add_special_tokens=False)  # 1 + 4 byte tokens
    detok = IncrementalDetokenizer(tok, tok.encode("x"))
    assert [detok.add(t) for t in ids] == ["a", "", "", "", "😀"]
    # Output that ends mid-character: held back, then flushed as U+FFFD like decode() does.
    detok = IncrementalDetokenizer(tok, [])
    assert detok.add(ids[1]) == "" and detok.add(ids[2]) == ""
    assert detok.flush() == tok.decode(ids[1:3]) == REPLACEMENT_CHAR * 2
    assert detok.flush() == ""


def test_incremental_detokenizer_prompt_ending_mid_character():
    # The context window must not start inside a multi-byte character of the prompt.
    tok = byte_level_tokenizer()
    prompt = tok.encode("🙂🙂")  # 4-byte chars: the last 5 ids start inside the first one
    ids = tok.encode("中文ok", add_special_tokens=False)
    deltas, _ = _stream(tok, prompt, ids)
    assert "".join(deltas) == "中文ok" and not any(REPLACEMENT_CHAR in d for d in deltas)


# ----------------------------------------------------------------------------------------------------------------------
# Stop strings
# ----------------------------------------------------------------------------------------------------------------------


def _feed(checker: StopChecker, deltas):
    out = [checker.process(d) for d in deltas]
    if not checker.stopped:
        out.append(checker.flush())
    return out


def test_stop_string_split_across_deltas():
    checker = StopChecker(["###"])
    out = _feed(checker, ["Hello #", "#", "# world"])
    assert out == ["Hello ", "", ""]
    assert checker.stopped and checker.stop_reason == "###" and checker.text == "Hello "


def test_stop_string_at_start():
    checker = StopChecker(["STOP"])
    assert checker.process("STOP and more") == ""
    assert checker.stopped and checker.text == ""
    assert checker.process("ignored") == ""


def test_earliest_stop_string_wins():
    checker = StopChecker(["world", "lo w", "o"])
    out = _feed(checker, ["Hel", "lo world"])
    assert "".join(out) == "Hel" and checker.stop_reason == "lo w"
    checker = StopChecker(["bb", "abc"])
    assert "".join(_feed(checker, ["xa", "bc bb"])) == "x" and checker.stop_reason == "abc"
    assert find_stop("xx ab ab", ["ab", "x ab"]) == (1, "x ab")


def test_held_back_text_is_released():
    checker = StopChecker(["</answer>"])
    assert checker.process("value </ans") == "value "
    assert checker.held_back == "</ans"
    assert checker.process("wer-not") == "</answer-not"
    assert checker.process(" end <") == " end "
    assert checker.flush() == "<" and not checker.stopped
    assert checker.text == "value </answer-not end <"


def test_stop_checker_include_stop_and_no_stops():
    checker = StopChecker(["END"], include_stop_str_in_output=True)
    assert "".join(_feed(checker, ["abc E", "ND tail"])) == "abc END"
    assert checker.text == "abc END"
    assert "".join(_feed(StopChecker([]), ["a", "b"])) == "ab"
    assert partial_stop_length("abc</", ["</x>", "c</y"]) == 3
    with pytest.raises(ValueError, match="non-empty"):
        StopChecker([""])


def _reference_stop(deltas, stop):
    # Generation stops at the first delta after which some stop string is complete; the output is cut before the
    # earliest-starting complete one (a longer stop string that would have started earlier never gets to finish).
    text = ""
    for delta in deltas:
        text += delta
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            return text[: min(hits)], True
    return text, False


def test_stop_checker_random_against_reference():
    # Property check on random splits: the output matches the reference, every prefix streamed is a prefix of it,
    # and less than one stop string's length is ever held back.
    rng = random.Random(7)
    for _ in range(400):
        text = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 30)))
        stop = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 8)))) if len(text) > 1 else []
        deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        expected, stops = _reference_stop(deltas, stop)
        checker, streamed = StopChecker(stop), ""
        for delta in deltas:
            streamed += checker.process(delta)
            assert expected.startswith(streamed), (text, stop, deltas)
            assert len(checker.held_back) < max(map(len, stop))
        streamed += "" if checker.stopped else checker.flush()
        assert streamed == expected == checker.text and checker.stopped == stops, (text, stop, deltas)


def test_stop_checker_on_streamed_tokens():
    # End to end with the detokenizer: the stop string spans several byte tokens.
    tok = byte_level_tokenizer()
    ids = tok.encode("Answer: 42 ⏹ trailing", add_special_tokens=False)
    detok, checker = IncrementalDetokenizer(tok, []), StopChecker(["⏹"])
    out = []
    for t in ids:
        out.append(checker.process(detok.add(t)))
        if checker.stopped:
            break
    assert "".join(out) == "Answer: 42 " and checker.stopped


# ----------------------------------------------------------------------------------------------------------------------
# Loading and errors
# ----------------------------------------------------------------------------------------------------------------------


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match="tokenizer.json is not a valid"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_config(tmp_path):
    save_byte_level_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_dir(tmp_path)


def test_no_chat_template(tmp_path):
    path = write_checkpoint(tmp_path, build_bpe_backend(), chat_template=None)
    tok = Tokenizer.from_dir(path)
    assert not tok.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "user", "content": "hi"}, {"content": "no role"}], "message 1 has no 'role'"),
        ([{"role": "user"}], "message 0 .* has no 'content'"),
        ([{"role": "user", "content": [{"text": "x"}]}], "message 0 content part 0"),
        ([{"role": "user", "content": 3}], "message 0 content must be"),
        (["hi"], "message 0 must be a dict"),
        ([], "empty"),
    ],
)
def test_bad_messages(messages, match):
    with pytest.raises(ValueError, match=match):
        byte_level_tokenizer().apply_chat_template(messages)


def test_template_exception_is_value_error(bpe_dir):
    tok = Tokenizer.from_dir(bpe_dir)
    with pytest.raises(ValueError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "first"}])


def test_chat_template_file_precedence_and_stop_ids(tmp_path):
    write_checkpoint(tmp_path, build_bpe_backend(), chat_template="from config")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "from config"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from json {{ bos_token }}"}))
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "from json <bos>"
    (tmp_path / "chat_template.jinja").write_text("from jinja {{ messages[0].content }}")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "from jinja x"
    # Stop ids: generation_config eos (int or list) plus the tokenizer's EOS.
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 6}))
    assert Tokenizer.from_dir(tmp_path).stop_token_ids == {1, 6}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 5, 6]}))
    assert Tokenizer.from_dir(tmp_path).stop_token_ids == {1, 5, 6}


def test_config_json_fallback_ids(tmp_path):
    # A checkpoint with only tokenizer.json: special tokens come from config.json (text_config, as in Gemma 4).
    build_bpe_backend().save(str(tmp_path / "tokenizer.json"))
    text_config = {"bos_token_id": 2, "eos_token_id": [1, 6], "pad_token_id": 0}
    (tmp_path / "config.json").write_text(json.dumps({"text_config": text_config}))
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 1, 0)
    assert tok.stop_token_ids == {1, 6}
    _assert_one_bos(tok.encode("<bos>hi"))
