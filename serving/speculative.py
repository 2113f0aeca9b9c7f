"""Speculative decoding: its configuration, and the proposers that draft tokens for the engine's verify step.

The engine (serving/engine.py) asks a proposer for up to k drafts per decoding row, runs one verify step over
rows [last token, d_1 .. d_k] (serving/runner.py `verify_step`), and keeps the longest prefix of drafts that
equal the tokens the target samples at their positions, plus one (serving/sampling.py `verify` says why this is
exact). A proposer sees only token ids and returns drafts; it never touches the KV pools.

- `NgramProposer`: prompt lookup (vLLM's "ngram" method): the tokens that followed the latest earlier occurrence of
  the context's last n tokens, n from `prompt_lookup_max` down to `prompt_lookup_min`.
- `OracleProposer`: test and benchmark only. Proposes a known continuation (e.g. the target's own plain greedy
  output), so the verify path can be measured at full acceptance with random weights.
- `AssistantProposer`: the Gemma 4 MTP assistant (gemma4_jax/assistant.py). Unlike the others it reads the target:
  the final-normed hidden state each step leaves per row (kept on the device, by sequence slot) and, read-only,
  the K/V pools of the target's last full and last sliding layer. It drafts k tokens greedily in one jitted call.
  With a pipelined target (pp > 1) it runs on the stage holding the later of those two layers (`drafter_stage`),
  reads that stage's pool in place and gathers the rows' pages of a source layer on an earlier stage there, moving
  only those pages; the hidden state comes from the last stage, one (B, D) array per step.

Configuration: `SpeculativeConfig.resolve` accepts vLLM's dict form ({"method": "ngram", "num_speculative_tokens":
k, "prompt_lookup_max": n, "prompt_lookup_min": m}, or {"method": "draft_model" | "mtp", "model": DIR, ...}) and
the shorthand of `LLM(draft_model=DIR, num_speculative_tokens=k)`, and refuses anything it cannot honour.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma4_jax import sharding
from gemma4_jax.assistant import TargetKV, draft
from gemma4_jax.assistant_config import target_kv_layers
from gemma4_jax.attention_backends import AttentionPlan
from gemma4_jax.config import FULL, SLIDING
from gemma4_jax.layers import model_jit
from gemma4_jax.model import AssistantModel, Model, StaticGraph, load_assistant, static_graph
from gemma4_jax.pipeline import to_stage
from gemma4_jax.serving.kv_cache import CacheLayout, bucket, context_view, pages_needed
from gemma4_jax.serving.requests import Request

METHODS = ("ngram", "draft_model", "mtp")
# vLLM's default n-gram sizes when neither bound is given.
DEFAULT_PROMPT_LOOKUP = 5
# A custom proposer handed to Engine(proposer=...) (tests, benchmarks); not a user-facing method name.
CUSTOM = "custom"


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """What to draft with and how many tokens per step.

    method: "ngram" (prompt lookup, no draft model), "draft_model" / "mtp" (the Gemma 4 assistant: `model` is its
    checkpoint directory or a loaded gemma4_jax.model.AssistantModel), or "custom" (a proposer object given to the
    engine). num_speculative_tokens: k >= 1 drafts per row
    and step. prompt_lookup_min / _max: the n-gram sizes tried ("ngram" only).
    """

    method: str
    num_speculative_tokens: int
    model: str | AssistantModel | None = None
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
    """The proposer a config names that needs nothing from the engine ("ngram"). "draft_model" / "mtp" read the
    target's state: the engine builds them (`load_drafter`, `AssistantProposer`); "custom" needs the proposer
    object itself (Engine(proposer=...))."""
    if config.method == "ngram":
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    if config.method == CUSTOM:
        raise ValueError("speculative method 'custom' needs the proposer object: Engine(..., proposer=...)")
    raise ValueError(f"speculative method {config.method!r} drafts from the target's state: the engine builds it "
                     "(load_drafter, AssistantProposer)")


# ----------------------------------------------------------------------------------------------------------------
# The MTP assistant drafter


def drafter_stage(target: Model) -> int:
    """The pipeline stage the assistant drafter runs on (0 when pp = 1): the one holding the later of the target
    layers whose K/V it reads (assistant_config.target_kv_layers), whose pool it then reads in place. Typical
    splits keep both source layers on one stage (E2B pp=2: layers 13 and 14 of stage 0; 31B: its last two layers,
    on the last stage)."""
    if target.num_stages == 1:
        return 0
    last = max(target_kv_layers(target.config.text).values())
    return next(s for s, layers in enumerate(target.pipeline.plan.layers) if last in layers)


def drafter_mesh(target: Model) -> jax.sharding.Mesh:
    """The mesh the assistant drafter lives on: the target's (pp = 1) or its drafter stage's sub-mesh."""
    return target.mesh if target.num_stages == 1 else target.pipeline.meshes[drafter_stage(target)]


def load_drafter(model: str | os.PathLike | AssistantModel, target: Model) -> AssistantModel:
    """The assistant of a "draft_model" / "mtp" config, on `drafter_mesh(target)`, checked against the target: a
    pair that does not fit (hidden size, vocabulary, the K/V shapes it reads) raises the assistant config's
    ConfigError at start-up. A loaded AssistantModel must already live on the target's mesh (load_assistant(mesh=
    ...)); with pp > 1, on any sub-mesh of the target's stage shape (it is moved onto the drafter stage)."""
    mesh = drafter_mesh(target)
    if isinstance(model, AssistantModel):
        model.check_target(target)
        if model.mesh == mesh:
            return model
        stage_shape = {axis: n for axis, n in mesh.shape.items() if axis != "pp"}
        if target.num_stages > 1 and {a: n for a, n in model.mesh.shape.items() if a != "pp"} == stage_shape:
            # Device to device, once: the drafter's weights join the stage whose pools it reads.
            return AssistantModel(model.config, model.graphdef, to_stage(model.state, mesh), mesh, model.dtype,
                                  path=model.path, attention=model.attention)
        raise ValueError(f"the assistant lives on another mesh ({dict(model.mesh.shape)}) than the target "
                         f"({dict(target.mesh.shape)}): load it with load_assistant(..., mesh=target.mesh), or with "
                         "pp > 1 on a stage's sub-mesh (speculative.drafter_mesh(target))")
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"draft model must be an assistant checkpoint directory or an AssistantModel, got "
                        f"{type(model).__name__}")
    return load_assistant(model, dtype=target.dtype, mesh=mesh, target=target)


