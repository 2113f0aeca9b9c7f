"""Multimodal models split into pipeline stages: the vision and audio towers run on the first stage, their soft
tokens are spliced in there, and the bidirectional image blocks travel with the activations. Logits equal HF."""

from __future__ import annotations

import numpy as np
import pytest

import gemma4_jax
from gemma4_jax import audio
from gemma4_jax.audio_processing import AudioFeatureExtractor
from hf_reference import (
    BASE_AUDIO,
    N_MELS,
    TINY_MM_TOKENS,
    TINY_PATCH,
    hf_multimodal_logits,
    make_multimodal_checkpoint,
    rel_err,
)

pytest.importorskip("PIL")
from gemma4_jax.processing import ImageProcessor  # noqa: E402

IMG, BOI, EOI = (TINY_MM_TOKENS[k] for k in ("image_token_id", "boi_token_id", "eoi_token_id"))
AUD, BOA, EOA = (TINY_MM_TOKENS[k] for k in ("audio_token_id", "boa_token_id", "eoa_token_index"))


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    # PLE, KV sharing whose source sits on stage 0 while its readers are on stage 1, a short window and
    # bidirectional vision attention: everything that must cross the stage boundary does.
    return tiny_checkpoint("mm_pipeline", seed=5, maker=make_multimodal_checkpoint, audio_config=dict(BASE_AUDIO),
                           hidden_size_per_layer_input=8, num_kv_shared_layers=2, sliding_window=8,
                           use_bidirectional_attention="vision")


def _inputs():
    rng = np.random.default_rng(0)
    from PIL import Image

    img = ImageProcessor(**TINY_PATCH)([Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))])
    feats, mask = AudioFeatureExtractor(feature_size=N_MELS)([0.2 * rng.standard_normal(2900)])
    n_img, n_aud = int(img["num_soft_tokens_per_image"][0]), int(audio.num_soft_tokens(mask)[0])
    ids = [2, 10, 11, BOI] + [IMG] * n_img + [EOI, 20, 21, BOA] + [AUD] * n_aud + [EOA, 30, 31, 32]
    ids = np.array([ids])
    return ids, dict(pixel_values=img["pixel_values"], image_position_ids=img["image_position_ids"],
                     input_features=feats, input_features_mask=mask, mm_token_type_ids=(ids == IMG).astype(np.int64))


@pytest.mark.parametrize("pp", [2, 4])
def test_pipelined_multimodal_logits_match_hf(checkpoint, pp):
    path, hf = checkpoint
    ids, inputs = _inputs()
    ref = hf_multimodal_logits(hf, ids, **inputs)
    model = gemma4_jax.from_pretrained(path, dtype="float32", pp=pp)
    assert model.num_stages == pp
    got = np.asarray(model.logits(ids, **inputs))
    assert rel_err(got, ref) <= 5e-4
    # The image really matters (a different image changes the logits): the comparison is sensitive to the towers.
    other = dict(inputs, pixel_values=inputs["pixel_values"][..., ::-1].copy())
    assert rel_err(np.asarray(model.logits(ids, **other)), ref) > 1e-2


def test_pipelined_engine_generates_with_media(tiny_checkpoint):
    """pp=2 through the engine: towers on stage 0, soft tokens spliced there in the media chunks, bidirectional
    image blocks crossing to stage 1. Greedy tokens and logprobs equal the single-program engine's."""
    from mm_fixtures import make_mm_checkpoint, noise, png_bytes

    path = tiny_checkpoint("mm_engine_pp", seed=6, maker=make_mm_checkpoint, num_kv_shared_layers=2,
                           num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2).path
    prompts = [
        {"prompt": "A <|image|> then <|audio|> end", "multi_modal_data": {"image": [png_bytes(40, 60, seed=1)],
                                                                          "audio": noise(2900, seed=3)}},
        {"prompt": "Describe <|image|> briefly.", "multi_modal_data": {"image": [png_bytes(60, 30, seed=2)]}},
        "A text-only request in the same batch.",
    ]
    params = gemma4_jax.SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=1)
    outs = {}
    for pp in (1, 2):
        llm = gemma4_jax.LLM(path, dtype="float32", pp=pp, max_num_batched_tokens=64, max_model_len=256,
                             max_num_seqs=4, page_size=64)
        outs[pp] = llm.generate(prompts, params, use_tqdm=False)
        assert llm.engine.num_used_pages == 0
    for one, two in zip(outs[1], outs[2], strict=True):
        assert one.token_ids == two.token_ids
        np.testing.assert_allclose([lp.logprob for lp in two.logprobs], [lp.logprob for lp in one.logprobs],
                                   atol=1e-4)
