"""Streaming text out of generated ids: the incremental detokenizer and OpenAI-style stop strings.

- `IncrementalDetokenizer` turns one request's generated ids into text deltas for streaming, decoding only a small
  window of recent tokens per step and never emitting half of a multi-byte UTF-8 character.
- `StopChecker` applies stop strings to the streamed text: the output ends *before* the stop string, and a suffix
  that might still become a stop string is held back until it is decided (`find_stop`, `partial_stop_length`).

The engine keeps one of each per request, fed from its `serving.tokenizer.Tokenizer`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from gemma4_jax.serving.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


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
