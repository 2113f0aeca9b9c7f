"""The attention backend seam: the user's choice is what runs.

A recording backend (the xla math plus a host callback that logs its name, the layer kind and the query length
at run time) is registered under two names; an explicit choice, and a split prefill/decode choice, must be what
runs in `Model.logits`, in the engine (single-program and multi-step decode) and in a pipelined model, with the
same greedy tokens as `xla`. `auto` picks the cpu kernel on CPU (xla-rows where it cannot be built) and pallas
on GPU; an unknown or unavailable choice fails at
start-up. The Pallas kernels in interpret mode give the engine the tokens of `xla`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma4_jax
from gemma4_jax import SamplingParams, attention_backends
from gemma4_jax.attention_backends import AttentionBackend, XlaAttention, resolve_attention
from gemma4_jax.cpu_attention import CpuAttention
from gemma4_jax.kernels.cpu_attention import load as load_cpu_kernel
from gemma4_jax.kv_view import PagedKV
from gemma4_jax.pallas_attention import INTERPRET_ENV

CALLS: list[tuple[str, str, int]] = []  # (backend name, layer kind, query length) per layer call, at run time


@dataclasses.dataclass(frozen=True)
class RecordingAttention(AttentionBackend):
    name: str = "recording"

    def __call__(self, q, kv, q_positions, *, sliding_window, blocks):
        kind = "sliding" if sliding_window is not None else "full"
        t = q.shape[1]
        jax.debug.callback(lambda: CALLS.append((self.name, kind, t)))
        return XlaAttention()(q, kv, q_positions, sliding_window=sliding_window, blocks=blocks)


@dataclasses.dataclass(frozen=True)
class GpuOnlyAttention(AttentionBackend):
    name: str = "gpu_only"

    def unavailable(self, platform, phase, kind):
        return None if platform == "gpu" else "needs a GPU"


@pytest.fixture(scope="module", autouse=True)
def backends():
    for backend in (RecordingAttention("rec_a"), RecordingAttention("rec_b"), GpuOnlyAttention()):
        attention_backends.register(backend, auto=False)
    yield
    for name in ("rec_a", "rec_b", "gpu_only"):
        attention_backends.unregister(name)


@pytest.fixture(autouse=True)
def clear_calls():
    CALLS.clear()


ENGINE = dict(page_size=4, max_num_batched_tokens=16, max_num_seqs=4, max_model_len=96)
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPTS = [[2, *range(20, 45)], [2, 7, 9, 11, 13]]  # 26 tokens (chunked, past the window of 16) and 5


@pytest.fixture(scope="module")
def model():
    return gemma4_jax.from_config("tiny", dtype="float32", seed=3, attention_backend="xla")


@pytest.fixture(scope="module")
def pipelined():
    return gemma4_jax.from_config("tiny", dtype="float32", seed=3, pp=2)


@pytest.fixture(scope="module")
def xla_tokens(model):
    llm = gemma4_jax.LLM(model, attention_backend="xla", **ENGINE)
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def _names(phase_filter=None):
    return {name for name, _, t in CALLS if phase_filter is None or phase_filter(t)}


def test_auto_picks_the_cpu_kernel_on_cpu_and_xla_rows_without_it(monkeypatch):
    plan = resolve_attention("auto")
    want = "cpu" if load_cpu_kernel() is None else "xla-rows"
    assert {plan.backend(p, s).name for p in ("prefill", "decode") for s in (True, False)} == {want}
    assert gemma4_jax.from_config("tiny", dtype="float32").attention == plan
    # Correct anywhere, faster only on CPU: named, xla-rows runs on a GPU; auto does not pick it there.
    assert resolve_attention("xla-rows", platform="gpu").decode_full.name == "xla-rows"
    assert resolve_attention("auto", platform="gpu", log_choice=CALLS.append).decode_full.name == "pallas"
    with pytest.raises(ValueError, match="runs on CPU only"):
        resolve_attention("cpu", platform="gpu")
    # Where the kernel cannot be built, auto says why and takes xla-rows; naming it is refused with the reason.
    monkeypatch.setattr(CpuAttention, "unavailable", lambda self, platform, phase, kind: "no C++ compiler found")
    said = []
    plan = resolve_attention("auto", log_choice=said.append)
    assert plan.decode_full.name == plan.prefill_sliding.name == "xla-rows" and "no C++ compiler" in said[0]
    with pytest.raises(ValueError, match="no C\\+\\+ compiler"):
        resolve_attention("cpu")


def _paged_case(rng, b, t, kv_heads, groups, head_dim, page, pages, windowed):
    """A decode / verify / chunk step over a shuffled pool: q (B, T, N, H), a PagedKV (windowed: a start per row),
    query positions ending at each row's length (ragged)."""
    num_pages = b * pages + 1
    k_pages = rng.standard_normal((num_pages, page, kv_heads, head_dim)).astype(np.float32)
    v_pages = rng.standard_normal(k_pages.shape).astype(np.float32)
    table = (rng.permutation(num_pages - 1)[: b * pages] + 1).reshape(b, pages).astype(np.int32)
    start = (rng.integers(0, 3, b) * page).astype(np.int32) if windowed else None
    base = 0 if start is None else start
    lengths = (base + rng.integers(t, pages * page + 1, b)).astype(np.int32)
    q_pos = (lengths[:, None] - t + np.arange(t)[None]).astype(np.int32)
    q_pos[0, 0] = -1  # a padding query
    q = rng.standard_normal((b, t, kv_heads * groups, head_dim)).astype(np.float32)
    kv = PagedKV(jnp.asarray(k_pages), jnp.asarray(v_pages), jnp.asarray(table), jnp.asarray(lengths),
                 dtype=jnp.float32, start=None if start is None else jnp.asarray(start))
    return jnp.asarray(q), kv, jnp.asarray(q_pos)


