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


@dataclasses.dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


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
    pages: list[int] = dataclasses.field(default_factory=list)
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
    matcher: Any = None  # structured outputs: the request's llguidance matcher (structured.py), else None
    routed: list[np.ndarray] = dataclasses.field(default_factory=list)  # (L_moe, k) per generated token

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def in_decode(self) -> bool:
        """Prompt (and any recomputed outputs) cached except the last generated token."""
        return self.status is Status.RUNNING and bool(self.output_ids) and self.num_computed == len(self.all_ids) - 1
