"""Audio: the conformer tower + embedder, the log-mel feature extractor and full logits with audio, against HF.

Parity in float32 on tiny random checkpoints (every parameter randomised, clipped linears with finite bounds that
bite, a small attention soft-cap, a residual weight other than 0.5): relative error <= 5e-4. Batches mix clip
lengths, so padded frames are in the masks.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

import gemma4_jax
from gemma4_jax import audio
from gemma4_jax.audio_processing import AudioFeatureExtractor
from gemma4_jax.config import ConfigError, config_from_dict
from hf_reference import BASE_AUDIO, N_MELS, TINY_MM_TOKENS, hf_audio_embed, make_audio_checkpoint, rel_err

TOL = 5e-4


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    """A tiny audio model (PLE on, so placeholder handling in the per-layer embeddings matters) and its HF twin."""
    path, hf = tiny_checkpoint("audio_ple", seed=7, maker=make_audio_checkpoint, hidden_size_per_layer_input=8)
    return path, hf, gemma4_jax.from_pretrained(path, dtype="float32")


def _embed(model, features, mask):
    """Our tower + embedder on a loaded Model -> numpy (soft tokens, valid)."""

    @jax.jit
    def run(state, f, m):
        return nnx.merge(model.graphdef, state).audio.embed(f, m)

    tokens, valid = run(model.state, features, mask)
    return np.asarray(tokens), np.asarray(valid)


def _features(lengths, seed=0):
    """Random features (B, max(lengths), N_MELS) with a prefix mask, padded frames zeroed as the extractor does."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    feats = rng.standard_normal((len(lengths), t, N_MELS)).astype(np.float32)
    mask = np.arange(t)[None] < np.asarray(lengths)[:, None]
    return feats * mask[..., None], mask


def test_tower_and_embedder_match_hf(checkpoint):
    _, hf, model = checkpoint
    feats, mask = _features([37, 23, 30])
    ours, valid = _embed(model, feats, mask)
    ref, ref_valid = hf_audio_embed(hf, feats, mask)
    assert ours.shape == ref.shape == (3, 10, 64)
    np.testing.assert_array_equal(valid, ref_valid)
    np.testing.assert_array_equal(valid, mask[:, ::2][:, ::2])
    np.testing.assert_array_equal(valid.sum(-1), audio.num_soft_tokens(mask))
    assert rel_err(ours[valid], ref[ref_valid]) <= TOL
    assert rel_err(ours, ref) <= TOL  # padded positions too: the same computation, not just the kept tokens


def test_tower_without_future_context(tiny_checkpoint):
    """The released configs' shape: no right context, chunk 12 with 12 frames of past, GELU, long clips."""
    overrides = dict(attention_chunk_size=6, attention_context_left=7, attention_context_right=0,
                     hidden_act="gelu_pytorch_tanh", num_hidden_layers=1)
    path, hf = tiny_checkpoint("audio_no_future", seed=11, maker=make_audio_checkpoint, audio_overrides=overrides)
    model = gemma4_jax.from_pretrained(path, dtype="float32")
    assert model.config.audio.attention_context_right == 0
    feats, mask = _features([61, 44], seed=1)
    ours, valid = _embed(model, feats, mask)
    ref, ref_valid = hf_audio_embed(hf, feats, mask)
    np.testing.assert_array_equal(valid, ref_valid)
    assert rel_err(ours, ref) <= TOL


