"""Tensor, expert and data parallelism on the simulated 8-device CPU mesh (conftest): same logits as one device.

Every variant of the text model (PLE + KV sharing, keys-as-values with one global KV head, double-wide MLP, a short
sliding window, MoE with its experts split over the tensor axis) runs with tp=2 / tp=4 / dp=2 x tp=2 against the
single-device run of the same checkpoint (itself checked against HF in test_parity_text.py). Sharded reductions
(o_proj over heads, down_proj over the MLP width, the experts' combine) sum in another order, so the results agree
to float32 rounding (observed <= 6e-6 relative), not bit for bit. Also: where each weight and KV pool lives, that
loading puts every tensor straight into its sharded layout, the early errors, and the per-device bytes of the real
26B-A4B and 31B layouts from shapes alone.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import gemma4_jax
from gemma4_jax import sharding
from gemma4_jax.memory import memory_per_device
from gemma4_jax.serving.engine import Engine, EngineConfig
from gemma4_jax.serving.runner import model_step
from helpers import DOUBLE_WIDE, K_EQ_V_UNTIED, MOE_K_EQ_V, PLE_KVSHARE_SOFTCAP, SHORT_WINDOW, flat_state, random_ids
from hf_reference import rel_err

TOL = 3e-5  # float32 rounding of reordered sums; a wrong shard or a missing all-reduce is O(1)

VARIANTS = {  # the recipes of tests/helpers.py
    "ple_kvshare": PLE_KVSHARE_SOFTCAP,
    "k_eq_v_untied": K_EQ_V_UNTIED,
    "double_wide": DOUBLE_WIDE,
    "short_window": SHORT_WINDOW,
    "moe": MOE_K_EQ_V,
}
LAYOUTS = {  # (tp, dp) per variant: every variant at tp=2, two at tp=4 (KV heads 2 then replicate), one with dp
    "ple_kvshare": [(2, 1), (4, 1), (2, 2)],
    "k_eq_v_untied": [(2, 1)],
    "double_wide": [(2, 1)],
    "short_window": [(2, 1)],
    "moe": [(2, 1), (4, 1)],
}


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint):
    return {name: tiny_checkpoint(f"shard_{name}", seed=20 + i, **overrides).path
            for i, (name, overrides) in enumerate(VARIANTS.items())}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tensor_parallel_logits_equal_single_device(checkpoints, variant):
    path = checkpoints[variant]
    ids = random_ids()
    ref = np.asarray(gemma4_jax.from_pretrained(path, dtype="float32").logits(ids))
    for tp, dp in LAYOUTS[variant]:
        model = gemma4_jax.from_pretrained(path, dtype="float32", tp=tp, dp=dp)
        assert dict(model.mesh.shape) == {"pp": 1, "dp": dp, "tp": tp}
        out = np.asarray(model.logits(ids))
        err = rel_err(out, ref)
        assert err <= TOL, f"{variant} tp={tp} dp={dp}: relative error {err:.2e} vs one device"
        assert (out.argmax(-1) == ref.argmax(-1)).all()


def _spec(model, path: str) -> PartitionSpec:
    return flat_state(model.state)[path].get_value().sharding.spec


def test_weights_sharded_by_the_rules(checkpoints):
    model = gemma4_jax.from_pretrained(checkpoints["moe"], dtype="float32", tp=2)
    assert _spec(model, "layers.0.self_attn.q_proj.kernel") == PartitionSpec(None, "tp")  # heads
    assert _spec(model, "layers.0.self_attn.o_proj.kernel") == PartitionSpec("tp")
    assert _spec(model, "layers.0.self_attn.k_proj.kernel") == PartitionSpec(None, "tp")  # 2 KV heads
    # The full layers' single global KV head cannot be split: replicated.
    assert _spec(model, "layers.2.self_attn.k_proj.kernel") == PartitionSpec()
    assert _spec(model, "layers.0.mlp.gate_proj.kernel") == PartitionSpec(None, "tp")
    assert _spec(model, "layers.0.moe.experts.gate_up_proj") == PartitionSpec("tp")  # experts
    assert _spec(model, "layers.0.moe.experts.down_proj") == PartitionSpec("tp")
    assert _spec(model, "embed_tokens.embedding") == PartitionSpec("tp")  # vocab


def test_loading_puts_each_tensor_straight_into_its_shards(checkpoints, monkeypatch):
    """Every checkpoint tensor is device_put once, with its final NamedSharding: no replicated staging copy."""
    calls = []
    real = jax.device_put

    def spy(x, device=None, *args, **kwargs):
        calls.append((tuple(np.shape(x)), device))
        return real(x, device, *args, **kwargs)

    monkeypatch.setattr(jax, "device_put", spy)
    model = gemma4_jax.from_pretrained(checkpoints["ple_kvshare"], dtype="float32", tp=4)
    monkeypatch.undo()
    flat = list(gemma4_jax.model.nnx.to_flat_state(model.state))
    assert len(calls) == len(flat)
    for _, where in calls:
        assert isinstance(where, NamedSharding) and where.mesh.devices.size == 4
    final: dict[tuple, set] = {}
    for _, v in flat:
        final.setdefault(tuple(v.shape), set()).add(v.get_value().sharding)
    for shape, where in calls:
        assert where in final[shape], (shape, where)  # put once, already in the layout it keeps
    sharded = [w for _, w in calls if "tp" in w.spec]
    assert len(sharded) >= 5 * 6  # at least q, o, gate, up, down of each of the 6 layers arrive split


def test_kv_pools_sharded_by_kv_head_where_divisible(checkpoints):
    model = gemma4_jax.from_pretrained(checkpoints["k_eq_v_untied"], dtype="float32", tp=2)
    engine = Engine(model, None, EngineConfig(max_num_seqs=2, max_model_len=32, num_pages=9, page_size=4))
    cfg = model.config.text
    assert {s.num_kv_heads for s in cfg.layers} == {1, 2}  # both cases present

    def check_layout():
        for spec in cfg.layers:
            want = NamedSharding(model.mesh, PartitionSpec(None, None, "tp" if spec.num_kv_heads % 2 == 0 else None))
            for kind in "kv":
                pool = engine.cache[f"{kind}{spec.index}"]
                assert pool.sharding.is_equivalent_to(want, pool.ndim), (spec.index, pool.sharding)

    check_layout()
    params = gemma4_jax.SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    engine.add_request([5, 6, 7], params)
    engine.run_until_done()
    check_layout()  # the step keeps each pool's layout ...
    compiled = model_step._cache_size()
    engine.add_request([8, 9, 10], params)
    engine.run_until_done()
    assert model_step._cache_size() == compiled  # ... so the same shapes never compile again


def test_invalid_layouts_fail_early_naming_the_numbers(checkpoints):
    path = checkpoints["moe"]
    with pytest.raises(gemma4_jax.ConfigError, match=r"tp=3 does not divide num_attention_heads=4"):
        gemma4_jax.from_pretrained(path, dtype="float32", tp=3)
    with pytest.raises(gemma4_jax.ConfigError, match=r"pp=7 pipeline stages but the model has only 6 layers"):
        gemma4_jax.from_pretrained(path, dtype="float32", pp=7)
    with pytest.raises(gemma4_jax.ConfigError, match=r"pp=4 x dp=2 x tp=2 = 16 devices requested, only 8"):
        gemma4_jax.from_pretrained(path, dtype="float32", pp=4, tp=2, dp=2)
    with pytest.raises(gemma4_jax.ConfigError, match=r"tp must be a positive integer, got 0"):
        gemma4_jax.from_pretrained(path, dtype="float32", tp=0)
    cfg = gemma4_jax.load_config(path).text
    with pytest.raises(sharding.ShardingError, match=r"tp=4 does not divide num_experts=6"):
        sharding.validate(dataclasses.replace(cfg, num_experts=6), tp=4)
    wide = dataclasses.replace(cfg, layers=tuple(dataclasses.replace(s, intermediate_size=90) for s in cfg.layers))
    with pytest.raises(sharding.ShardingError, match=r"tp=4 does not divide the MLP intermediate size\(s\) \[90\]"):
        sharding.validate(wide, tp=4)


@pytest.mark.parametrize("name", ["26b-a4b", "31b"])
def test_real_presets_each_device_holds_its_share(name):
    """pp=2 and tp=2 of the real sizes, from shapes alone: each stage / device holds about half."""
    gib = 2**30
    one = memory_per_device(name, dtype="bfloat16", context_tokens=8192)
    total, kv_total = one[0]["param_bytes"], one[0]["kv_bytes"]
    per_token = one[0]["kv_bytes_per_token"]
    assert per_token == gemma4_jax.preset(name).text.kv_bytes_per_token(2)
    for pp, tp in ((2, 1), (1, 2), (2, 2)):
        rows = memory_per_device(name, pp=pp, tp=tp, dtype="bfloat16", context_tokens=8192)
        assert len(rows) == pp * tp
        for row in rows:
            share = row["param_bytes"] / total
            # Half (pp=2 or tp=2) or a quarter, plus what cannot split: the embedding table on both end stages
            # (the LM head's copy), norms, routers.
            assert 1 / (pp * tp) <= share < 1 / (pp * tp) + 0.05, (pp, tp, row)
        # KV: split exactly (every KV head count of these models divides by 2), each device of a stage alike;
        # a stage holds the full-attention layers it owns (26B-A4B on pp=2: 2 of 5 on stage 0, 3 on stage 1).
        assert sum(r["kv_bytes"] for r in rows) == kv_total
        assert sum(r["kv_bytes_per_token"] for r in rows) == per_token
        for stage in range(pp):
            assert len({(r["kv_bytes"], r["param_bytes"]) for r in rows if r["stage"] == stage}) == 1
        if pp == 1:
            assert all(r["kv_bytes_per_token"] == per_token // tp for r in rows)
        print(f"\n{name} pp={pp} tp={tp}: " + ", ".join(
            f"dev{r['device']} stage {r['stage']}: {r['param_bytes'] / gib:.2f} GiB params, "
            f"{r['kv_bytes_per_token'] / 1024:.0f} KiB KV/token" for r in rows))
