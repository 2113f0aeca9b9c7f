"""Speculative decoding: its configuration, and the proposers that draft tokens for the engine's verify step.

The engine (serving/engine.py) asks a proposer for up to k drafts per decoding row, runs one verify step over
rows [last token, d_1 .. d_k] (serving/runner.py `verify_step`), and keeps the longest prefix of drafts that
equal the tokens the target samples at their positions, plus one (serving/sampling.py `verify` says why this is
exact). A proposer sees only token ids and returns drafts; it never touches the KV pools.

- `NgramProposer`: prompt lookup (vLLM's "ngram" method): the tokens that followed the latest earlier occurrence of
  the context's last n tokens, n from `prompt_lookup_max` down to `prompt_lookup_min`.
- `OracleProposer`: test and benchmark only. Proposes a known continuation (e.g. the target's own plain greedy
  output), so the verify path can be measured at full acceptance with random weights.

Configuration: `SpeculativeConfig.resolve` accepts vLLM's dict form ({"method": "ngram", "num_speculative_tokens":
k, "prompt_lookup_max": n, "prompt_lookup_min": m}, or {"method": "draft_model" | "mtp", "model": DIR, ...}) and
the shorthand of `LLM(draft_model=DIR, num_speculative_tokens=k)`, and refuses anything it cannot honour.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from gemma4_jax.serving.requests import Request

METHODS = ("ngram", "draft_model", "mtp")
# vLLM's default n-gram sizes when neither bound is given.
DEFAULT_PROMPT_LOOKUP = 5
# A custom proposer handed to Engine(proposer=...) (tests, benchmarks); not a user-facing method name.
CUSTOM = "custom"


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """What to draft with and how many tokens per step.

    method: "ngram" (prompt lookup, no draft model), "draft_model" / "mtp" (the Gemma 4 assistant checkpoint at
    `model`), or "custom" (a proposer object given to the engine). num_speculative_tokens: k >= 1 drafts per row
    and step. prompt_lookup_min / _max: the n-gram sizes tried ("ngram" only).
    """

    method: str
    num_speculative_tokens: int
    model: str | None = None
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None

    def __post_init__(self):
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"num_speculative_tokens must be an int >= 1, got {k!r}")
        if self.method not in (*METHODS, CUSTOM):
            raise ValueError(f"speculative method must be one of {list(METHODS)}, got {self.method!r}")
        if self.method == "ngram":
            if self.model is not None:
                raise ValueError("speculative method 'ngram' takes no 'model' (it drafts from the context)")
            lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
            if lo is None and hi is None:
                lo = hi = DEFAULT_PROMPT_LOOKUP
            lo, hi = (hi if lo is None else lo), (lo if hi is None else hi)
            for name, value in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ValueError(f"{name} must be an int >= 1, got {value!r}")
            if lo > hi:
                raise ValueError(f"prompt_lookup_min={lo} must not exceed prompt_lookup_max={hi}")
            object.__setattr__(self, "prompt_lookup_min", lo)
            object.__setattr__(self, "prompt_lookup_max", hi)
        else:
            if self.prompt_lookup_min is not None or self.prompt_lookup_max is not None:
                raise ValueError(f"prompt_lookup_min / prompt_lookup_max apply to method 'ngram', not {self.method!r}")
            if self.method in ("draft_model", "mtp") and not self.model:
                raise ValueError(f"speculative method {self.method!r} needs 'model' (the assistant checkpoint)")

    @staticmethod
    def resolve(
        speculative_config: SpeculativeConfig | Mapping[str, Any] | None = None,
        draft_model: str | None = None,
        num_speculative_tokens: int | None = None,
    ) -> SpeculativeConfig | None:
        """One config from vLLM's dict (or a SpeculativeConfig) and/or the draft_model / num_speculative_tokens
        shorthand; None when speculation is off. Contradictions and unknown keys raise ValueError."""
        if isinstance(speculative_config, SpeculativeConfig):
            if draft_model is not None or num_speculative_tokens:
                raise ValueError("give either speculative_config or draft_model / num_speculative_tokens, not both")
            return speculative_config
        fields: dict[str, Any] = dict(speculative_config or {})
        known = {"method", "num_speculative_tokens", "model", "prompt_lookup_min", "prompt_lookup_max"}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"speculative_config: unsupported key(s) {unknown}; supported: {sorted(known)}")
        for name, value in (("model", draft_model), ("num_speculative_tokens", num_speculative_tokens)):
            if value is None or (name == "num_speculative_tokens" and value == 0):
                continue
            if fields.get(name, value) != value:
                raise ValueError(f"{name}={value!r} contradicts speculative_config's {name}={fields[name]!r}")
            fields[name] = value
        if not fields:
            return None
        if "num_speculative_tokens" not in fields:
            raise ValueError("speculative decoding needs num_speculative_tokens (k >= 1 drafts per step)")
        if "method" not in fields:
            if not fields.get("model"):
                raise ValueError(f"speculative_config needs a 'method' (one of {list(METHODS)}) or a draft 'model'")
            fields["method"] = "draft_model"
        if fields["method"] == CUSTOM:
            raise ValueError(f"speculative method must be one of {list(METHODS)}, got 'custom'")
        return SpeculativeConfig(**fields)

    @staticmethod
    def custom(num_speculative_tokens: int) -> SpeculativeConfig:
        """The config of a proposer object given to Engine(proposer=...)."""
        return SpeculativeConfig(CUSTOM, num_speculative_tokens)


class Proposer(Protocol):
    """Drafts tokens for decoding rows. `propose` gets the rows (their `all_ids` end with the last sampled token,
    not yet in the cache) and a limit per row (0: no drafts wanted), and returns at most `limit` token ids per
    row; fewer (or none) is always allowed."""

    def propose(self, requests: Sequence[Request], limits: Sequence[int]) -> list[list[int]]: ...


class NgramProposer:
    """Prompt lookup: for n = max .. min, find the latest earlier occurrence of the context's last n tokens that
    has `limit` tokens after it (else the earliest occurrence) and propose the tokens that followed it. The longest
    matching n wins; the latest occurrence because recent context repeats most (code edits, quoted passages)."""

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int):
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError(
                f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {prompt_lookup_min}, {prompt_lookup_max}"
            )
        self.min_n, self.max_n = prompt_lookup_min, prompt_lookup_max

    def propose(self, requests: Sequence[Request], limits: Sequence[int]) -> list[list[int]]:
        return [
            self.lookup(np.asarray(req.all_ids, np.int64), limit) if limit > 0 else []
            for req, limit in zip(requests, limits, strict=True)
        ]

    def lookup(self, tokens: np.ndarray, limit: int) -> list[int]:
        """Drafts for a context (L,) of token ids: at most `limit` ids, [] when no n-gram of the sizes recurs."""
        length = tokens.shape[0]
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            # Windows starting at 0 .. L-n-1: each has at least one token after it, and none is the suffix itself.
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)  # (L - n, n)
            hits = np.flatnonzero(np.all(windows == tokens[length - n :], axis=1))
            if hits.size:
                # The latest occurrence with `limit` tokens after it; else the earliest (the most tokens after it):
                # in a repeating run the latest match abuts the suffix and would leave a single token to propose.
                roomy = hits[hits + n + limit <= length]
                start = int(roomy[-1] if roomy.size else hits[0]) + n
                return tokens[start : start + limit].tolist()
        return []


class OracleProposer:
    """Test and benchmark only: proposes a known continuation of each prompt, e.g. the target's own plain
    greedy output (full acceptance under greedy decoding whatever the weights). continuations: {prompt token ids
    (tuple): the tokens to generate after it}. Unknown prompts and positions past the continuation get no drafts."""

    def __init__(self, continuations: Mapping[tuple[int, ...], Sequence[int]]):
        self.continuations = {tuple(int(t) for t in p): [int(t) for t in c] for p, c in continuations.items()}

    def propose(self, requests: Sequence[Request], limits: Sequence[int]) -> list[list[int]]:
        drafts = []
        for req, limit in zip(requests, limits, strict=True):
            known = self.continuations.get(tuple(req.prompt_ids), [])
            done = len(req.output_ids)
            # Only while the output so far follows the continuation: otherwise the oracle knows nothing.
            follows = known[:done] == req.output_ids
            drafts.append(known[done : done + limit] if follows and limit > 0 else [])
        return drafts


def build_proposer(config: SpeculativeConfig) -> Proposer:
    """The proposer a config names. "draft_model" / "mtp" are refused until the assistant drafter is wired in;
    "custom" needs the proposer object itself (Engine(proposer=...))."""
    if config.method == "ngram":
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    if config.method == CUSTOM:
        raise ValueError("speculative method 'custom' needs the proposer object: Engine(..., proposer=...)")
    raise ValueError(
        f"speculative method {config.method!r} (the Gemma 4 assistant drafter) is not wired into the "
        "engine yet; use {'method': 'ngram', ...}"
    )
