"""Speculative decoding with the MTP assistant drafter (serving/speculative.py AssistantProposer).

- greedy speculative generation with the assistant equals HF's plain greedy, token for token, for prompts of mixed
  lengths (longer than the target's sliding window of 8, outputs running past it) in one batch; k = 2 here, 1, 3, 4
  and tp=2 slow. Random weights: acceptance is near 0, so every verify step rolls rejected drafts back;
- the drafts the engine's proposer makes for each row equal `assistant.draft` run directly on the target's K/V and
  final-normed hidden state computed from scratch by a full-sequence forward of the row's context (so the drafter
  reads the right pages, ring slots and hidden state: other engines' "wrong block table, acceptance near 0%"),
  after verify steps that accepted all, one and none of their drafts (the hidden state at index n of a verify row);
- acceptance counters are consistent; a mismatched target / assistant pair is refused at start-up;
- pp=2: the target's last full source layer (2) sits on stage 0 and its last sliding one (3) on stage 1, where the
  drafter runs: one pool read in place, the other's pages gathered and moved. Greedy output equals HF's, and the
  drafts equal the direct ones of the unpipelined target, for k = 2 (1 and 3 slow).
"""

from __future__ import annotations

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gemma4_jax
from gemma4_jax import SamplingParams, sharding
from gemma4_jax.assistant import TargetKV, draft
from gemma4_jax.assistant_config import assistant_config_from_dict
from gemma4_jax.config import ConfigError
from gemma4_jax.decoder import SequenceKV
from gemma4_jax.forward import TokenInputs, forward
from gemma4_jax.model import AssistantModel, assistant_from_config
from gemma4_jax.pipeline import to_stage
from gemma4_jax.serving.engine import Engine, EngineConfig
from gemma4_jax.serving.speculative import AssistantProposer, SpeculativeConfig, drafter_mesh, load_drafter
from helpers import BYTE_VOCAB, PLE_KVSHARE_SOFTCAP, SHORT_WINDOW
from hf_reference import BASE_ASSISTANT_TEXT, BASE_TEXT, ORDERED, hf_greedy

# test_speculative.py's target (the same checkpoint when both files run in one session): PLE, KV sharing over
# both layer kinds, soft-capping, double-wide MLP, a window of 8.
RECIPE = dict(PLE_KVSHARE_SOFTCAP, **SHORT_WINDOW, use_double_wide_mlp=True)
ENGINE = dict(page_size=16, max_num_batched_tokens=128, max_num_seqs=4, max_model_len=96)
LENGTHS = (5, 13, 30, 21)  # window 8: all but the first outrun it
NEW = 16
WINDOW = SHORT_WINDOW["sliding_window"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)


def _assistant_config(**text):
    """An E2B-like assistant (centroid-masked head) for the target: its window, vocabulary and hidden size."""
    return assistant_config_from_dict({
        "model_type": "gemma4_assistant",
        "text_config": {**BASE_ASSISTANT_TEXT, "vocab_size": BYTE_VOCAB, "sliding_window": WINDOW, **text},
        "backbone_hidden_size": BASE_TEXT["hidden_size"],
        **ORDERED,
    })


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint("engine_ple_kvshare_window", seed=20, tokenizer=True, **RECIPE)


@pytest.fixture(scope="module")
def model(ckpt):
    return gemma4_jax.from_pretrained(ckpt.path, dtype="float32")


@pytest.fixture(scope="module")
def assistant(model):
    return assistant_from_config(_assistant_config(), dtype="float32", seed=3, mesh=model.mesh)


def _prompts(lengths=LENGTHS, seed=0):
    rs = np.random.RandomState(seed)
    return [[2] + list(rs.randint(16, BYTE_VOCAB, size=n - 1)) for n in lengths]


@pytest.fixture(scope="module")
def reference(ckpt):
    """HF's plain greedy continuation of each prompt."""
    return {tuple(p): hf_greedy(ckpt.hf, p, NEW) for p in _prompts()}


def _engine(model, assistant, k, **overrides):
    spec = {"method": "mtp", "model": assistant, "num_speculative_tokens": k}
    return Engine(model, None, EngineConfig(**{**ENGINE, **overrides}, speculative_config=spec))


