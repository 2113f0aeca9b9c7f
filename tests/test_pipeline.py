"""Pipeline stages on the simulated 8-device CPU mesh: same logits and greedy tokens as one device.

Stage s owns a contiguous range of layers on the devices at index s of "pp". The configs are chosen so that what
must cross a boundary does: the PLE inputs (computed on stage 0) reach later stages, and KV-shared layers read K/V
of a source layer that lives on an earlier stage (6 layers, the last 2 KV-shared, sources 3 and 2: on pp=2 layer 5
reads layer 2 across the boundary, on pp=4 both readers do, layer 2's K/V passing through stage 2).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import gemma4_jax
from gemma4_jax import sharding
from gemma4_jax.pipeline import StagePlan, schedule_bubble
from helpers import DOUBLE_WIDE, K_EQ_V_UNTIED, MOE_K_EQ_V, PLE_KVSHARE_SOFTCAP, SHORT_WINDOW, random_ids
from hf_reference import rel_err

TOL = 3e-5
VARIANTS = {  # the recipes of tests/helpers.py
    "ple_kvshare": PLE_KVSHARE_SOFTCAP,
    "k_eq_v_untied": K_EQ_V_UNTIED,
    "double_wide": dict(DOUBLE_WIDE, **SHORT_WINDOW),
    "moe": MOE_K_EQ_V,
}
LAYOUTS = {"ple_kvshare": [(2, 1), (4, 1), (2, 2)], "k_eq_v_untied": [(2, 1)], "double_wide": [(2, 2)],
           "moe": [(2, 2)]}


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint):
    return {name: tiny_checkpoint(f"pipe_{name}", seed=40 + i, **overrides).path
            for i, (name, overrides) in enumerate(VARIANTS.items())}


def test_stage_plan_crosses_kv_and_ple(checkpoints):
    cfg = gemma4_jax.load_config(checkpoints["ple_kvshare"]).text
    assert [s.kv_source_layer for s in cfg.layers] == [0, 1, 2, 3, 3, 2]
    plan = StagePlan.for_config(cfg, 2)
    assert plan.layers == (range(0, 3), range(3, 6)) and plan.crossing_kv == ((2,),)
    plan = StagePlan.for_config(cfg, 4)
    assert plan.layers == (range(0, 2), range(2, 4), range(4, 5), range(5, 6))
    assert plan.crossing_kv == ((), (2, 3), (2,))  # layer 2's K/V travels through stage 2 to layer 5
    assert plan.slice_stage == 2  # the first KV-shared layer's stage narrows the engine's rows


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pipelined_logits_equal_single_device(checkpoints, variant):
    path = checkpoints[variant]
    ids = random_ids()
    ref = np.asarray(gemma4_jax.from_pretrained(path, dtype="float32").logits(ids))
    for pp, tp in LAYOUTS[variant]:
        model = gemma4_jax.from_pretrained(path, dtype="float32", pp=pp, tp=tp)
        assert model.num_stages == pp
        out = np.asarray(model.logits(ids))
        err = rel_err(out, ref)
        assert err <= TOL, f"{variant} pp={pp} tp={tp}: relative error {err:.2e} vs one device"
        assert (out.argmax(-1) == ref.argmax(-1)).all()


def _devices(array) -> set[int]:
    return {d.id for d in array.sharding.device_set}


def test_each_stage_holds_only_its_weights(checkpoints):
    model = gemma4_jax.from_pretrained(checkpoints["ple_kvshare"], dtype="float32", pp=2, tp=2)
    meshes = sharding.stage_meshes(model.mesh)
    stage_devices = [{d.id for d in m.devices.flat} for m in meshes]
    assert stage_devices == [{0, 1}, {2, 3}]
    for path, var in nnx.to_flat_state(model.state):
        head = path[0]
        if head == "layers":
            want = 0 if path[1] < 3 else 1
        else:
            want = 1 if head == "norm" else 0  # embeddings and PLE tables on the first stage
        assert _devices(var.get_value()) == stage_devices[want], path
    # The last stage's own copy of the tied embedding, and only its own layers' parameters.
    last = dict(nnx.to_flat_state(model.pipeline.states[1]))
    assert _devices(last[("embed_tokens", "embedding")].get_value()) == stage_devices[1]
    assert not any(p[0] == "layers" and p[1] < 3 for p in last)
    assert ("embed_tokens_per_layer", "embedding") not in last


def _generate(path, pp, tp, prompts, steps=1, **options):
    llm = gemma4_jax.LLM(path, dtype="float32", pp=pp, tp=tp, max_num_seqs=4, max_model_len=32, num_pages=17,
                         page_size=4, max_num_batched_tokens=64, num_scheduler_steps=steps, **options)
    params = gemma4_jax.SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    outs = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    return outs, llm.engine


@pytest.fixture(scope="module")
def greedy_reference(checkpoints):
    prompts = [list(random_ids(1, 7, seed=s)[0]) for s in range(4)]
    return prompts, _generate(checkpoints["ple_kvshare"], 1, 1, prompts)[0]


def test_engine_greedy_pipelined_equals_one_device(checkpoints, greedy_reference):
    """pp=2 x tp=2 through the LLM API: two decode micro-batches in flight, KV pools per stage, the KV-shared
    layer on stage 1 reading its source's paged/ring K/V from stage 0."""
    prompts, ref = greedy_reference
    outs, engine = _generate(checkpoints["ple_kvshare"], 2, 2, prompts)
    assert outs == ref
    assert isinstance(engine.cache, list) and len(engine.cache) == 2
    assert sorted(engine.cache[0]) == ["k0", "k1", "k2", "v0", "v1", "v2"]  # stage 0's layers own these pools
    assert sorted(engine.cache[1]) == ["k3", "v3"]  # layers 4, 5 are KV-shared: no pools
    assert _devices(engine.cache[1]["k3"]) == {2, 3}
    stats = engine.stats
    assert stats["pipeline_stages"] == 2 and stats["pipeline_microbatches"] == 2
    assert 0.0 < stats["pipeline_bubble"] < 0.5