@pytest.mark.parametrize("b,t,windowed,with_blocks", [(8, 1, False, False), (8, 3, True, False), (6, 2, True, True),
                                                      (3, 1, False, False)])
def test_xla_rows_matches_xla(b, t, windowed, with_blocks):
    """xla-rows (blocks of rows through lax.map, pools read whole) == xla on paged and dense views, windowed tables,
    vision blocks, row counts that its block size divides (8), only partly (6: blocks of 2) and not at all (3)."""
    rng = np.random.default_rng(b * 10 + t)
    q, kv, q_pos = _paged_case(rng, b, t, kv_heads=2, groups=2, head_dim=16, page=4, pages=5, windowed=windowed)
    blocks = None
    if with_blocks:  # an image block of keys 8..11 in every row; queries inside it see all of it
        key_pos = np.asarray(kv.key_positions())
        key_blocks = np.where((key_pos >= 8) & (key_pos < 12), 0, -1).astype(np.int32)
        q_blocks = np.where((np.asarray(q_pos) >= 8) & (np.asarray(q_pos) < 12), 0, -1).astype(np.int32)
        blocks = (jnp.asarray(q_blocks), jnp.asarray(key_blocks))
    rows = attention_backends.get("xla-rows")
    assert rows.rows == 4
    for view in (kv, kv.dense()):
        for window in (None, 6):
            want = XlaAttention()(q, view, q_pos, sliding_window=window, blocks=blocks)
            got = jax.jit(lambda q, view, q_pos, blocks, window=window: rows(
                q, view, q_pos, sliding_window=window, blocks=blocks))(q, view, q_pos, blocks)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_pallas_is_autos_choice_on_gpu_and_refused_on_cpu_unless_interpreted(monkeypatch):
    monkeypatch.delenv(INTERPRET_ENV, raising=False)
    plan = resolve_attention("auto", platform="gpu")
    assert {plan.backend(p, s).name for p in ("prefill", "decode") for s in (True, False)} == {"pallas"}
    with pytest.raises(ValueError, match=r"decode attention backend 'pallas' is not supported on cpu .*need a GPU"):
        resolve_attention("xla", decode_backend="pallas", platform="cpu")
    assert "pallas" not in attention_backends.supported_names("cpu")
    assert resolve_attention("pallas-interpret", platform="cpu").decode_full.interpret
    monkeypatch.setenv(INTERPRET_ENV, "1")
    assert resolve_attention("pallas", platform="cpu").prefill_sliding.name == "pallas"


def test_unknown_or_unavailable_choice_fails_at_start(model):
    with pytest.raises(ValueError, match=r"decode attention backend 'nope' is not supported on cpu.*unknown"):
        gemma4_jax.LLM(model, decode_backend="nope", **ENGINE)
    with pytest.raises(ValueError, match=r"prefill attention backend 'gpu_only' is not supported on cpu \(sliding "
                                         r"layers: needs a GPU\); supported: \['auto', 'xla'"):
        gemma4_jax.LLM(model, attention_backend="gpu_only", **ENGINE)
    with pytest.raises(ValueError, match="needs a GPU"):
        gemma4_jax.from_config("tiny", attention_backend="gpu_only")
    assert "gpu_only" not in attention_backends.supported_names("cpu")
    assert "gpu_only" in attention_backends.supported_names("gpu")


def test_model_logits_runs_the_chosen_backend(model):
    ids = np.array([PROMPTS[0]])
    want = np.asarray(model.logits(ids))
    chosen = gemma4_jax.from_config("tiny", dtype="float32", seed=3, attention_backend="rec_a")
    got = np.asarray(chosen.logits(ids))
    np.testing.assert_array_equal(got, want)
    assert _names() == {"rec_a"}
    assert {kind for _, kind, _ in CALLS} == {"sliding", "full"}
    assert len(CALLS) == len(chosen.config.text.layers)  # every layer called the backend once


