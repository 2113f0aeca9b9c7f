"""The engine's records of requests: `Request` (scheduling state of one sequence, owned by the engine), and what
callers get back, `RequestOutput` with its `TokenLogprob`s. Typed hand-offs between the engine, the offline API
and the server."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import numpy as np

from gemma4_jax.serving import mm_inputs
from gemma4_jax.serving.detokenizer import IncrementalDetokenizer, StopChecker
from gemma4_jax.serving.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


# A stand-in for a grammar matcher that allows every token: the warm-up's dummy rows carry it so that their steps
# run (and compile) the grammar program family without a grammar (step_builder.build_rows gives them a free mask).
FREE_GRAMMAR = object()

@dataclasses.dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


@dataclasses.dataclass
class SpecDecodeStats:
    """Speculative decoding counters (vLLM's spec_decode metrics), per request or summed over an engine.

    num_drafts: verify steps in which rows had drafts; num_draft_tokens: tokens proposed; num_accepted_tokens: of
    them accepted; accepted_per_pos[i]: drafts accepted at draft position i (the (i+1)-th draft of a step)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = dataclasses.field(default_factory=list)
    proposed_per_pos: list[int] = dataclasses.field(default_factory=list)

    def record(self, num_draft_tokens: int, num_accepted: int) -> None:
        """One verify step of one row that proposed `num_draft_tokens` (>= 1) and accepted `num_accepted`."""
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        grow = num_draft_tokens - len(self.proposed_per_pos)
        if grow > 0:
            self.proposed_per_pos.extend([0] * grow)
            self.accepted_per_pos.extend([0] * grow)
        for i in range(num_draft_tokens):
            self.proposed_per_pos[i] += 1
            self.accepted_per_pos[i] += int(i < num_accepted)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (0 when none were proposed)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def acceptance_rate_per_pos(self) -> list[float]:
        """For each draft position i: accepted / proposed at that position."""
        return [a / p if p else 0.0 for a, p in zip(self.accepted_per_pos, self.proposed_per_pos, strict=True)]

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verify step with drafts: 1 + accepted drafts per step (vLLM's mean acceptance
        length); 0 when there was none."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def copy(self) -> SpecDecodeStats:
        return dataclasses.replace(
            self, accepted_per_pos=list(self.accepted_per_pos), proposed_per_pos=list(self.proposed_per_pos)
        )


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    logprobs: list[TokenLogprob] | None = None
    finished: bool = False
    # SamplingParams.return_routed_experts: int32 (len(token_ids), L_moe, k), row j = the router's top-k expert
    # ids in every MoE layer for the input token whose logits produced token_ids[j] (the prompt's last token for
    # j = 0, then token_ids[j - 1]), highest weight first.
    routed_experts: np.ndarray | None = None
    # Speculative decoding counters of this request (engine started with speculative decoding), else None.
    spec_decode: SpecDecodeStats | None = None


@dataclasses.dataclass(eq=False)  # identity: requests are compared and hashed as objects
class Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int
    key: np.ndarray
    output_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    status: Status = Status.WAITING
    slot: int = -1
    pages: list[int] = dataclasses.field(default_factory=list)  # full-attention pool pages by logical page
    window_pages: list[int] = dataclasses.field(default_factory=list)  # sliding pool pages (trash before the window)
    prefix: Any = None  # prefix_cache.PrefixKey: the block hashes of all_ids (set by the engine)
    num_computed: int = 0  # tokens whose K/V are in the pools
    text: str = ""
    finish_reason: str | None = None
    detok: IncrementalDetokenizer | None = None
    stopper: StopChecker | None = None
    stop_ids: frozenset[int] = frozenset()
    num_preemptions: int = 0
    first_token_time: float | None = None
    arrival_time: float = 0.0
    media: mm_inputs.MediaInputs | None = None  # images / audio of the prompt (soft tokens cached once encoded)
    matcher: Any = None  # structured outputs: the request's llguidance matcher (structured.py), FREE_GRAMMAR, or None
    routed: list[np.ndarray] = dataclasses.field(default_factory=list)  # (L_moe, k) per generated token
    spec: SpecDecodeStats = dataclasses.field(default_factory=SpecDecodeStats)  # speculative decoding counters

    @property
    def all_ids(self) -> list[int]:
        """Prompt and generated ids, as a new list (the hot paths use `num_tokens` / `last_id`, which copy nothing)."""
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        """len(all_ids)."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def last_id(self) -> int:
        """all_ids[-1]."""
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def in_decode(self) -> bool:
        """Prompt (and any recomputed outputs) cached except the last generated token."""
        return self.status is Status.RUNNING and bool(self.output_ids) and self.num_computed == self.num_tokens - 1