def _check_greedy(model, assistant, reference, k):
    prompts = _prompts()
    engine = _engine(model, assistant, k)
    assert isinstance(engine.proposer, AssistantProposer)
    assert engine.layout.window_keep == WINDOW + 1  # the assistant reads one key further back than the target
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    engine.run_until_done()
    outs = [engine.release(i) for i in ids]
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == reference[tuple(prompt)], f"prompt of {len(prompt)} tokens diverged from HF greedy"
    stats = engine.spec_stats
    assert stats.num_drafts > 0 and stats.num_accepted_tokens <= stats.num_draft_tokens
    assert sum(o.spec_decode.num_draft_tokens for o in outs) == stats.num_draft_tokens
    assert sum(o.spec_decode.num_accepted_tokens for o in outs) == stats.num_accepted_tokens
    assert all(a <= p for a, p in zip(stats.accepted_per_pos, stats.proposed_per_pos, strict=True))
    assert sum(stats.accepted_per_pos) == stats.num_accepted_tokens
    # Accepted drafts are a prefix: position j + 1 is accepted only after position j.
    assert all(a >= b for a, b in zip(stats.accepted_per_pos, stats.accepted_per_pos[1:]))
    return engine


def test_greedy_assistant_speculative_equals_hf_greedy(model, assistant, reference):
    _check_greedy(model, assistant, reference, 2)


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 3, 4])
def test_greedy_assistant_speculative_k(model, assistant, reference, k):
    _check_greedy(model, assistant, reference, k)


@pytest.mark.slow
def test_greedy_assistant_speculative_tensor_parallel(ckpt, reference):
    """tp=2: the pools are sharded by KV head and the draft call reads them over the same mesh."""
    model = gemma4_jax.from_pretrained(ckpt.path, dtype="float32", tp=2)
    assistant = assistant_from_config(_assistant_config(), dtype="float32", seed=3, mesh=model.mesh)
    _check_greedy(model, assistant, reference, 2)


# ----------------------------------------------------------------------------------------------------------------
# The drafts the engine makes == assistant.draft on the target's state computed from scratch


class _RecordingKV(SequenceKV):
    """The identity store, keeping each layer's K/V as the attention reads them (keys rotated and normed)."""

    def __init__(self):
        self.kv = {}

    def update(self, layer, k, v, positions):
        self.kv[layer] = (k, v, positions)
        return super().update(layer, k, v, positions)


def _direct_drafts(model, assistant, contexts: list[list[int]], k: int) -> list[list[int]]:
    """assistant.draft for rows whose cached context is `context[:-1]` and last token `context[-1]`: the target's
    K/V of its source layers and its final-normed hidden state at context[-2], from one full forward of the
    contexts (right-padded, padding at position -1: never attended)."""
    sources = assistant.check_target(model)
    width = max(len(c) for c in contexts) - 1
    tokens = np.zeros((len(contexts), width), np.int32)
    positions = np.full((len(contexts), width), -1, np.int32)
    for i, c in enumerate(contexts):
        tokens[i, : len(c) - 1] = c[:-1]
        positions[i, : len(c) - 1] = np.arange(len(c) - 1)
    last = np.asarray([c[-1] for c in contexts], np.int32)
    p = np.asarray([len(c) - 1 for c in contexts], np.int32)

    @jax.jit
    def run(target_state, assistant_state, tokens, positions, last, p):
        target = nnx.merge(model.graphdef, target_state)
        store = _RecordingKV()
        out = forward(target, TokenInputs(tokens=tokens, positions=positions), attention=model.attention,
                      kv_store=store, return_hidden=True)
        kv = TargetKV.dense(sliding=store.kv[sources["sliding_attention"]], full=store.kv[sources["full_attention"]])
        hidden = out.hidden[jnp.arange(tokens.shape[0]), p - 1]  # the final-normed state at context[-2]
        drafter = nnx.merge(assistant.graphdef, assistant_state)
        return draft(drafter, target.embed_tokens, last, hidden, kv, p, num_tokens=k,
                     attention=assistant.attention).tokens

    return np.asarray(run(model.state, assistant.state, tokens, positions, last, p)).tolist()


def test_engine_drafts_equal_direct_assistant_drafts(model, assistant, reference):
    """Rows 0 and 1 are steered with known continuations (every draft accepted; one accepted then a wrong one),
    rows 2 and 3 draft with the assistant (random weights: mostly rejected), for a few verify steps; then each
    row's engine drafts must equal the direct ones."""
    _check_drafts(_engine(model, assistant, 2), model, assistant, reference)


