"""The serving engine: requests in, tokens out, with continuous batching over paged KV pools.

Each `step()`:
1. decode: every running request whose prompt is fully cached gets one token; a request that needs a page when
   none is free preempts the latest arrival (serving/scheduler.py: resumed later by recomputing, which reproduces
   the same tokens);
2. prefill: waiting requests, first come first served, get chunks of their prompt within the step's token budget
   (`max_num_batched_tokens`) and the free pages and sequence slots (serving/scheduler.py);
3. the jitted step runs once for the prefill chunks and once for the decode batch (each padded to buckets), and
   the sampled tokens are appended, detokenized and checked against the stop conditions.

With speculative decoding (`EngineConfig.speculative_config`, serving/speculative.py) the decode batch is a verify
step instead whenever a proposer drafts tokens for some row: rows [last token, d_1 .. d_k] run through the same
forward and each row emits its accepted drafts plus one token (docs/speculative.md).

Automatic prefix caching (`EngineConfig.enable_prefix_caching`, on by default as in vLLM; serving/prefix_cache.py,
docs/prefix_caching.md): a request starts its prefill after its longest cached prefix, in every layer kind.

Compile events (new bucket shapes) are counted with their times in `stats`. The steps themselves (micro-batches,
prefill groups, constrained programs, multi-step decode, speculative verify) are serving/engine_steps.py; their
inputs are assembled in serving/step_builder.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax.attention_backends import AttentionPlan, resolve_attention
from gemma4_jax.model import Model
from gemma4_jax.serving import host_memory, media_chunks, mm_inputs
from gemma4_jax.serving.detokenizer import IncrementalDetokenizer, StopChecker
from gemma4_jax.serving.engine_steps import EngineSteps, InFlight
from gemma4_jax.serving.kv_cache import CacheLayout, pages_needed
from gemma4_jax.serving.pipeline_runner import PipelineRunner
from gemma4_jax.serving.prefix_cache import KVBlocks, PrefixKey, window_pool_pages
from gemma4_jax.serving.requests import Request, RequestOutput, SpecDecodeStats, Status, TokenLogprob
from gemma4_jax.serving.runner import Runner
from gemma4_jax.serving.sampling import SamplingParams, request_key
from gemma4_jax.serving.scheduler import Scheduler
from gemma4_jax.serving.speculative import (
    AssistantProposer,
    Proposer,
    SpeculativeConfig,
    assistant_window_keep,
    build_proposer,
    load_drafter,
)
from gemma4_jax.serving.structured import Grammars

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EngineConfig:
    max_num_seqs: int = 64
    max_model_len: int | None = None  # default: min(max_position_embeddings, 8192)
    page_size: int = 16
    num_pages: int | None = None  # default: enough for max_num_seqs full-length sequences, capped by kv_memory_gb
    kv_memory_gb: float = 4.0
    max_num_batched_tokens: int = 512  # token budget per step (decode tokens + prefill chunks)
    num_scheduler_steps: int = 1  # decode steps per host round-trip when no prefill is pending (vLLM's name)
    # Async scheduling (vLLM's async_scheduling, SGLang's overlap scheduler): a decode step's host bookkeeping runs
    # while the device computes the next one (engine_steps.py). None = on wherever it applies: one program (no
    # pipeline stages), num_scheduler_steps 1, no speculative decoding; True there refuses the others; False = off.
    async_scheduling: bool | None = None
    # Attention backends (gemma4_jax/attention_backends.py): one name for both phases, or separate prefill and
    # decode names (SGLang's --prefill-attention-backend / --decode-attention-backend). Checked at start-up.
    attention_backend: str = "auto"
    prefill_backend: str | None = None
    decode_backend: str | None = None
    pipeline_microbatches: int | None = None  # pp > 1: decode micro-batches in flight (default: one per stage)
    # MoE models: steps also return the router's expert ids, for requests with return_routed_experts. On by
    # default (a (B, L, k) int32 array per step, ~60 KB at B=64 on 26B-A4B); False saves even that.
    enable_return_routed_experts: bool = True
    # Speculative decoding: vLLM's dict ({"method": "ngram", "num_speculative_tokens": k, ...}) or a
    # SpeculativeConfig; None = off (serving/speculative.py).
    speculative_config: SpeculativeConfig | dict | None = None
    # Automatic prefix caching (vLLM's enable_prefix_caching, on by default): K/V blocks of finished and running
    # requests are kept, keyed by their tokens, and a new request starts after its longest cached prefix.
    enable_prefix_caching: bool = True
    # Sliding-window pages kept for cached prefixes beyond those running sequences need, in windows (a hit at P needs
    # the window before P cached); default max_num_seqs. Ignored when caching is off.
    prefix_cache_windows: int | None = None
    # The sliding-window pool's size in pages, trash page included (default: sized from the limits above, see
    # prefix_cache.window_pool_pages). Engines with equal pools share compiled steps (tests compare caching on and off).
    num_window_pages: int | None = None

    def resolve_attention(self) -> AttentionPlan:
        """The plan every engine step runs; an unknown or unavailable choice raises ValueError here."""
        return resolve_attention(self.attention_backend, self.prefill_backend, self.decode_backend)


class Engine(EngineSteps):
    """Continuous-batching generator over a loaded `Model`. Not thread-safe: one thread drives `step()`.
    Request lifecycle, scheduling loop and outputs here; turning scheduled rows into runner calls in
    `EngineSteps` (engine_steps.py)."""

    def __init__(self, model: Model, tokenizer=None, config: EngineConfig | None = None,
                 proposer: Proposer | None = None):
        """proposer: a drafter object for speculative decoding (tests, benchmarks: speculative.OracleProposer)
        in place of the one `config.speculative_config` names; the config then only sets k (method "custom")."""
        self.model = model
        self.tokenizer = tokenizer
        self.config = config = config or EngineConfig()
        self.huge_pages = host_memory.HugePages(skipped="not a CPU backend")
        if jax.default_backend() == "cpu":
            host_memory.keep_freed_memory()  # no page faults on each step's temporaries (host_memory.py)
            # Fewer page walks for the weights every step streams (host_memory.py).
            self.huge_pages = host_memory.weights_on_huge_pages(jax.tree.leaves(model.state))
        self.attention = config.resolve_attention()
        cfg = model.config.text
        self.text_config = cfg
        if min(config.max_num_seqs, config.page_size, config.max_num_batched_tokens, config.num_scheduler_steps) < 1:
            raise ValueError("max_num_seqs, page_size, max_num_batched_tokens and num_scheduler_steps must be positive")
        self.max_model_len = int(config.max_model_len or min(cfg.max_position_embeddings, 8192))
        if self.max_model_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's max_position_embeddings="
                             f"{cfg.max_position_embeddings}")
        itemsize = jnp.dtype(model.dtype).itemsize
        self.kv_bytes_per_token = cfg.kv_bytes_per_token(itemsize)
        per_token = max(self.kv_bytes_per_token, 1)
        pages_per_seq = pages_needed(self.max_model_len, config.page_size)
        if config.num_pages is None:
            budget = int(config.kv_memory_gb * 2**30 / (per_token * config.page_size))
            num_pages = min(config.max_num_seqs * pages_per_seq, max(budget, pages_per_seq)) + 1
        else:
            num_pages = config.num_pages
        if num_pages - 1 < 1:
            raise ValueError("num_pages must leave at least one page besides the trash page")
        sized = ("num_pages given" if config.num_pages is not None else
                 f"min(max_num_seqs x pages per sequence, kv_memory_gb={config.kv_memory_gb:g} budget)")
        self.speculative = SpeculativeConfig.resolve(config.speculative_config)
        if proposer is not None and self.speculative is None:
            raise ValueError("Engine(proposer=...) needs speculative_config=SpeculativeConfig.custom(k) to set k")
        if self.speculative is not None and (proposer is not None) != (self.speculative.method == "custom"):
            raise ValueError("Engine(proposer=...) goes with speculative_config=SpeculativeConfig.custom(k), and "
                             f"method {self.speculative.method!r} takes no proposer object")
        self.proposer = None
        assistant = None  # the MTP assistant drafter ("draft_model" / "mtp"): built once the pools are laid out
        if self.speculative is not None and self.speculative.method in ("draft_model", "mtp"):
            assistant = load_drafter(self.speculative.model, model)
        elif self.speculative is not None:
            self.proposer = proposer if proposer is not None else build_proposer(self.speculative)
        # Sliding layers keep the keys inside the window of each sequence's next token (one further back for the
        # assistant drafter, speculative.assistant_window_keep).
        keep = cfg.sliding_window - 1
        if assistant is not None:
            keep = max(keep, assistant_window_keep(assistant))
        num_window_pages = self._window_pages(keep, num_pages)
        self.layout = CacheLayout.for_config(cfg, config.page_size, num_pages, config.max_num_seqs,
                                             num_window_pages, window_keep=keep)
        # The runner runs the steps: one program over the mesh, or the pipeline's stages (pp > 1), whose pools
        # (a list, per stage) each live on their stage's devices. Pools are sharded by KV head where tp divides the
        # layer's head count and placed from the start: a cache with another sharding than the step returns would
        # compile every step shape twice.
        return_routed = cfg.enable_moe_block and config.enable_return_routed_experts
        if model.num_stages > 1:
            self.runner = PipelineRunner(model, self.layout, self.attention, config.pipeline_microbatches,
                                         return_routed, return_hidden=assistant is not None)
        else:
            self.runner = Runner(model, self.layout, self.attention, return_routed,
                                 return_hidden=assistant is not None)
        if assistant is not None:
            self.proposer = AssistantProposer(assistant, model, self.layout, self.attention,
                                              self.speculative.num_speculative_tokens)
        self.async_scheduling = self._resolve_async()
        self._inflight: InFlight | None = None  # the decode step left in flight (async scheduling)
        self.next_token_programs: dict[int, jax.stages.Compiled] = {}  # by rows: next_token_program
        self.cache = self.runner.allocate()
        self.counts: dict[str, jax.Array] | None = None  # penalty state, allocated on first use
        self.blocks = KVBlocks(self.layout, caching=config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self._ids = itertools.count()
        self._shapes_seen: set[tuple] = set()
        self._grammars: Grammars | None = None  # built on the first request with structured outputs
        self.stats = {"compiles": 0, "compile_time_s": 0.0, "steps": 0, "preemptions": 0,
                      "prompt_tokens": 0, "generated_tokens": 0, "prefix_cache_queries": 0,
                      "prefix_cache_hits": 0, "chained_steps": 0}
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, model.config.vision_bidirectional, self.stats,
                                   on_start=self._init_counts)
        # Speculative decoding counters over all requests (requests.SpecDecodeStats); None when it is off.
        self.spec_stats = SpecDecodeStats() if self.speculative is not None else None
        if self.speculative is not None:
            self.stats.update(verify_steps=0, spec_num_drafts=0, spec_num_draft_tokens=0,
                              spec_num_accepted_tokens=0)
        if self.runner.num_stages > 1:
            # Idle stage-steps / all stage-steps of the dispatched pipeline schedules (pipeline.schedule_bubble).
            self.stats.update(pipeline_stages=self.runner.num_stages,
                              pipeline_microbatches=self.runner.microbatches, pipeline_bubble=0.0)
        self._log_start(sized)

    def _resolve_async(self) -> bool:
        """EngineConfig.async_scheduling -> on or off; True with a configuration it does not apply to raises."""
        wanted = self.config.async_scheduling
        if wanted not in (None, True, False):
            raise ValueError(f"async_scheduling must be True, False or None (auto), got {wanted!r}")
        why = None
        if self.runner.num_stages > 1:
            why = "pipeline stages (pp > 1) run their own micro-batch schedule"
        elif self.config.num_scheduler_steps > 1:
            why = "num_scheduler_steps > 1 already runs several decode steps per host round-trip"
        elif self.speculative is not None:
            why = "speculative decoding needs each step's tokens on the host to draft the next"
        if wanted and why is not None:
            raise ValueError(f"async_scheduling=True does not apply here: {why}")
        return why is None and wanted is not False

    def _window_pages(self, keep: int, num_pages: int) -> int:
        """Size of the sliding-window pool, trash page included (prefix_cache.window_pool_pages)."""
        config = self.config
        # (Async scheduling holds pages for 2 tokens per row: the in-flight step's and the next.)
        per_step = max(config.num_scheduler_steps, 2, 1 + (self.speculative.num_speculative_tokens
                                                           if self.speculative is not None else 0))
        windows = 0
        if config.enable_prefix_caching:
            windows = config.max_num_seqs if config.prefix_cache_windows is None else config.prefix_cache_windows
        return window_pool_pages(keep, config.page_size, config.max_num_seqs, config.max_num_batched_tokens,
                                 per_step, windows, num_pages, config.num_window_pages)

    def _log_start(self, sized: str) -> None:
        """What was chosen and why, once at start-up (INFO)."""
        model, cfg, config = self.model, self.text_config, self.config
        mesh = dict(model.mesh.shape)
        kinds = {"full": sum(not s.is_sliding for s in cfg.layers), "sliding": sum(s.is_sliding for s in cfg.layers),
                 "kv_shared": sum(s.is_kv_shared for s in cfg.layers)}
        log.info("model %s (%s, %d layers: %d full, %d sliding, %d KV-shared%s), dtype %s, %d params",
                 model.path or "in memory", model.config.architecture, cfg.num_hidden_layers, kinds["full"],
                 kinds["sliding"], kinds["kv_shared"], f", MoE {cfg.num_experts}x top-{cfg.top_k_experts}"
                 if cfg.enable_moe_block else "", jnp.dtype(model.dtype).name, model.num_params())
        log.info("devices: %d x %s; mesh pp=%d dp=%d tp=%d", model.mesh.devices.size,
                 model.mesh.devices.flat[0].device_kind, mesh.get("pp", 1), mesh.get("dp", 1), mesh.get("tp", 1))
        layout = self.layout
        log.info("KV cache: %d pages x %d tokens = %d tokens (%.1f MiB, %d B/token in %d full-attention layers; "
                 "sized by %s) + a sliding-window pool of %d pages (windows of %d keys); prefix caching %s",
                 layout.num_pages - 1, layout.page_size, (layout.num_pages - 1) * layout.page_size,
                 (layout.num_pages - 1) * layout.page_size * self.kv_bytes_per_token / 2**20,
                 self.kv_bytes_per_token, len(layout.full_layers), sized, layout.num_window_pages - 1,
                 layout.window_keep + 1, "on" if config.enable_prefix_caching else "off")
        log.info("scheduler: max_num_seqs %d, max_model_len %d, max_num_batched_tokens %d, num_scheduler_steps %d; "
                 "step shapes are padded to powers of two and compiled on first use",
                 config.max_num_seqs, self.max_model_len, config.max_num_batched_tokens, config.num_scheduler_steps)

    # ------------------------------------------------------------------------------------------------------------
    # Requests

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None, media: mm_inputs.MediaInputs | None = None) -> str:
        """media: the prompt's images / audio (serving/mm_inputs.py: `MediaProcessor.process` gives the expanded
        prompt ids and this)."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids or load one")
            text, ids = prompt, list(self.tokenizer.encode(prompt))
        else:
            text, ids = None, [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.text_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens plus max_tokens={params.max_tokens} exceeds "
                             f"max_model_len={self.max_model_len}")
        if pages_needed(len(ids) + params.max_tokens, self.layout.page_size) > self.layout.num_pages - 1:
            raise ValueError(f"a request of {len(ids) + params.max_tokens} tokens can never fit in the KV pool "
                             f"({self.layout.num_pages - 1} pages of {self.layout.page_size})")
        media_chunks.check_request(self, ids, media)
        if params.return_routed_experts and not self.runner.return_routed:
            why = ("the model is dense (no router)" if not self.text_config.enable_moe_block
                   else "the engine was started with enable_return_routed_experts=False")
            raise ValueError(f"return_routed_experts was requested but {why}")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        matcher = self._matcher(params.structured_outputs) if params.structured_outputs is not None else None
        req = Request(rid, text, ids, params, next(self._arrivals), request_key(params.seed),
                      arrival_time=time.perf_counter(), media=media, matcher=matcher, prefix=PrefixKey.of(media))
        if self.tokenizer is not None:
            req.detok = IncrementalDetokenizer(self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens)
        if params.stop:
            if self.tokenizer is None:
                raise ValueError("stop strings need a tokenizer to detokenize the output")
            req.stopper = StopChecker(params.stop)
        req.stop_ids = frozenset(params.stop_token_ids or ())
        if not params.ignore_eos:
            eos = set(self.text_config.eos_token_ids)
            if self.tokenizer is not None:
                eos |= set(self.tokenizer.stop_token_ids)
            req.stop_ids |= eos
        self.requests[rid] = req
        self.waiting.append(req)
        return rid

    def _matcher(self, spec):
        """A fresh grammar matcher for a request's structured outputs; ValueError when it cannot be enforced."""
        if self.tokenizer is None:
            raise ValueError("structured_outputs need a tokenizer (the grammar is matched on token text)")
        if self._grammars is None:
            eos = set(self.text_config.eos_token_ids) | set(self.tokenizer.stop_token_ids)
            self._grammars = Grammars(self.tokenizer, self.text_config.vocab_size, sorted(eos))
        return self._grammars.matcher(spec)

    def abort(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None or req.status is Status.FINISHED:
            return
        self._finish(req, "abort")

    def release(self, request_id: str) -> RequestOutput | None:
        """Forget a request: abort it if it is still running (its pages and slot are freed) and drop it from the
        engine's table. Returns its final output (finish_reason "abort" when it was cut), None for an unknown id.
        Callers that collect results call this once per request they are done with."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        if req.status is not Status.FINISHED:
            self._finish(req, "abort")
        del self.requests[request_id]
        return self.output(req)

    @property
    def backends(self) -> tuple[str, str]:
        """Names of the attention backends the prefill and decode steps run (per layer kind when they differ)."""
        return self.attention.names("prefill"), self.attention.names("decode")

    def get(self, request_id: str) -> Request | None:
        """The engine's record of a request (read-only use: scheduling state for metrics), or None."""
        return self.requests.get(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def has_step_in_flight(self) -> bool:
        """Whether a decode step was dispatched and its tokens come with the next `step()` (async scheduling)."""
        return self._inflight is not None

    @property
    def num_free_pages(self) -> int:
        """Full-attention pages an allocation can take (free or cached)."""
        return self.blocks.num_free

    @property
    def num_used_pages(self) -> int:
        """Pages in use by requests, both pools (0 when idle: cached pages are not in use)."""
        return self.blocks.full.num_used + self.blocks.window.num_used

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (vLLM's reset_prefix_cache). Running requests keep their pages."""
        self.blocks.reset()

    # ------------------------------------------------------------------------------------------------------------
    # Scheduling (serving/scheduler.py)

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def running(self) -> list[Request]:
        return self.scheduler.running

    @property
    def free_slots(self) -> list[int]:
        return self.scheduler.free_slots

    def _finish(self, req: Request, reason: str) -> None:
        self.scheduler.finish(req, reason)
        req.media = None  # its soft tokens are no longer needed
        req.matcher = None

    def _preempt(self, victim: Request) -> None:
        self.scheduler.preempt(victim)

    # ------------------------------------------------------------------------------------------------------------
    # The scheduling loop (the steps it runs: engine_steps.py)

    def step(self) -> list[RequestOutput]:
        """One scheduling iteration. Returns outputs of requests that produced tokens or finished.

        With async scheduling a plain decode step is left in flight and its tokens come with the next call, which
        first dispatches the step after it when that is the same rows' plain decode (engine_steps.py)."""
        touched: list[Request] = []
        if self._inflight is not None:
            done = self._inflight
            self._inflight = self._chain(done)
            touched = self._collect(done)
            if self._inflight is not None:
                self.stats["steps"] += 1
                return [self.output(r) for r in dict.fromkeys(touched)]
            # Collected: schedule as usual, in the same call.
        decode = self.scheduler.schedule_decode()
        prefill = self.scheduler.schedule_prefill(self.config.max_num_batched_tokens - len(decode))
        if decode and not prefill and (self.waiting or any(not r.in_decode for r in self.running)):
            # The decode rows left too little budget for the next prefill chunk (an image that must stay in one
            # chunk, or more decode rows than the budget): give the prefill this step alone, or under steady
            # decode load it would wait until the decodes finish. The decode rows keep their pages and run next.
            prefill = self.scheduler.schedule_prefill(self.config.max_num_batched_tokens)
            if prefill:
                decode = []
        if prefill:
            prefill = [(req, self._prefill_chunk(req, n)) for req, n in prefill]
            rows = [(req, req.all_ids[req.num_computed: req.num_computed + n], req.num_computed)
                    for req, n in prefill]
            result = self._run(rows, max(n for _, n in prefill), "prefill")
            for i, (req, n) in enumerate(prefill):
                self.scheduler.computed(req, n)
                self.stats["prompt_tokens"] += n
                if req.num_computed == req.num_tokens:
                    self._append(req, result, i)
                touched.append(req)
        drafts = self._propose(decode) if decode and self.proposer is not None else None
        if drafts is not None:
            self._run_verify(decode, drafts)
            touched.extend(decode)
        elif decode and not prefill and (k := self._multi_step_size(decode)) > 1:
            results = self._run_multi(decode, k)
            for j in range(k):
                step_result = jax.tree.map(lambda x, j=j: x[j], results)
                for i, req in enumerate(decode):
                    if req.status is Status.RUNNING:
                        self.scheduler.computed(req, 1)
                        self._append(req, step_result, i)
            touched.extend(decode)
        elif decode and not prefill and self._async_decode(decode):
            self._inflight = self._launch(decode)  # its tokens come with the next call
        elif decode:
            rows = [(req, [req.last_id], req.num_computed) for req in decode]
            result = self._run(rows, 1, "decode")
            for i, req in enumerate(decode):
                self.scheduler.computed(req, 1)
                self._append(req, result, i)
                touched.append(req)
        self.stats["steps"] += 1
        return [self.output(r) for r in dict.fromkeys(touched)]

    def _append(self, req: Request, result, row: int) -> None:
        if req.status is Status.FINISHED:
            return
        token = int(result.tokens[row])
        req.output_ids.append(token)
        self.stats["generated_tokens"] += 1
        if req.first_token_time is None:
            req.first_token_time = time.perf_counter()
        if req.params.logprobs is not None:
            n = req.params.logprobs
            top = [(int(i), float(v)) for i, v in zip(result.top_ids[row][:n], result.top_logprobs[row][:n])]
            req.logprobs.append(TokenLogprob(token, float(result.logprobs[row]), top))
        if req.params.return_routed_experts:  # per stage (L_s, k) -> (L_moe, k)
            req.routed.append(np.concatenate([np.asarray(ids[row]) for ids in result.routed], axis=0))
        if req.matcher is not None:
            req.matcher.consume_token(token)
        if token in req.stop_ids:
            self._end(req, "stop")
            return
        if req.detok is not None and self._emit(req, req.detok.add(token)):
            return
        if req.matcher is not None and req.matcher.is_stopped():
            self._end(req, "stop")  # the grammar is complete and allows nothing more
            return
        if len(req.output_ids) >= req.params.max_tokens or req.num_tokens >= self.max_model_len:
            self._end(req, "length")

    def _emit(self, req: Request, delta: str) -> bool:
        """Append detokenized text, holding back what may start a stop string. True when a stop string ended it."""
        if req.stopper is None:
            req.text += delta
            return False
        req.text += req.stopper.process(delta)
        if req.stopper.stopped:
            self._finish(req, "stop")
        return req.stopper.stopped

    def _end(self, req: Request, reason: str) -> None:
        """Generation ended without a stop string so far: release held text (which may still complete one)."""
        if req.detok is not None and self._emit(req, req.detok.flush()):
            return
        if req.stopper is not None:
            req.text += req.stopper.flush()
        self._finish(req, reason)

    def output(self, req: Request) -> RequestOutput:
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=list(req.prompt_ids),
            token_ids=list(req.output_ids),
            text=req.text,
            finish_reason=req.finish_reason,
            logprobs=list(req.logprobs) if req.params.logprobs is not None else None,
            finished=req.status is Status.FINISHED,
            routed_experts=np.stack(req.routed) if req.params.return_routed_experts and req.routed else None,
            spec_decode=req.spec.copy() if self.speculative is not None else None,
        )

    def run_until_done(self, progress=None) -> None:
        while self.has_unfinished():
            outs = self.step()
            if progress is not None:
                progress(outs)
