"""The serving engine against HF transformers and against itself.

- greedy generation equals HF `generate` token for token (mixed prompt lengths in one call, prompts longer than
  the sliding window, outputs running past it, chunked prefill, KV sharing, keys-as-values, MoE);
- prefill-then-decode equals a full-sequence forward; chunked prefill equals unchunked; a preempted and resumed
  request gives the same tokens; seeded sampling is reproducible and independent of batch mates;
- stop conditions, chat template with exactly one BOS, backend choice, abort, bad requests, no recompiles.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

import gemma4_jax
from gemma4_jax import SamplingParams
from helpers import BYTE_VOCAB, K_EQ_V_UNTIED, MOE, PLE_KVSHARE_SOFTCAP, SHORT_WINDOW
from hf_reference import hf_greedy

ENGINE = dict(page_size=4, max_num_batched_tokens=16, max_num_seqs=8, max_model_len=128)

VARIANTS = {  # the recipes of tests/helpers.py, each with a window of 8 that long prompts and outputs outrun
    "ple_kvshare_window": dict(PLE_KVSHARE_SOFTCAP, **SHORT_WINDOW, use_double_wide_mlp=True),
    "k_eq_v_untied": dict(K_EQ_V_UNTIED, **SHORT_WINDOW),
    "moe": dict(MOE, **SHORT_WINDOW),
}


@pytest.fixture(scope="module")
def ckpts(tiny_checkpoint):
    return {name: tiny_checkpoint(f"engine_{name}", seed=20 + i, tokenizer=True, **overrides)
            for i, (name, overrides) in enumerate(VARIANTS.items())}


@pytest.fixture(scope="module")
def llm(ckpts):
    return gemma4_jax.LLM(ckpts["ple_kvshare_window"][0], dtype="float32", **ENGINE)


def _prompts(lengths, seed=0):
    rs = np.random.RandomState(seed)
    return [[2] + list(rs.randint(16, BYTE_VOCAB, size=n - 1)) for n in lengths]


GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_matches_hf_generate(ckpts, variant):
    path, hf = ckpts[variant]
    engine = gemma4_jax.LLM(path, dtype="float32", **ENGINE)
    prompts = _prompts([5, 13, 30, 41])  # window 8, chunk budget 16: long prompts are chunked and outrun the window
    outs = engine.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.finish_reason == "length"
        assert out.token_ids == hf_greedy(hf, prompt, 24), f"prompt of {len(prompt)} tokens diverged from HF"


def test_prefill_then_decode_equals_full_forward(llm, ckpts):
    prompts = _prompts([9, 27])
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3),
                        use_tqdm=False)
    model = gemma4_jax.from_pretrained(ckpts["ple_kvshare_window"][0], dtype="float32")
    for prompt, out in zip(prompts, outs):
        seq = prompt + out.token_ids
        logits = np.asarray(model.logits([seq]))[0].astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
            row = logp[len(prompt) - 1 + i]
            assert tok == int(np.argmax(row))
            assert lp.logprob == pytest.approx(row[tok], abs=2e-4)
            assert [t for t, _ in lp.top] == list(np.argsort(-row)[:3])


def test_chunked_prefill_equals_unchunked(ckpts):
    path = ckpts["ple_kvshare_window"][0]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=0)
    prompts = _prompts([37, 22], seed=3)
    a = gemma4_jax.LLM(path, dtype="float32", **{**ENGINE, "max_num_batched_tokens": 5}).generate(
        prompts, params, use_tqdm=False)
    b = gemma4_jax.LLM(path, dtype="float32", **{**ENGINE, "max_num_batched_tokens": 256}).generate(
        prompts, params, use_tqdm=False)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        np.testing.assert_allclose([t.logprob for t in x.logprobs], [t.logprob for t in y.logprobs], atol=1e-4)


def test_preempted_requests_resume_identically(ckpts):
    path = ckpts["ple_kvshare_window"][0]
    prompts = _prompts([10, 12, 9, 11], seed=4)
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=5, max_tokens=20, ignore_eos=True)] * 2
    roomy = gemma4_jax.LLM(path, dtype="float32", **ENGINE).generate(prompts, params, use_tqdm=False)
    tight = gemma4_jax.LLM(path, dtype="float32", **{**ENGINE, "num_pages": 17})  # 16 usable pages of 4 tokens
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert tight.engine.stats["preemptions"] > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]
    assert tight.engine.num_used_pages == 0


def test_seeded_sampling_reproducible_and_independent_of_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    prompt = _prompts([11], seed=5)[0]
    alone = llm.generate([prompt], params, use_tqdm=False)[0].token_ids
    mates = _prompts([4, 19, 7], seed=6)
    mixed = llm.generate(mates[:2] + [prompt] + mates[2:],
                         [SamplingParams(temperature=0.7, max_tokens=9), SamplingParams(temperature=0.0, max_tokens=30),
                          params, SamplingParams(temperature=1.2, top_k=5, max_tokens=16)], use_tqdm=False)[2].token_ids
    assert alone == mixed
    other = llm.generate([prompt], SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=16, ignore_eos=True),
                         use_tqdm=False)[0].token_ids
    assert other != alone


def test_stop_conditions(llm):
    prompt = _prompts([8], seed=7)[0]
    free = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
                        use_tqdm=False)[0]
    # A stop token id ends generation and is kept as the last token (as vLLM does).
    stop_at = free.token_ids[5]
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[stop_at]),
                       use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[: free.token_ids.index(stop_at) + 1]
    # A stop string is cut from the text.
    text = free.text
    if len(text) >= 4:
        needle = text[2:4]
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, stop=[needle], ignore_eos=True),
                           use_tqdm=False)[0]
        assert out.finish_reason == "stop" and out.text == text[: text.index(needle)]
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3


def test_chat_has_exactly_one_bos(llm):
    outs = llm.chat([[{"role": "user", "content": "Hi there"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "¿Qué tal? 你好"}]],
                    SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    for out in outs:
        assert out.prompt_token_ids[0] == 2 and out.prompt_token_ids.count(2) == 1
    text_out = llm.generate(["<bos>Hello"], SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)[0]
    assert text_out.prompt_token_ids.count(2) == 1


def test_backend_choice(ckpts):
    path = ckpts["ple_kvshare_window"][0]
    with pytest.raises(ValueError, match=r"decode attention backend 'pallas' is not supported.*'xla'"):
        gemma4_jax.LLM(path, dtype="float32", decode_backend="pallas")
    llm = gemma4_jax.LLM(path, dtype="float32", prefill_backend="xla", decode_backend="auto")
    # auto on CPU: the cpu kernel, or xla-rows where it cannot be built
    from gemma4_jax.kernels.cpu_attention import load
    assert llm.engine.backends == ("xla", "cpu" if load() is None else "xla-rows")


def test_abort_frees_pages(llm):
    engine = llm.engine
    ids = [engine.add_request(p, SamplingParams(max_tokens=50, ignore_eos=True)) for p in _prompts([20, 30, 6])]
    for _ in range(4):
        engine.step()
    assert engine.num_used_pages > 0
    for rid in ids:
        engine.abort(rid)
        engine.requests.pop(rid)
    assert engine.num_used_pages == 0 and not engine.has_unfinished()
    assert len(engine.free_slots) == engine.config.max_num_seqs


def test_bad_requests(llm):
    with pytest.raises(ValueError, match=r"prompt of 120 tokens plus max_tokens=16 exceeds max_model_len=128"):
        llm.generate([[2] * 120], SamplingParams(max_tokens=16), use_tqdm=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[2, 999]], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    assert not llm.engine.has_unfinished()


def test_no_recompiles_in_steady_state(llm):
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm.generate(_prompts([12, 12]), params, use_tqdm=False)
    before = llm.engine.stats["compiles"]
    llm.generate(_prompts([12, 12], seed=9), params, use_tqdm=False)
    assert llm.engine.stats["compiles"] == before


def test_n_copies_and_penalties(llm):
    prompt = _prompts([6], seed=8)[0]
    outs = llm.generate([prompt], SamplingParams(temperature=1.0, n=3, seed=3, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)
    assert len(outs) == 3 and len({tuple(o.token_ids) for o in outs}) > 1
    plain = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
                         use_tqdm=False)[0].token_ids
    penalised = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                                                      frequency_penalty=2.0, repetition_penalty=1.5),
                             use_tqdm=False)[0].token_ids
    assert len(set(penalised)) >= len(set(plain))
    assert penalised != plain or len(set(plain)) == len(plain)


def test_multi_step_decode_equals_single_step(ckpts):
    """Several decode steps per host round-trip give the same tokens, stops and text as one step at a time."""
    path, hf = ckpts["ple_kvshare_window"]
    prompts = _prompts([7, 19, 12], seed=11)
    params = [SamplingParams(temperature=0.0, max_tokens=21, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=4, max_tokens=17, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=30)]
    single_llm = gemma4_jax.LLM(path, dtype="float32", **ENGINE)
    single = single_llm.generate(prompts, params, use_tqdm=False)
    multi_llm = gemma4_jax.LLM(path, dtype="float32", **ENGINE, num_scheduler_steps=4)
    multi = multi_llm.generate(prompts, params, use_tqdm=False)
    assert multi_llm.engine.stats["steps"] < single_llm.engine.stats["steps"]
    for a, b in zip(single, multi):
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
    assert multi[0].token_ids == hf_greedy(hf, prompts[0], 21)
    assert multi_llm.engine.num_used_pages == 0


def test_multi_step_decode_with_a_queue_behind_full_slots():
    """Requests waiting for a slot do not turn multi-step decode off: none of them can start before a running row
    finishes (finishing rows take single steps), so the running row decodes several steps per call; the tokens
    equal one step at a time. (Before, any waiting request forced single steps: a batch-1 run over a queue of
    prompts never used the option.)"""
    from gemma4_jax.serving.engine import Engine, EngineConfig

    model = gemma4_jax.from_config("tiny", dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True)
    runs = {}
    for steps in (1, 4):
        engine = Engine(model, config=EngineConfig(max_num_seqs=1, page_size=8, num_pages=32, max_model_len=64,
                                                   num_scheduler_steps=steps, async_scheduling=False))
        for i in range(3):
            engine.add_request([2, 10 + i, 20 + i, 30 + i], params, request_id=f"r{i}")
        done = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.token_ids
        runs[steps] = (engine.stats["steps"], done)
    (single_steps, single), (multi_steps, multi) = runs[1], runs[4]
    assert multi == single and len(multi) == 3
    assert single_steps == 3 * 13  # a prefill (first token) and 12 decode steps per request
    assert multi_steps <= 3 * (1 + 3 + 3)  # 4-step calls until fewer than 4 tokens are left


def _async_params(free_ids: list[int], free_text: str) -> list[SamplingParams]:
    """A mix for async scheduling: greedy and seeded rows, logprobs, penalties, a stop id, a stop string, EOS."""
    return [SamplingParams(temperature=0.0, max_tokens=21, ignore_eos=True),
            SamplingParams(temperature=0.9, seed=4, max_tokens=17, ignore_eos=True, logprobs=3),
            SamplingParams(temperature=0.0, max_tokens=30),
            SamplingParams(temperature=1.0, top_k=5, seed=7, max_tokens=14, ignore_eos=True, frequency_penalty=1.0,
                           presence_penalty=0.5),
            SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[free_ids[6]]),
            SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=[free_text[3:5]])]


def _generated(out) -> tuple:
    logprobs = [(t.token_id, round(t.logprob, 5)) for t in out.logprobs] if out.logprobs is not None else None
    return out.token_ids, out.text, out.finish_reason, logprobs


@pytest.mark.parametrize("num_pages", [None, 17], ids=["roomy", "preempting"])
def test_async_scheduling_equals_synchronous(ckpts, num_pages):
    """Async scheduling (the next decode step dispatched before the last one's tokens are collected: engine_steps.py)
    gives the same tokens, text, logprobs and finish reasons as synchronous steps, with stop ids and strings ending
    rows while their next step is in flight, penalties, seeded sampling (the RNG counter of a chained step counts
    the in-flight token), the sliding window's pages, and preemption in a tight pool; and it does chain steps."""
    path = ckpts["ple_kvshare_window"][0]
    prompts = _prompts([7, 19, 12, 5, 9, 11], seed=13)
    options = {**ENGINE, "num_pages": num_pages} if num_pages else ENGINE
    sync = gemma4_jax.LLM(path, dtype="float32", **options, async_scheduling=False)
    free = sync.generate(prompts[4:], GREEDY, use_tqdm=False)  # the stop id's and stop string's rows, unstopped
    params = _async_params(free[0].token_ids, free[1].text)
    want = [_generated(o) for o in sync.generate(prompts, params, use_tqdm=False)]
    assert sync.engine.stats["chained_steps"] == 0
    overlapped = gemma4_jax.LLM(path, dtype="float32", **options)  # async scheduling is the default here
    got = [_generated(o) for o in overlapped.generate(prompts, params, use_tqdm=False)]
    assert got == want
    assert [g[2] for g in got][4:] == ["stop", "stop"]
    stats = overlapped.engine.stats
    assert stats["chained_steps"] > 10 and (num_pages is None or stats["preemptions"] > 0)
    assert overlapped.engine.num_used_pages == 0 and overlapped.engine._inflight is None


def test_async_scheduling_abort_and_arrival_in_flight(llm):
    """A request aborted while its step is in flight gets no token from it and is not reported again; one that
    arrives meanwhile starts at the next call; the others' tokens equal synchronous steps."""
    from gemma4_jax.serving.engine import Engine, EngineConfig

    prompts = _prompts([6, 9, 8], seed=21)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    runs = {}
    for overlap in (False, True):
        engine = Engine(llm.model, config=EngineConfig(**ENGINE, async_scheduling=overlap))
        engine.add_request(prompts[0], params, request_id="a")
        engine.add_request(prompts[1], params, request_id="b")
        for _ in range(4):
            engine.step()
        assert (engine._inflight is not None) == overlap
        engine.abort("b")
        engine.add_request(prompts[2], params, request_id="c")
        done, seen_after_abort = {}, []
        while engine.has_unfinished():
            for out in engine.step():
                seen_after_abort.append(out.request_id)
                if out.finished:
                    done[out.request_id] = out.token_ids
        assert "b" not in seen_after_abort and engine.output(engine.get("b")).finish_reason == "abort"
        runs[overlap] = (done, engine.get("b").output_ids)
    (sync_done, sync_b), (async_done, async_b) = runs[False], runs[True]
    assert async_done == sync_done and set(sync_done) == {"a", "c"}
    # The aborted row's in-flight token was dropped: it has what was collected before, a prefix of the sync run's.
    assert async_b == sync_b[: len(async_b)] and len(async_b) == len(sync_b) - 1


def test_async_scheduling_option():
    """On by default where it applies; True where it does not is refused with the reason; auto turns it off."""
    from gemma4_jax.serving.engine import Engine, EngineConfig

    model = gemma4_jax.from_config("tiny", dtype="float32")
    small = dict(max_num_seqs=2, page_size=8, num_pages=32, max_model_len=64)
    assert Engine(model, config=EngineConfig(**small)).async_scheduling
    assert not Engine(model, config=EngineConfig(**small, async_scheduling=False)).async_scheduling
    assert not Engine(model, config=EngineConfig(**small, num_scheduler_steps=4)).async_scheduling
    with pytest.raises(ValueError, match=r"async_scheduling=True does not apply here: num_scheduler_steps > 1"):
        Engine(model, config=EngineConfig(**small, num_scheduler_steps=4, async_scheduling=True))
    spec = {"method": "ngram", "num_speculative_tokens": 2}
    with pytest.raises(ValueError, match=r"async_scheduling=True does not apply here: speculative decoding"):
        Engine(model, config=EngineConfig(**small, speculative_config=spec, async_scheduling=True))
    with pytest.raises(ValueError, match=r"async_scheduling must be True, False or None"):
        Engine(model, config=EngineConfig(**small, async_scheduling="yes"))


def test_engine_keeps_freed_host_memory_on_cpu(tmp_path, monkeypatch):
    """On CPU the engine sets glibc's malloc to keep freed memory (serving/host_memory.py), in a process of its own
    (the suite's process runs with it off): a batch-64 decode step over a 32k vocabulary (> 32 MB of temporaries,
    past glibc's largest mmap threshold) then takes no page faults once warm (the median step, so that one step
    the host's own work lands on does not decide it), where the default settings fault on every page its
    temporaries write, and the tokens are the same either way; a value of the switch other than 0
    or 1 is refused by name. The same process puts the weights on huge pages (GEMMA4_JAX_HUGE_PAGE_WEIGHTS)."""
    import subprocess
    import sys

    from gemma4_jax.serving import host_memory

    script = tmp_path / "faults.py"
    script.write_text(
        "import json, resource, sys\n"
        "import gemma4_jax\n"
        "from gemma4_jax.serving.engine import Engine, EngineConfig\n"
        "from gemma4_jax.serving.sampling import SamplingParams\n"
        "from gemma4_jax.serving import host_memory\n"
        "from gemma4_jax.config import config_from_dict, preset_dict\n"
        "cfg = dict(preset_dict('tiny'), vocab_size=32768, vocab_size_per_layer_input=32768)\n"
        "model = gemma4_jax.from_config(config_from_dict(cfg), dtype='float32')\n"
        "engine = Engine(model, config=EngineConfig(max_num_seqs=64, page_size=8, num_pages=600, max_model_len=64))\n"
        "params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)\n"
        "def run(tag):\n"
        "    for i in range(64):\n"
        "        engine.add_request([2, 10 + i, 20 + i], params, request_id=f'{tag}{i}')\n"
        "    out, faults = {}, []\n"
        "    while engine.has_unfinished():\n"
        "        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "        decode = all(r.in_decode for r in engine.running) and not engine.waiting\n"
        "        for o in engine.step():\n"
        "            if o.finished: out[o.request_id[len(tag):]] = o.token_ids\n"
        "        if decode:\n"
        "            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
        "    return out, sorted(faults)[len(faults) // 2]\n"
        "run('w')\n"
        "engine.huge_pages.wait()\n"
        "tokens, faults = run('t')\n"
        "print(json.dumps({'applied': host_memory.keep_freed_memory(), 'faults': faults, 'tokens': tokens,\n"
        "                  'huge': engine.huge_pages.collapsed_bytes}))\n")

    def run(value):
        env = dict(os.environ, GEMMA4_JAX_KEEP_FREED_MEMORY=value, GEMMA4_JAX_HUGE_PAGE_WEIGHTS=value)
        done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    on, off = run("1"), run("0")
    assert on["applied"] and not off["applied"]
    assert on["tokens"] == off["tokens"] and len(on["tokens"]) == 64
    assert 10 * on["faults"] < off["faults"] and off["faults"] > 1000, (on["faults"], off["faults"])
    # The weights (the 32k x 64 float32 embedding: 8 MB) on huge pages where the host collapses them in place.
    release = tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2])
    if release >= (6, 1) and "[never]" not in host_memory.THP_ENABLED.read_text():
        assert on["huge"] >= 4 << 20 and off["huge"] == 0, (on["huge"], off["huge"])
    monkeypatch.setenv("GEMMA4_JAX_KEEP_FREED_MEMORY", "yes")
    with pytest.raises(ValueError, match="GEMMA4_JAX_KEEP_FREED_MEMORY must be 0 or 1"):
        host_memory.enabled_by_env()


