"""Attention backends: the seam between the one forward and the attention op (DESIGN.md decision 4).

The forward (forward.py) computes q per layer, has the K/V store write k, v and return a view of the keys the layer
attends over (kv_view.py: dense, paged pool or ring, read in place by a kernel), and hands both to the backend that
the `AttentionPlan` names for the step's phase ("prefill": a full-sequence forward or a prefill chunk; "decode": one
new token per row) and the layer's kind (sliding or full). A backend gets positions, not a mask, so a kernel can
build causal / window / bidirectional-block masking inside its tiles instead of reading a (B, T, S) mask.

`xla` (plain XLA einsums over the gathered keys, `KVView.dense()`) is the reference and runs everywhere; `pallas`
(pallas_attention.py: the paged-attention kernel reading the pools in place) is auto's choice on GPU and
`pallas-interpret` runs that kernel in interpret mode anywhere; on CPU `cpu` (cpu_attention.py: a C++ custom call
reading the pools in place) is auto's choice, and `xla-rows` where it cannot be built. Other backends join the
registry with `register`;
`resolve_attention` turns a user's choice (auto, one name, or separate prefill and decode names, as SGLang's
--prefill-attention-backend / --decode-attention-backend) into a plan, refusing at start-up a name that is unknown
or cannot run on this platform, and logging what `auto` picked and why.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import jax

from gemma4_jax.attention import attention_mask, reference_attention
from gemma4_jax.cpu_attention import CpuAttention
from gemma4_jax.kv_view import AttentionBackend, DenseKV, KVView, PagedKV  # noqa: F401 (AttentionBackend, KVView: re-exported)
from gemma4_jax.pallas_attention import PallasAttention

log = logging.getLogger(__name__)

PHASES = ("prefill", "decode")
KINDS = ("sliding", "full")


@dataclasses.dataclass(frozen=True)
class XlaAttention(AttentionBackend):
    """The reference: the view gathered (`KVView.dense()`), a (B, T, S) mask from positions and
    `reference_attention` (float32 logits and softmax)."""

    name: str = "xla"

    def __call__(self, q, kv, q_positions, *, sliding_window, blocks):
        dense = kv.dense()
        mask = attention_mask(q_positions, dense.positions, sliding_window, blocks)
        return reference_attention(q, dense.k, dense.v, mask, scale=1.0)


@dataclasses.dataclass(frozen=True)
class XlaRowsAttention(AttentionBackend):
    """The reference's math a few rows at a time (`jax.lax.map` over blocks of `rows` rows): each block gathers
    its rows' keys from the pool and consumes them while they are still in cache, instead of the whole batch's
    gathered, transposed keys making three trips through memory. Same dots per row as `xla`, so the same numbers
    (bit for bit with rows >= 2 on CPU; tests/test_attention_backends.py). auto's choice on CPU where the `cpu`
    kernel cannot be built: a bench-100m decode step's attention costs ~3x less CPU time at 64 rows than with
    `xla` (docs/benchmarks.md). Off CPU the kernels or one
    batched `xla` call are better, so auto does not pick it there."""

    name: str = "xla-rows"
    rows: int = 4

    def auto_platforms(self) -> tuple[str, ...] | None:
        return ("cpu",)

    def __call__(self, q, kv, q_positions, *, sliding_window, blocks):
        b = q.shape[0]
        rows = math.gcd(b, self.rows)  # the engine's row buckets are powers of two: rows itself in practice
        if b <= rows or rows == 1:
            return XlaAttention()(q, kv, q_positions, sliding_window=sliding_window, blocks=blocks)
        if isinstance(kv, PagedKV):  # the pools stay whole (loop invariants); the tables are cut by row
            per_row = (kv.page_table, kv.lengths, kv.start)

            def view(part):
                return PagedKV(kv.k_pages, kv.v_pages, part[0], part[1], dtype=kv.dtype, start=part[2])
        else:
            per_row = (kv.k, kv.v, kv.positions)

            def view(part):
                return DenseKV(*part)

        def one(xs):
            q_r, pos_r, part, blk = xs
            return XlaAttention()(q_r, view(part), pos_r, sliding_window=sliding_window, blocks=blk)

        blocked = jax.tree.map(lambda x: x.reshape(b // rows, rows, *x.shape[1:]), (q, q_positions, per_row, blocks))
        out = jax.lax.map(one, blocked)  # (B / rows, rows, T, N, H)
        return out.reshape(q.shape)


_REGISTRY: dict[str, AttentionBackend] = {}
# `auto` tries these in order per (phase, kind) and takes the first available; kernels register ahead of xla.
_AUTO_ORDER: list[str] = []


def register(backend: AttentionBackend, auto: bool = True) -> None:
    """Add a backend under `backend.name`. auto=True: `auto` prefers it (latest registered first) where it is
    available; xla stays the fallback."""
    _REGISTRY[backend.name] = backend
    if backend.name in _AUTO_ORDER:
        _AUTO_ORDER.remove(backend.name)
    if auto:
        _AUTO_ORDER.insert(0, backend.name)


def unregister(name: str) -> None:
    """Remove a registered backend (tests that register their own)."""
    _REGISTRY.pop(name, None)
    if name in _AUTO_ORDER:
        _AUTO_ORDER.remove(name)


def registered() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str) -> AttentionBackend:
    if name not in _REGISTRY:
        raise ValueError(f"attention backend {name!r} is unknown; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


register(XlaAttention(), auto=False)
_AUTO_ORDER.append("xla")
# On CPU, auto's choice ahead of xla (see XlaRowsAttention); the kernels, registered after it, come first.
register(XlaRowsAttention())
# The CPU kernel (cpu_attention.py): auto's choice on CPU wherever it builds, ahead of xla-rows.
register(CpuAttention())
# The Pallas kernels: `pallas` is auto's first choice wherever it can run (GPU, or interpret mode on request);
# `pallas-interpret` runs the same kernel in interpret mode anywhere, for tests, and only when named.
register(PallasAttention())
register(PallasAttention(name="pallas-interpret", interpret=True), auto=False)


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """Which backend runs each (phase, layer kind). Hashable: a static argument of every jitted forward."""

    prefill_sliding: AttentionBackend
    prefill_full: AttentionBackend
    decode_sliding: AttentionBackend
    decode_full: AttentionBackend

    def backend(self, phase: str, sliding: bool) -> AttentionBackend:
        return getattr(self, f"{phase}_{'sliding' if sliding else 'full'}")

    def names(self, phase: str) -> str:
        """'xla', or 'sliding=a,full=b' when the layer kinds differ."""
        s, f = self.backend(phase, True).name, self.backend(phase, False).name
        return s if s == f else f"sliding={s},full={f}"

    @staticmethod
    def uniform(backend: AttentionBackend | str) -> AttentionPlan:
        b = get(backend) if isinstance(backend, str) else backend
        return AttentionPlan(b, b, b, b)


def supported_names(platform: str | None = None) -> list[str]:
    """'auto' plus every registered backend that serves at least one (phase, kind) on the platform."""
    platform = platform or jax.default_backend()
    ok = [n for n, b in _REGISTRY.items() if any(b.unavailable(platform, p, k) is None for p in PHASES for k in KINDS)]
    return ["auto", *ok]


def resolve_attention(attention_backend: str = "auto", prefill_backend: str | None = None,
                      decode_backend: str | None = None, platform: str | None = None,
                      log_choice: Callable[[str], None] | None = None) -> AttentionPlan:
    """The user's choice -> an AttentionPlan, checked now (start-up), not at the first step.

    attention_backend applies to both phases unless prefill_backend / decode_backend name one. "auto" picks, per
    phase and layer kind, the first available registered backend in preference order (kernels before xla). An
    explicit name that is unknown, or cannot run one of the (phase, kind) pairs on this platform, raises
    ValueError naming the supported ones.
    """
    platform = platform or jax.default_backend()
    say = log_choice or log.info
    chosen: dict[str, AttentionBackend] = {}
    skipped: list[str] = []
    for phase, value in (("prefill", prefill_backend), ("decode", decode_backend)):
        value = value or attention_backend or "auto"
        for kind in KINDS:
            if value == "auto":
                for name in _AUTO_ORDER:
                    reason = _REGISTRY[name].unavailable(platform, phase, kind)
                    prefers = _REGISTRY[name].auto_platforms()
                    if reason is None and prefers is not None and platform not in prefers:
                        reason = f"auto picks it only on {', '.join(prefers)}"
                    if reason is None:
                        chosen[f"{phase}_{kind}"] = _REGISTRY[name]
                        break
                    skipped.append(f"{name} for {phase}/{kind}: {reason}")
                continue
            backend = _REGISTRY.get(value)
            reason = "unknown backend" if backend is None else backend.unavailable(platform, phase, kind)
            if reason is not None:
                raise ValueError(f"{phase} attention backend {value!r} is not supported on {platform} ({kind} "
                                 f"layers: {reason}); supported: {supported_names(platform)}")
            chosen[f"{phase}_{kind}"] = backend
    plan = AttentionPlan(**chosen)
    asked = {"prefill": prefill_backend or attention_backend, "decode": decode_backend or attention_backend}
    say(f"attention backends on {platform}: prefill {plan.names('prefill')} ({asked['prefill']}), decode "
        f"{plan.names('decode')} ({asked['decode']})" + (f"; auto skipped {'; '.join(skipped)}" if skipped else ""))
    return plan
