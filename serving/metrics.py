"""Prometheus metrics of the HTTP server (names after vLLM's, prefixed `gemma4_jax_`).

Each server owns its registry, so several servers in one process (tests) never collide. Gauges are set by the
engine thread after every step; latencies are observed there too, at the moment outputs leave the engine.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gemma4_jax.serving.requests import SpecDecodeStats

# Seconds. Wide at both ends: a tiny CPU model answers in milliseconds, a cold compile takes tens of seconds.
_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    320.0,
)
_TOKEN_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
)


class ServerMetrics:
    """The server's Prometheus metrics in a registry of its own; `render` is the /metrics body."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "gemma4_jax_"
        self.requests_running = Gauge(p + "num_requests_running", "Requests in the running batch.", registry=r)
        self.requests_waiting = Gauge(p + "num_requests_waiting", "Requests waiting to be scheduled.", registry=r)
        self.kv_pages_used = Gauge(p + "kv_pages_used", "KV cache pages in use.", registry=r)
        self.kv_pages_total = Gauge(p + "kv_pages_total", "Usable KV cache pages.", registry=r)
        self.kv_usage = Gauge(p + "kv_cache_usage_ratio", "Fraction of KV cache pages in use.", registry=r)
        self.compiles = Gauge(p + "compilations", "Jit compilations (new bucket shapes) so far.", registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens admitted.", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated.", registry=r)
        self.request_success = Counter(
            p + "request_success", "Finished requests by finish reason.", ["finished_reason"], registry=r
        )
        self.requests_rejected = Counter(
            p + "requests_rejected", "Requests refused before admission, by reason.", ["reason"], registry=r
        )
        self.engine_errors = Counter(p + "engine_errors", "Engine steps that raised.", registry=r)
        self.ttft = Histogram(
            p + "time_to_first_token_seconds", "Arrival to first generated token.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            p + "inter_token_latency_seconds",
            "Time between consecutive generated tokens.",
            buckets=_TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            p + "e2e_request_latency_seconds", "Arrival to the last token.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_time = Histogram(
            p + "request_queue_time_seconds", "Arrival to first scheduled.", buckets=_LATENCY_BUCKETS, registry=r
        )

        # Speculative decoding (vLLM's spec_decode_* counters); they stay at 0 when the engine does not speculate.
        self.spec_drafts = Counter(p + "spec_decode_num_drafts", "Verify steps of a request with drafts.", registry=r)
        self.spec_draft_tokens = Counter(p + "spec_decode_num_draft_tokens", "Draft tokens proposed.", registry=r)
        self.spec_accepted_tokens = Counter(p + "spec_decode_num_accepted_tokens", "Draft tokens accepted.", registry=r)
        self.spec_accepted_per_pos = Counter(
            p + "spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted, by draft position.",
            ["position"],
            registry=r,
        )
        self._spec_seen = SpecDecodeStats()

        # Automatic prefix caching (vLLM's prefix_cache_queries / prefix_cache_hits, in tokens): hits / queries is
        # the hit rate.
        self.prefix_cache_queries = Counter(
            p + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", registry=r
        )
        self.prefix_cache_hits = Counter(
            p + "prefix_cache_hits", "Prompt tokens found in the prefix cache.", registry=r
        )
        self._prefix_seen = (0, 0)

    def update_spec_decode(self, stats: SpecDecodeStats | None) -> None:
        """Advance the spec_decode counters to the engine's totals (engine.spec_stats; None: not speculating)."""
        if stats is None:
            return
        seen = self._spec_seen
        self.spec_drafts.inc(stats.num_drafts - seen.num_drafts)
        self.spec_draft_tokens.inc(stats.num_draft_tokens - seen.num_draft_tokens)
        self.spec_accepted_tokens.inc(stats.num_accepted_tokens - seen.num_accepted_tokens)
        for pos, accepted in enumerate(stats.accepted_per_pos):
            before = seen.accepted_per_pos[pos] if pos < len(seen.accepted_per_pos) else 0
            self.spec_accepted_per_pos.labels(str(pos)).inc(accepted - before)
        self._spec_seen = stats.copy()

    def update_prefix_cache(self, queries: int, hits: int) -> None:
        """Advance the prefix-cache counters to the engine's totals (engine.stats)."""
        self.prefix_cache_queries.inc(queries - self._prefix_seen[0])
        self.prefix_cache_hits.inc(hits - self._prefix_seen[1])
        self._prefix_seen = (queries, hits)

    def render(self) -> bytes:
        return generate_latest(self.registry)
