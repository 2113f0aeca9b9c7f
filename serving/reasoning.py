"""Gemma 4 reasoning: the thought channel split out of the output, and grammars that start after it.

With thinking on (`chat_template_kwargs: {"enable_thinking": true}`: the template puts `<|think|>` at the top of the
system turn), a Gemma 4 model turn opens with its chain of thought in a channel,

    <|channel>thought
    ...reasoning...<channel|>the answer

and with thinking off the template itself writes an empty, closed channel (`<|channel>thought\\n<channel|>`) at the
end of the prompt, so the answer comes first. `<|channel>` and `<channel|>` are special tokens; `thought\\n` is the
channel's label, not reasoning (vLLM's `gemma4` reasoning parser and transformers' `parse_thinking_output` strip it
too). `ReasoningParser` splits a growing output into reasoning and content, streamed or at the end;
`thought_grammar` wraps a structured-output grammar so that an optional thought channel comes first and the
constraint binds the answer only (what vLLM does by starting the grammar once the reasoning has ended).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

THOUGHT_START = "<|channel>"
THOUGHT_END = "<channel|>"
THOUGHT_LABEL = "thought\n"
REASONING_PARSERS = ("gemma4",)  # vLLM's name for this parser
ANSWER_RULE = "gemma4_answer"  # the answer's rule (or subgrammar) inside a wrapped grammar


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (it may still become one)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def prompt_closes_thought(prompt_tail: str) -> bool:
    """Whether a rendered prompt (its last characters, special tokens kept) ends the model's thought itself: the
    thinking-off form of the template, after which no reasoning comes (vLLM's `is_reasoning_end` on the prompt)."""
    return prompt_tail.rstrip().endswith(THOUGHT_END)


class ReasoningParser:
    """Splits a growing Gemma 4 output into reasoning (inside `<|channel>...<channel|>`, label stripped) and content.

    Feed it the cumulative text (decoded with special tokens kept); each `feed` returns the new (reasoning, content).
    Text that may be the start of a marker or of the label is held back until known; a channel still open at the
    end (cut by max_tokens) is reasoning. `reasoning` is None until a channel was seen (the message field is then
    left out, as vLLM does).
    """

    def __init__(self):
        self._done = 0  # characters of the text consumed
        self._in_thought = False
        self._label_pending = False
        self.reasoning: str | None = None
        self.content = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        thought, content = [], []
        while True:
            rest = text[self._done :]
            if not self._in_thought:
                start = rest.find(THOUGHT_START)
                if start < 0:
                    keep = 0 if final else _partial_suffix(rest, THOUGHT_START)
                    content.append(rest[: len(rest) - keep])
                    self._done += len(rest) - keep
                    break
                content.append(rest[:start])
                self._done += start + len(THOUGHT_START)
                self._in_thought = self._label_pending = True
                self.reasoning = self.reasoning or ""
                continue
            if self._label_pending:
                if rest.startswith(THOUGHT_LABEL):
                    self._done += len(THOUGHT_LABEL)
                    rest = rest[len(THOUGHT_LABEL) :]
                elif THOUGHT_LABEL.startswith(rest) and not final:
                    break  # may still become the label
                self._label_pending = False
            end = rest.find(THOUGHT_END)
            if end < 0:
                keep = 0 if final else _partial_suffix(rest, THOUGHT_END)
                thought.append(rest[: len(rest) - keep])
                self._done += len(rest) - keep
                break
            thought.append(rest[:end])
            self._done += end + len(THOUGHT_END)
            self._in_thought = False
        reasoning_delta, content_delta = "".join(thought), "".join(content)
        if reasoning_delta:
            self.reasoning = (self.reasoning or "") + reasoning_delta
        self.content += content_delta
        return reasoning_delta, content_delta


def thought_grammar(answer: str, marker: Callable[[str], str], inline: bool = False) -> str:
    """Wrap a structured-output grammar so that an optional thought channel comes first: `start: thought? answer`.

    answer: Lark rules defining `ANSWER_RULE` (inline=True), or any llguidance grammar (Lark text, or the JSON of
    several grammars), then referenced as a named subgrammar; marker: writes the channel markers
    (structured.MarkerFn). Inside the channel anything but a special token goes (with text markers: anything up to
    the first `<channel|>`).
    """
    start, end = marker(THOUGHT_START), marker(THOUGHT_END)
    if end.startswith("<["):  # one special token: plain text cannot spell it, so the thought is any text
        thought = f"thought: {start} THOUGHT_TEXT {end}\nTHOUGHT_TEXT: /(?s:.*)/\n"
    else:
        thought = f"thought: {start} thought_text\nthought_text[lazy]: /(?s:.*){re.escape(THOUGHT_END)}/\n"
    if inline:
        return f"start: thought? {ANSWER_RULE}\n{thought}{answer}"
    grammars = json.loads(answer)["grammars"] if answer.lstrip().startswith("{") else [{"lark_grammar": answer}]
    first = {**grammars[0], "name": ANSWER_RULE}
    wrapper = f"start: thought? @{ANSWER_RULE}\n{thought}"
    return json.dumps({"grammars": [{"lark_grammar": wrapper}, first, *grammars[1:]]})
