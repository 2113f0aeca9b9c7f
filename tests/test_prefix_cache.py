"""Automatic prefix caching (serving/prefix_cache.py) against caching off.

- the block pool: reference counts, LRU of released hashed pages, eviction order, reset; the longest usable hit
  needs the sliding window before it cached;
- exactness (greedy tokens equal, logprobs within 1e-4, caching on vs off): prefixes ending inside a block, on a
  block edge, before and after the sliding window, the whole prompt, a multi-turn follow-up that reuses the
  previous answer's blocks, on a PLE + KV-sharing and a keys-as-values checkpoint; under preemption and eviction;
  a prefix whose tail was evicted recomputes; speculative decoding; pp=2;
- no leak: pages in use return to 0 when idle and every page is free after a reset.
"""

from __future__ import annotations

import numpy as np
import pytest

import gemma4_jax
from gemma4_jax.serving.engine import Engine, EngineConfig
from gemma4_jax.serving.kv_cache import CacheLayout
from gemma4_jax.serving.prefix_cache import BlockPool, KVBlocks, PrefixKey
from gemma4_jax.serving.requests import Request
from gemma4_jax.serving.sampling import SamplingParams, request_key
from helpers import BYTE_VOCAB, K_EQ_V_UNTIED, PLE_KVSHARE_SOFTCAP, SHORT_WINDOW

PAGE = 4
WINDOW = SHORT_WINDOW["sliding_window"]  # 8: two pages
# One sliding pool size for caching on and off: equal layouts share compiled steps.
ENGINE = dict(page_size=PAGE, max_num_batched_tokens=16, max_num_seqs=4, max_model_len=96, num_window_pages=64)
VARIANTS = {
    "ple_kvshare": dict(PLE_KVSHARE_SOFTCAP, **SHORT_WINDOW),
    "k_eq_v": dict(K_EQ_V_UNTIED, **SHORT_WINDOW),
}
PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    return {
        name: gemma4_jax.from_pretrained(
            tiny_checkpoint(f"prefix_{name}", seed=40 + i, tokenizer=True, **overrides)[0], dtype="float32"
        )
        for i, (name, overrides) in enumerate(VARIANTS.items())
    }


def _tokens(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.RandomState(seed).randint(16, BYTE_VOCAB, size=n)]


def _run(engine: Engine, prompts: list[list[int]], params=PARAMS):
    """Generate in one batch; returns [(token ids, logprobs)] in order."""
    ids = [engine.add_request(p, params) for p in prompts]
    engine.run_until_done()
    outs = [engine.release(i) for i in ids]
    return [(o.token_ids, [t.logprob for t in o.logprobs]) for o in outs]


def _assert_same(got, want):
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(got, want, strict=True):
        assert tokens == ref_tokens
        np.testing.assert_allclose(logprobs, ref_logprobs, atol=1e-4)


def _assert_idle(engine: Engine):
    """No leak: nothing in use; after a reset every page of both pools is free and nothing is cached."""
    assert engine.num_used_pages == 0 and not engine.has_unfinished()
    engine.reset_prefix_cache()
    blocks = engine.blocks
    assert blocks.full.num_used == 0 and blocks.window.num_used == 0
    assert blocks.full.num_cached == 0 and blocks.window.num_cached == 0
    assert blocks.full.num_free == engine.layout.num_pages - 1
    assert blocks.window.num_free == engine.layout.num_window_pages - 1


# -- the pool ------------------------------------------------------------------------------------------------------


def test_block_pool_lru_eviction_and_reset():
    pool = BlockPool(6, caching=True)  # pages 1..5
    a = pool.allocate(3)
    assert a == [1, 2, 3] and pool.num_used == 3
    for page, h in zip(a, (b"x", b"y", b"z"), strict=True):
        pool.register(page, h)
    pool.register(4, b"x")  # a duplicate block keeps the first page
    assert pool.lookup(b"x") == 1
    pool.release([3, 2, 1])  # tail first: page 3 is the least recently used
    assert pool.num_used == 0 and pool.num_free == 5 and pool.num_cached == 3
    pool.share(2)  # a hit takes page 2 out of the LRU
    assert pool.num_used == 1
    got = pool.allocate(3)  # 2 free pages, then the LRU's oldest: page 3
    assert got == [4, 5, 3] and pool.evictions == 1 and pool.lookup(b"z") is None and pool.lookup(b"x") == 1
    assert pool.allocate(2) is None  # only page 1 (cached) is left
    pool.reset()
    assert pool.lookup(b"x") is None and pool.num_cached == 0 and pool.num_free == 1
    pool.release([2, 4, 5, 3])
    assert pool.num_used == 0 and pool.num_free == 5


def test_hit_needs_the_window_before_it(models):
    """The longest hit is the longest P whose full blocks *and* sliding window before P are cached."""
    cfg = models["ple_kvshare"].config.text
    layout = CacheLayout.for_config(cfg, PAGE, 64, 4, 64)
    blocks = KVBlocks(layout, caching=True)
    params = SamplingParams(max_tokens=1)

    def request(ids):
        return Request("r", None, ids, params, 0, request_key(0), prefix=PrefixKey())

    first = request(_tokens(33, 1))
    blocks.admit(first)
    assert blocks.ensure(first, 33)
    first.num_computed = 33
    blocks.commit(first)  # 8 full blocks registered; sliding pages of blocks 0..5 left the window
    assert first.window_pages[:5] == [0] * 5 and all(first.window_pages[6:])
    blocks.release(first)
    again = request(first.prompt_ids + [7])
    assert blocks.admit(again) == 32  # all 8 blocks, window blocks 6..7 cached
    blocks.release(again)
    # Lose the sliding page of block 7: a hit at 32 has no window any more, one at 28 needs blocks 5..6.
    blocks.window._page_of.pop(again.prefix.hashes[7])
    third = request(first.prompt_ids + [7])
    assert blocks.admit(third) == 28
    blocks.release(third)
    blocks.reset()
    assert blocks.full.num_used == 0 and blocks.window.num_used == 0