@pytest.mark.parametrize("steps", [1, 3])
def test_engine_runs_the_split_choice(model, xla_tokens, steps):
    llm = gemma4_jax.LLM(model, prefill_backend="rec_a", decode_backend="rec_b", num_scheduler_steps=steps,
                         **ENGINE)
    assert llm.engine.backends == ("rec_a", "rec_b")
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == xla_tokens
    # Prefill chunks (T > 1 here) ran rec_a only; decode steps ran rec_b only, on both layer kinds.
    assert _names(lambda t: t > 1) == {"rec_a"}
    assert {(name, kind) for name, kind, t in CALLS if name == "rec_b"} == {("rec_b", "sliding"), ("rec_b", "full")}
    assert all(t == 1 for name, _, t in CALLS if name == "rec_b")
    assert _names() == {"rec_a", "rec_b"}


def test_engine_runs_one_explicit_choice(model, xla_tokens):
    llm = gemma4_jax.LLM(model, attention_backend="rec_b", **ENGINE)
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == xla_tokens
    assert _names() == {"rec_b"}


@pytest.mark.slow  # ~40 s: compiles a pipelined model; the engine and model tests stay fast
def test_pipelined_model_runs_the_choice(pipelined, model, xla_tokens):
    ids = np.array([PROMPTS[0]])
    pipelined.attention = resolve_attention("rec_a")
    try:
        got = np.asarray(pipelined.logits(ids))
    finally:
        pipelined.attention = resolve_attention("xla")
    np.testing.assert_allclose(got, np.asarray(model.logits(ids)), rtol=1e-5, atol=1e-5)
    assert _names() == {"rec_a"} and len(CALLS) == len(pipelined.config.text.layers)
    CALLS.clear()
    llm = gemma4_jax.LLM(pipelined, prefill_backend="rec_b", decode_backend="rec_a", **ENGINE)
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == xla_tokens
    assert _names(lambda t: t > 1) == {"rec_b"}
    assert all(name == "rec_a" for name, _, t in CALLS if t == 1 and name != "rec_b") and "rec_a" in _names()


def test_model_logits_with_the_pallas_kernels(model):
    """The kernel behind the identity store (dense views, prefill tiles, vision-free causal and window masks)."""
    ids = np.array([PROMPTS[0], [*PROMPTS[1], *range(50, 71)]])
    chosen = gemma4_jax.from_config("tiny", dtype="float32", seed=3, attention_backend="pallas-interpret")
    np.testing.assert_allclose(np.asarray(chosen.logits(ids)), np.asarray(model.logits(ids)), rtol=5e-4, atol=5e-4)


@pytest.mark.slow
def test_engine_with_the_pallas_kernels_gives_the_xla_tokens(model, xla_tokens):
    """The kernel backend end to end (interpret mode): chunked prefill over the paged pools and the rings (ring plus
    chunk past the window), then decode, with the greedy tokens of xla."""
    llm = gemma4_jax.LLM(model, attention_backend="pallas-interpret", **ENGINE)
    assert llm.engine.backends == ("pallas-interpret", "pallas-interpret")
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == xla_tokens


NEEDS_CPU_KERNEL = pytest.mark.skipif(load_cpu_kernel() is not None, reason=f"no CPU kernel: {load_cpu_kernel()}")


@NEEDS_CPU_KERNEL
def test_model_logits_with_the_cpu_kernel(model):
    """The custom call behind the identity store (dense views: whole prompts, causal and window masks)."""
    ids = np.array([PROMPTS[0], [*PROMPTS[1], *range(50, 71)]])
    chosen = gemma4_jax.from_config("tiny", dtype="float32", seed=3, attention_backend="cpu")
    np.testing.assert_allclose(np.asarray(chosen.logits(ids)), np.asarray(model.logits(ids)), rtol=5e-5, atol=5e-5)


@NEEDS_CPU_KERNEL
@pytest.mark.parametrize("steps", [1, 3])
def test_engine_with_the_cpu_kernel_gives_the_xla_tokens(model, xla_tokens, steps):
    """Chunked prefill over the paged pools and the windowed sliding tables, then decode (one step per call and
    a multi-step scan), through the custom call: the greedy tokens of xla."""
    llm = gemma4_jax.LLM(model, attention_backend="cpu", num_scheduler_steps=steps, **ENGINE)
    assert llm.engine.backends == ("cpu", "cpu")
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == xla_tokens


@NEEDS_CPU_KERNEL
def test_engine_with_the_cpu_kernel_in_bfloat16():
    """bfloat16 pools stored as uint16 bits, read by the custom call without a bit cast of the pool: the greedy
    tokens of xla on the same bfloat16 weights."""
    model = gemma4_jax.from_config("tiny", dtype="bfloat16", seed=3)
    tokens = {}
    for name in ("xla", "cpu"):
        llm = gemma4_jax.LLM(model, attention_backend=name, **ENGINE)
        tokens[name] = [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert tokens["cpu"] == tokens["xla"]
