"""Config parsing: both override forms, aliases, per-layer facts, presets, and clear errors for broken configs."""

import json

import pytest

import gemma4_jax
from gemma4_jax.config import FULL, SLIDING, ConfigError, config_from_dict, preset_dict


def _text(**kw):
    d = preset_dict("tiny")
    d.update(kw)
    return d


def test_tiny_preset_per_layer_facts():
    cfg = gemma4_jax.preset("tiny").text
    assert cfg.layer_types == (SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL)
    assert [s.head_dim for s in cfg.layers] == [16, 16, 32, 16, 16, 32]
    assert [s.kv_sharing for s in cfg.layers] == [None, None, "store", "store", "reuse", "reuse"]
    assert [s.kv_source_layer for s in cfg.layers] == [0, 1, 2, 3, 3, 2]
    assert [s.intermediate_size for s in cfg.layers] == [128] * 4 + [256] * 2  # double-wide on shared layers
    assert [s.sliding_window for s in cfg.layers] == [16, 16, None, 16, 16, None]
    assert cfg.layers[2].rope.rope_type == "proportional" and cfg.layers[2].rope.partial_rotary_factor == 0.25
    hash(cfg)  # frozen and hashable: usable as a static jit argument


def test_real_presets():
    e2b = gemma4_jax.preset("e2b").text
    assert e2b.num_hidden_layers == 35 and e2b.first_kv_shared_layer == 15
    assert e2b.layers[14].kv_sharing == "store" and e2b.layers[13].kv_sharing == "store"
    assert {s.kv_source_layer for s in e2b.layers[15:]} == {13, 14}
    assert e2b.layers[20].intermediate_size == 12288
    big = gemma4_jax.preset("31b").text
    full = [s for s in big.layers if s.attention_type == FULL]
    assert all(s.k_eq_v and s.num_kv_heads == 4 and s.head_dim == 512 for s in full)
    assert all(not s.k_eq_v and s.num_kv_heads == 16 for s in big.layers if s.is_sliding)
    moe = gemma4_jax.preset("26b-a4b").text
    assert (moe.num_experts, moe.top_k_experts, moe.moe_intermediate_size) == (128, 8, 704)
    assert moe.eos_token_ids == (1, 106)


def test_per_layer_config_form_equals_global_keys():
    old = _text(attention_k_eq_v=True, num_key_value_heads=2, num_global_key_value_heads=1, global_head_dim=32)
    new = _text(attention_k_eq_v=True, num_key_value_heads=2)
    new.pop("global_head_dim")
    new["per_layer_config"] = {"02": {"head_dim": 32, "num_key_value_heads": 1},
                               "05": {"head_dim": 32, "num_key_value_heads": 1}}
    assert config_from_dict(old).text == config_from_dict(new).text


def test_global_kv_heads_ignored_without_k_eq_v():
    # HF applies num_global_key_value_heads only to models that declare attention_k_eq_v.
    cfg = config_from_dict(_text(num_key_value_heads=2, num_global_key_value_heads=1)).text
    assert {s.num_kv_heads for s in cfg.layers} == {2}


def test_moe_aliases():
    base = dict(enable_moe_block=True, num_experts=8)
    a = config_from_dict(_text(**base, top_k_experts=2, moe_intermediate_size=16)).text
    b = config_from_dict(_text(**base, num_experts_per_tok=2, expert_intermediate_size=16)).text
    assert a == b and a.top_k_experts == 2 and a.moe_intermediate_size == 16
    dense = config_from_dict(_text(num_experts=None)).text
    assert dense.num_experts == 0 and not dense.enable_moe_block
    assert config_from_dict({k: v for k, v in _text().items() if k != "num_experts"}).text.num_experts == 0


def test_multimodal_config_takes_text_config():
    d = {"model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"], "text_config": _text(),
         "vision_config": {"hidden_size": 768}, "tie_word_embeddings": True}
    cfg = config_from_dict(d)
    assert cfg.is_multimodal and cfg.text == gemma4_jax.preset("tiny").text
    assert json.loads(cfg.vision_config_json) == {"hidden_size": 768}


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="llama"), "not a Gemma 4 model"),
        (dict(architectures=["Gemma4ForSequenceClassification"]), "unknown architecture"),
        (dict(hidden_size=None), "'hidden_size' is missing"),
        (dict(num_kv_shared_layers=5, layer_types=["sliding_attention"] * 2 + ["full_attention"] * 4),
         "no earlier layer of that type produces a cache"),
        (dict(num_kv_shared_layers=6), "num_kv_shared_layers=6"),
        (dict(layer_types=["sliding_attention"] * 5), "layer_types has 5 entries"),
        (dict(layer_types=["sliding_attention"] * 5 + ["local"]), "unknown layer type"),
        (dict(num_attention_heads=3, num_key_value_heads=2), "not a multiple of kv heads"),
        (dict(enable_moe_block=True, num_experts=8), "missing or zero"),
        (dict(enable_moe_block=True, num_experts=4, top_k_experts=8, moe_intermediate_size=8), "exceeds"),
        (dict(per_layer_config={"9": {"head_dim": 32}}), "outside [0, 6)"),
        (dict(per_layer_config={"2": {"rope_theta": 1.0}}), "does not vary"),
        (dict(rope_parameters={"sliding_attention": {"rope_type": "yarn", "rope_theta": 1.0}}), "not supported"),
        (dict(use_bidirectional_attention="all"), "not supported"),
        (dict(hidden_activation="relu6"), "hidden_activation"),
    ],
)
def test_bad_configs_fail_clearly(change, message):
    with pytest.raises(ConfigError, match=None) as info:
        config_from_dict(_text(**change))
    assert message in str(info.value)


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        gemma4_jax.load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        gemma4_jax.load_config(tmp_path)
    with pytest.raises(ConfigError, match="unknown preset"):
        gemma4_jax.preset("70b")