# -- exactness -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant",
    ["ple_kvshare", pytest.param("k_eq_v", marks=pytest.mark.slow)],  # 40-50 s each on a loaded CPU
)
def test_prefix_hits_equal_caching_off(models, variant):
    model = models[variant]
    on = Engine(model, None, EngineConfig(**ENGINE))
    off = Engine(model, None, EngineConfig(**ENGINE, enable_prefix_caching=False))
    base = [2, *_tokens(29, 5)]  # 30 tokens, past the window of 8
    first_on, first_off = _run(on, [base]), _run(off, [base])
    _assert_same(first_on, first_off)
    assert on.stats["prefix_cache_hits"] == 0 and on.stats["prefix_cache_queries"] == 30
    # Shared prefix lengths: inside a block, on a block edge, before the window, past it; the whole prompt; a
    # follow-up turn holding the first answer (its decode blocks were cached too).
    shared = {"inside": 13, "edge": 16, "before_window": 6, "after_window": 27}
    prompts = [
        base[:n] + [(base[n] + 1) % BYTE_VOCAB or 16] + _tokens(5, 10 + i) for i, n in enumerate(shared.values())
    ]
    prompts.append(list(base))
    follow_up = base + first_on[0][0] + _tokens(6, 20)
    prompts.append(follow_up)
    before = on.stats["prefix_cache_hits"]
    _assert_same(_run(on, prompts), _run(off, prompts))
    expected = [n // PAGE * PAGE for n in shared.values()] + [28, (len(base) + PARAMS.max_tokens - 1) // PAGE * PAGE]
    assert on.stats["prefix_cache_hits"] - before == sum(expected)
    assert off.stats["prefix_cache_hits"] == 0
    _assert_idle(on)
    _assert_idle(off)


def test_preemption_eviction_and_evicted_prefix(models):
    """A pool too small for the batch: requests sharing a prefix preempt each other and evict cached blocks;
    tokens still equal caching off. Then a prefix whose tail was evicted is partly hit and recomputed."""
    model = models["ple_kvshare"]
    system = [2, *_tokens(19, 7)]
    prompts = [system + _tokens(3 + i, 30 + i) for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2)
    tight = Engine(model, None, EngineConfig(**ENGINE, num_pages=25))  # 24 pages of 4 for 4 rows of ~40 tokens
    off = Engine(model, None, EngineConfig(**ENGINE, num_pages=25, enable_prefix_caching=False))
    _assert_same(_run(tight, prompts, params), _run(off, prompts, params))
    assert tight.stats["preemptions"] > 0 and tight.stats["prefix_cache_hits"] > 0
    assert tight.blocks.full.evictions > 0
    assert tight.num_used_pages == 0

    # Evict the tail of the last finished request's blocks (released tail first, so least recently used).
    tight.reset_prefix_cache()
    long = [2, *_tokens(35, 8)]
    _run(tight, [long], params)
    pool = tight.blocks.full
    grab = pool.allocate(pool.num_free - pool.num_cached + 4)  # every free page and the 4 oldest cached ones
    pool.release(grab)
    again = long + _tokens(4, 9)
    before = tight.stats["prefix_cache_hits"]
    _assert_same(_run(tight, [again], params), _run(off, [again], params))
    hit = tight.stats["prefix_cache_hits"] - before
    assert 0 < hit < len(long) // PAGE * PAGE
    _assert_idle(tight)


def test_speculative_rollback_with_caching(models):
    """Ngram drafting (rejected drafts write past the context, then roll back) with prefix hits equals plain
    decoding without caching."""
    model = models["k_eq_v"]
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    motif = _tokens(5, 11)
    system = [2, *(motif * 4)]  # repetitive: the drafter proposes often
    prompts = [system + _tokens(3, 40 + i) + motif for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    on = Engine(model, None, EngineConfig(**ENGINE, speculative_config=spec))
    off = Engine(model, None, EngineConfig(**ENGINE, enable_prefix_caching=False))
    _assert_same(_run(on, prompts[:1], params), _run(off, prompts[:1], params))
    _assert_same(_run(on, prompts[1:], params), _run(off, prompts[1:], params))
    assert on.stats["spec_num_draft_tokens"] > 0 and on.stats["prefix_cache_hits"] > 0
    _assert_idle(on)


@pytest.mark.slow  # ~2 min: the pipeline's stage programs compile per engine shape
def test_pipeline_stages_cache_their_layers(tiny_checkpoint):
    """pp=2: each stage's pools hold its own layers at the shared page ids; a hit skips both stages' prefill."""
    path = tiny_checkpoint("prefix_ple_kvshare", seed=40, tokenizer=True, **VARIANTS["ple_kvshare"])[0]
    model = gemma4_jax.from_pretrained(path, dtype="float32", pp=2)
    base = [2, *_tokens(21, 12)]
    prompts = [base + _tokens(4, 50 + i) for i in range(3)]
    on = Engine(model, None, EngineConfig(**ENGINE))
    off = Engine(model, None, EngineConfig(**ENGINE, enable_prefix_caching=False))
    _assert_same(_run(on, [base]), _run(off, [base]))
    _assert_same(_run(on, prompts), _run(off, prompts))
    assert on.stats["prefix_cache_hits"] == 3 * (len(base) // PAGE * PAGE)
    _assert_idle(on)