def _check_drafts(engine, model, assistant, reference):
    """Steer rows 0 and 1 (see above) through a few verify steps of `engine`, then compare its drafts with the
    direct ones of `model` (unpipelined, the same weights). Leaves the engine mid-run, its proposer steered."""
    k = engine.speculative.num_speculative_tokens
    prompts = _prompts()
    proposer = engine.proposer
    real_propose = proposer.propose_from

    def steered(cache, requests, limits):
        drafts = real_propose(cache, requests, limits)
        for i, req in enumerate(requests):
            known = reference[tuple(req.prompt_ids)][len(req.output_ids):]
            if req.prompt_ids == prompts[0]:
                drafts[i] = known[: limits[i]]
            elif req.prompt_ids == prompts[1]:
                drafts[i] = (known[:1] + [(known[1] + 1) % BYTE_VOCAB])[: limits[i]] if len(known) > 1 else []
        return drafts

    proposer.propose_from = steered
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    for _ in range(4):  # prefill, then 3 verify steps (row 0 has 10 of its 16 tokens)
        engine.step()
    decode = [r for r in engine.running if r.in_decode]
    assert len(decode) == 4 and engine.stats["verify_steps"] >= 3
    assert engine.spec_stats.num_accepted_tokens > 0  # the steered rows took verify-row indices 0 < n <= k
    assert any(r.num_computed > WINDOW + k + 1 for r in decode)  # past the window
    ours = real_propose(engine.cache, decode, [k] * len(decode))
    direct = _direct_drafts(model, assistant, [req.all_ids for req in decode], k)
    for req, a, b in zip(decode, ours, direct, strict=True):
        assert a == b, f"row of prompt {len(req.prompt_ids)}: engine drafts {a}, direct {b}"
    return ids


# ----------------------------------------------------------------------------------------------------------------
# Pipelined target (pp=2)


@pytest.fixture(scope="module")
def model_pp(ckpt):
    return gemma4_jax.from_pretrained(ckpt.path, dtype="float32", pp=2)


@pytest.fixture(scope="module")
def assistant_pp(model_pp, assistant):
    """The same assistant weights, built on the drafter stage's sub-mesh."""
    return assistant_from_config(_assistant_config(), dtype="float32", seed=3, mesh=drafter_mesh(model_pp))


def test_greedy_assistant_speculative_pipeline(model, model_pp, assistant, assistant_pp, reference):
    """pp=2, k=2: the engine's drafts equal the unpipelined target's direct drafts mid-run (rows steered as in
    test_engine_drafts_equal_direct_assistant_drafts), and the whole run's greedy output equals HF's."""
    engine = _engine(model_pp, assistant_pp, 2)
    assert engine.runner.num_stages == 2 and engine.runner.return_hidden
    # Source layers: full 2 on stage 0 (its rows' pages moved), sliding 3 on stage 1 with the drafter (in place).
    assert engine.proposer.home == 1 and engine.proposer.source_stage == {2: 0, 3: 1}
    ids = _check_drafts(engine, model, assistant, reference)
    engine.run_until_done()
    for prompt, i in zip(_prompts(), ids, strict=True):
        assert engine.release(i).token_ids == reference[tuple(prompt)], f"prompt of {len(prompt)} tokens diverged"


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 3])
def test_greedy_assistant_speculative_pipeline_k(model_pp, assistant_pp, reference, k):
    _check_greedy(model_pp, assistant_pp, reference, k)


def test_pipelined_drafter_moves_onto_its_stage(model_pp, assistant_pp):
    """An assistant on another stage's sub-mesh is moved onto the drafter's; one on another shape is refused."""

    first = sharding.stage_meshes(model_pp.mesh)[0]
    other = AssistantModel(assistant_pp.config, assistant_pp.graphdef, to_stage(assistant_pp.state, first), first,
                           assistant_pp.dtype)
    moved = load_drafter(other, model_pp)
    assert moved.mesh == drafter_mesh(model_pp) != first
    leaf = jax.tree.leaves(moved.state)[0]
    assert leaf.sharding.mesh == moved.mesh
    wide = copy.copy(assistant_pp)
    wide.mesh = sharding.make_mesh(pp=1, tp=2)
    with pytest.raises(ValueError, match="another mesh"):
        load_drafter(wide, model_pp)


# ----------------------------------------------------------------------------------------------------------------
# Start-up


def test_mismatched_pair_is_refused(model, assistant):
    other = copy.copy(assistant)  # the check reads the config alone: no need to initialise another assistant
    other.config = dataclasses.replace(assistant.config, backbone_hidden_size=2 * BASE_TEXT["hidden_size"])
    with pytest.raises(ConfigError, match="backbone_hidden_size"):
        _engine(model, other, 2)
    with pytest.raises(ValueError, match="needs 'model'"):
        SpeculativeConfig.resolve({"method": "mtp", "num_speculative_tokens": 2})


def test_assistant_off_adds_no_outputs(model, assistant):
    """Without the assistant the steps return no hidden state (the programs are those of plain decoding)."""
    plain = Engine(model, None, EngineConfig(**ENGINE))
    assert not plain.runner.return_hidden
    spec = _engine(model, assistant, 2)
    assert spec.runner.return_hidden