@pytest.mark.slow
def test_engine_multistep_pipelined_equals_one_device(checkpoints, greedy_reference):
    """num_scheduler_steps=3: each micro-batch's sampled tokens go from the last stage to stage 0 on device,
    all steps enqueued at once; pp=4 with 4 micro-batches."""
    prompts, ref = greedy_reference
    outs, engine = _generate(checkpoints["ple_kvshare"], 4, 1, prompts, steps=3)
    assert outs == ref
    assert engine.stats["pipeline_microbatches"] == 4


def test_schedule_bubble():
    # One step: (P - 1) / (M + P - 1) idle.
    busy, total = schedule_bubble(2, 2)
    assert (busy, total) == (4, 6)
    busy, total = schedule_bubble(4, 1)
    assert 1 - busy / total == pytest.approx(3 / 4)
    # Several steps with M >= P: only one fill and drain.
    busy, total = schedule_bubble(4, 4, num_steps=8)
    assert 1 - busy / total == pytest.approx(3 / 35)
    # M < P: a micro-batch's next step waits for its token, the stages idle every step.
    busy, total = schedule_bubble(4, 2, num_steps=8)
    assert 1 - busy / total > 0.4


def test_pipeline_refuses_multimodal_inputs_clearly(checkpoints):
    model = gemma4_jax.from_pretrained(checkpoints["k_eq_v_untied"], dtype="float32", pp=2)
    with pytest.raises((TypeError, ValueError), match="pixel_values"):
        model.logits(random_ids(), pixel_values=np.zeros((1, 4, 3)))


@pytest.mark.slow
def test_from_config_pipelined_equals_unpipelined():
    ids = random_ids(1, 10)
    ref = np.asarray(gemma4_jax.from_config("tiny", dtype="float32", seed=3).logits(ids))
    model = gemma4_jax.from_config("tiny", dtype="float32", seed=3, pp=2)
    assert rel_err(np.asarray(model.logits(ids)), ref) <= TOL
    assert jax.tree.leaves(model.pipeline.states[1])  # stage 1 got parameters of its own