def test_prefill_not_starved_by_decode_rows():
    """More decode rows than the step's token budget: a waiting request still gets its prefill (one step without
    the decodes) instead of waiting for them to finish; its tokens equal a run on its own."""
    from gemma4_jax.serving.engine import Engine, EngineConfig

    model = gemma4_jax.from_config("tiny", dtype="float32")
    engine = Engine(model, config=EngineConfig(max_num_seqs=4, max_num_batched_tokens=2, page_size=8,
                                               num_pages=64, max_model_len=128))
    long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    for i in range(3):
        engine.add_request([2, 10 + i, 20 + i], long, request_id=f"r{i}")
    for _ in range(60):  # bounded: a starved prefill must fail the test, not hang it
        if len(engine.running) == 3 and all(r.in_decode for r in engine.running):
            break
        engine.step()
    assert len(engine.running) == 3 and all(r.in_decode for r in engine.running), "a prefill was starved"
    short = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    engine.add_request([2, 50, 51, 52, 53], short, request_id="late")
    done = {}
    for _ in range(30):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        if "late" in done:
            break
    assert "late" in done, "the late request was starved by the decode rows"
    assert not any(f"r{i}" in done for i in range(3))  # it finished long before the long requests
    alone = Engine(model, config=EngineConfig(max_num_seqs=4, page_size=8, num_pages=64, max_model_len=128))
    alone.add_request([2, 50, 51, 52, 53], short, request_id="late")
    while alone.has_unfinished():
        outs = alone.step()
    assert done["late"].token_ids == outs[0].token_ids