def assistant_window_keep(assistant: AssistantModel) -> int:
    """Keys before a row's context end that the assistant drafter reads in the target's sliding layer: a draft at
    position p reads the target's keys p-1-W_a .. p-1 (W_a + 1 keys, assistant.py). The sliding pool keeps them
    (CacheLayout.window_keep); keys of rejected drafts sit past the context, where no read sees them."""
    return assistant.config.text.sliding_window + 1


@functools.partial(jax.jit, donate_argnames=("buffer",))
def _record_hidden(buffer: jax.Array, slots: jax.Array, hidden: jax.Array) -> jax.Array:
    """buffer (S + 1, D): row slots[b] <- hidden[b] (B, D); padding rows write the trash row S."""
    return buffer.at[slots].set(hidden.astype(buffer.dtype))


@jax.jit
def _gather_pages(k_pages: jax.Array, v_pages: jax.Array, table: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The pages a (B, P) table names, as pools of their own: (B * P, page_size, K, H) each, page b * P + j being
    row b's logical page j. A pipelined target's source layer on another stage than the drafter: only these pages
    cross to the drafter's devices, never the whole pool."""
    b, p = table.shape
    return (k_pages[table].reshape(b * p, *k_pages.shape[1:]), v_pages[table].reshape(b * p, *v_pages.shape[1:]))


@functools.partial(
    model_jit, static_argnames=("assistant_graph", "embed_graph", "layout", "attention", "sources", "num_tokens")
)
def draft_step(assistant_graph: StaticGraph, assistant_state: nnx.State, embed_graph: StaticGraph,
               embed_state: nnx.State, pools: dict[str, jax.Array], hidden: jax.Array, tokens: jax.Array,
               positions: jax.Array, slots: jax.Array, page_table: jax.Array, window_table: jax.Array,
               window_start: jax.Array, *, layout: CacheLayout,
               attention: AttentionPlan, sources: tuple[tuple[str, int], ...], num_tokens: int) -> jax.Array:
    """k = num_tokens greedy assistant drafts per row (assistant.draft) from the target's state as it stands.

    pools: the target's pools of its source layers {"k{l}", "v{l}"} (read, not donated); hidden: (S + 1, D_t) the
    recorded final-normed states by slot; tokens (B,) int32 each row's last token (not in the cache); positions
    (B,) int32 its position p = the row's cached context (-1: padding row); slots (B,) int32 sequence slots (S for
    padding); page_table (B, P) int32; window_table (B, Pw), window_start (B,) int32: the sliding pool's windowed
    table (kv_cache.StepBatch). sources: ((attention type, target layer), ...). Returns drafts (B, k) int32.
    """
    assistant = nnx.merge(assistant_graph.graphdef, assistant_state)
    embed = nnx.merge(embed_graph.graphdef, embed_state)
    lengths = jnp.maximum(positions, 0)  # the context after rollback: rejected drafts' keys are outside the view
    views = {kind: context_view(pools, layout, layer, page_table, window_table, window_start, lengths, hidden.dtype)
             for kind, layer in sources}
    kv = TargetKV(sliding=views.get(SLIDING), full=views.get(FULL))
    out = draft(assistant, embed, tokens, hidden[slots], kv, positions, num_tokens=num_tokens, attention=attention)
    return out.tokens


class AssistantProposer:
    """Greedy drafts from the Gemma 4 MTP assistant (HF `Gemma4AssistantForCausalLM`), k per row in one jitted call.

    A row's round starts from its last token (all_ids[-1]), that token's position p (= the row's cached context)
    and the target's final-normed hidden state at the token before it. That state is recorded by sequence slot
    after every step the engine runs (`record`: the prefill chunk that ends a prompt, a plain decode step, a verify
    step at index num_accepted), so rows joining (their prefill records it), leaving (the next prefill in the slot
    overwrites it) and preempted (the resuming prefill records it again) need no bookkeeping here. The drafter reads
    the pools of the target's last full and sliding layers in place through read-only views of length p, so keys
    of rejected drafts are never seen. Drafts are deterministic (argmax): the engine's verify stays exact under
    sampling (sampling.verify).

    Pipelined target (pp > 1): the drafter runs on `drafter_stage` (its weights there, `load_drafter`), with the
    target's token table of that stage (the first stage's, or the last stage's tied copy; else moved there once)
    and the hidden states moved there from the last stage as they are recorded. A source layer's pool on another
    stage is read as the rows' pages gathered on its own stage and moved (`_gather_pages`), so every row sees
    exactly what the in-place view would show.
    """

    reads_target = True

    def __init__(self, assistant: AssistantModel, target: Model, layout: CacheLayout, attention: AttentionPlan,
                 num_speculative_tokens: int):
        self.assistant = assistant
        self.layout = layout
        self.attention = attention
        self.num_tokens = num_speculative_tokens
        sources = assistant.check_target(target)
        self.sources = tuple(sorted(sources.items()))
        needed = assistant_window_keep(assistant)
        if SLIDING in sources and layout.window_keep < needed:
            raise ValueError(f"the sliding pool keeps {layout.window_keep} keys before the context, the assistant "
                             f"drafter reads {needed} (assistant_window_keep)")
        self.num_stages = target.num_stages
        self.home = drafter_stage(target)
        self.mesh = drafter_mesh(target)
        # The stage of each source layer (pp > 1), its pools being that stage's.
        self.source_stage = {layer: self.home for _, layer in self.sources}
        if self.num_stages > 1:
            stages = target.pipeline.plan.layers
            self.source_stage = {layer: next(s for s, r in enumerate(stages) if layer in r)
                                 for _, layer in self.sources}
            self.stage_meshes = target.pipeline.meshes
        # The target's scaled token embedding, split out once: the draft call takes only these weights.
        embed_graph, self.embed_state = nnx.split(self._target_embed(target))
        self.embed_state = to_stage(self.embed_state, self.mesh) if self.num_stages > 1 else self.embed_state
        self.embed_graph = static_graph(embed_graph)
        d = target.config.text.hidden_size
        self.hidden = jnp.zeros((layout.max_seqs + 1, d), target.dtype, device=sharding.replicated(self.mesh))
        self.draft_time_s = 0.0  # host wall time inside `propose_from` (benchmarks: draft-to-target cost)
        self.draft_calls = 0

    def _target_embed(self, target: Model) -> nnx.Module:
        """The target's embed_tokens module, from the drafter stage's own parameters when it holds the table."""
        if self.num_stages == 1:
            return nnx.merge(target.graphdef, target.state).embed_tokens
        pipe = target.pipeline
        owns = ("embed_tokens", "embedding") in dict(nnx.to_flat_state(pipe.states[self.home]))
        return pipe.module(self.home if owns else 0).embed_tokens

    def record(self, slots: np.ndarray, hidden: jax.Array) -> None:
        """After a step: slots (B,) int32 of its rows (padding: max_seqs), hidden (B, D_t) their final-normed states
        (on the device; pp > 1: the last stage's, moved to the drafter's). A prefill chunk short of its prompt's end
        records a state its final chunk overwrites."""
        if self.num_stages > 1:
            hidden = jax.device_put(hidden, sharding.replicated(self.mesh))
        self.hidden = _record_hidden(self.hidden, jnp.asarray(slots, jnp.int32), hidden)

    def propose(self, requests: Sequence[Request], limits: Sequence[int]) -> list[list[int]]:
        raise TypeError("AssistantProposer reads the target's pools: the engine calls propose_from(cache, ...)")

    def propose_from(self, cache: dict[str, jax.Array] | list[dict[str, jax.Array]], requests: Sequence[Request],
                     limits: Sequence[int]) -> list[list[int]]:
        """Drafts for each decode row (at most its `limit`), from the engine's pools `cache` as they stand (a list
        per stage when pp > 1) and the rows' pages and slots."""
        t0 = time.perf_counter()
        layout = self.layout
        b = bucket(len(requests), 1, layout.max_seqs)
        p = bucket(max(pages_needed(max(req.num_computed, 1), layout.page_size) for req in requests), 4)
        tokens = np.zeros((b,), np.int32)
        positions = np.full((b,), -1, np.int32)
        slots = np.full((b,), layout.max_seqs, np.int32)
        table = np.zeros((b, p), np.int32)
        pw = layout.window_width(1, p)
        window = np.zeros((b, pw), np.int32)
        window_start = np.zeros((b,), np.int32)
        for i, req in enumerate(requests):
            tokens[i], positions[i], slots[i] = req.last_id, req.num_computed, req.slot
            n = min(len(req.pages), p)
            table[i, :n] = req.pages[:n]
            if layout.sliding_layers:
                first = layout.first_window_page(req.num_computed)
                live = req.window_pages[first: first + pw]
                window[i, : len(live)] = live
                window_start[i] = first * layout.page_size
        pools = {}
        for kind, layer in self.sources:
            stage = self.source_stage[layer]
            pool = cache if self.num_stages == 1 else cache[stage]
            k_pages, v_pages = pool[f"k{layer}"], pool[f"v{layer}"]
            if stage != self.home:
                # Only the rows' pages cross to the drafter's stage; the view then reads them through a table
                # of their own (row b's page j at b * P + j), with the same lengths and window start.
                sliding = kind == SLIDING
                rows_table = window if sliding else table
                with jax.set_mesh(self.stage_meshes[stage]):
                    k_pages, v_pages = _gather_pages(k_pages, v_pages, rows_table)
                k_pages, v_pages = to_stage((k_pages, v_pages), self.mesh)
                own = np.arange(rows_table.size, dtype=np.int32).reshape(rows_table.shape)
                window, table = (own, table) if sliding else (window, own)
            pools[f"k{layer}"], pools[f"v{layer}"] = k_pages, v_pages
        with jax.set_mesh(self.mesh):
            drafts = draft_step(self.assistant.static_graph, self.assistant.state, self.embed_graph,
                                self.embed_state, pools, self.hidden, tokens, positions, slots, table, window,
                                window_start, layout=layout, attention=self.attention, sources=self.sources,
                                num_tokens=self.num_tokens)
        drafts = np.asarray(jax.device_get(drafts))
        self.draft_time_s += time.perf_counter() - t0
        self.draft_calls += 1
        return [drafts[i, :limit].tolist() if limit > 0 else [] for i, limit in enumerate(limits)]