def test_logits_with_audio_match_hf(checkpoint):
    """Waveforms -> our feature extractor -> prompt with two clips of different lengths -> logits, vs HF."""
    import torch

    _, hf, model = checkpoint
    rng = np.random.default_rng(3)
    waves = [0.2 * rng.standard_normal(n) for n in (2900, 1700)]
    feats, mask = AudioFeatureExtractor(feature_size=N_MELS)(waves)
    counts = audio.num_soft_tokens(mask)
    assert counts.tolist() == [5, 3]  # ceil(ceil(frames / 2) / 2) of the valid frames

    boa, eoa, tok = TINY_MM_TOKENS["boa_token_id"], TINY_MM_TOKENS["eoa_token_index"], TINY_MM_TOKENS["audio_token_id"]
    text = lambda n: list(rng.integers(3, 300, n))  # noqa: E731
    ids = np.array([[2, *text(4), boa, *[tok] * counts[0], eoa, *text(3), boa, *[tok] * counts[1], eoa, *text(5)]])
    ours = np.asarray(model.logits(ids, input_features=feats, input_features_mask=mask))
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(ids), input_features=torch.as_tensor(feats),
                 input_features_mask=torch.as_tensor(mask), use_cache=False).logits.numpy()
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) <= TOL
    # The audio really reaches the text: other audio gives other logits after the first clip.
    other = np.asarray(model.logits(ids, input_features=feats[::-1].copy() * 0.5, input_features_mask=mask))
    assert rel_err(other[:, 6:], ours[:, 6:]) > 1e-2

    with pytest.raises(ValueError, match="placeholder"):
        model.logits(ids[:, :-8], input_features=feats, input_features_mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Feature extractor


@pytest.mark.parametrize(
    "lengths",
    [[16000], [1000, 3333, 777], [2560, 161, 1280 + 1], [480_000 + 1000]],  # incl. a clip truncated at 30 s
)
def test_feature_extractor_matches_hf(lengths):
    from transformers import Gemma4AudioFeatureExtractor

    rng = np.random.default_rng(len(lengths))
    waves = [0.3 * rng.standard_normal(n) for n in lengths]
    ref = Gemma4AudioFeatureExtractor()(waves, return_tensors="np")
    feats, mask = AudioFeatureExtractor()(waves)
    assert feats.dtype == np.float32 and mask.dtype == bool
    assert feats.shape == ref["input_features"].shape
    np.testing.assert_array_equal(mask, ref["input_features_mask"])
    np.testing.assert_allclose(feats, ref["input_features"], rtol=0, atol=1e-5)


def test_feature_extractor_options_match_hf():
    """Pre-emphasis (both flavours), per-bin normalisation, input scaling, FFT overdrive, a smaller mel bank."""
    from transformers import Gemma4AudioFeatureExtractor

    rng = np.random.default_rng(5)
    waves = [rng.uniform(-1, 1, n).astype(np.float32) for n in (4000, 999)]
    for htk in (True, False):
        options = dict(feature_size=40, preemphasis=0.97, preemphasis_htk_flavor=htk, input_scale_factor=2.0,
                       fft_overdrive=True, per_bin_mean=list(np.linspace(-1, 1, 40)),
                       per_bin_stddev=list(np.linspace(0.5, 2, 40)), max_frequency=7000.0, mel_floor=1e-5)
        ref = Gemma4AudioFeatureExtractor(**options)(waves, return_tensors="np")
        feats, mask = AudioFeatureExtractor.from_dict(options)(waves)
        np.testing.assert_array_equal(mask, ref["input_features_mask"])
        np.testing.assert_allclose(feats, ref["input_features"], rtol=0, atol=1e-5)


def test_feature_extractor_rejects_bad_audio():
    fe = AudioFeatureExtractor()
    good = np.zeros(4000, np.float32)
    cases = [
        (lambda: fe(good, sampling_rate=44100), "sampling rate 44100"),
        (lambda: fe([]), "empty list"),
        (lambda: fe([good, np.zeros(0)]), "clip 1 is empty"),
        (lambda: fe(np.zeros((2, 3, 4000))), "1-D waveform"),
        (lambda: fe([np.zeros((4000, 2))]), "mono"),
        (lambda: fe([good, np.zeros(100)]), "at least 161"),
        (lambda: fe([np.full(4000, np.nan)]), "NaN"),
        (lambda: fe(["abc"]), "dtype"),
        (lambda: fe("abc"), "expected a numpy waveform"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_audio_config_is_parsed_and_checked():
    base = {"model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"],
            "text_config": {"model_type": "gemma4_text", "vocab_size": 384, "hidden_size": 64, "intermediate_size": 96,
                            "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 16}}
    cfg = config_from_dict({**base, "audio_config": dict(BASE_AUDIO)})
    assert cfg.audio == audio.AudioConfig(**{**BASE_AUDIO, "subsampling_conv_channels": (16, 8)})
    hash(cfg)  # still a valid static argument
    assert config_from_dict(base).audio is None
    bad = {
        "hidden_size": 30,  # not a multiple of 4 heads
        "attention_logit_cap": 0.0,
        "subsampling_conv_channels": [16],
        "hidden_act": "tanh",
        "num_hidden_layers": 0,
    }
    for key, value in bad.items():
        with pytest.raises(ConfigError, match="audio_config"):
            config_from_dict({**base, "audio_config": {**BASE_AUDIO, key: value}})


def test_embed_rejects_wrong_feature_width(checkpoint):
    _, _, model = checkpoint
    tower = nnx.merge(model.graphdef, model.state).audio
    with pytest.raises(ValueError, match="16 mel bins"):
        tower.embed(np.zeros((1, 20, 128), np.float32), np.ones((1, 20), bool))
    assert dataclasses.is_dataclass(model.config.audio)
