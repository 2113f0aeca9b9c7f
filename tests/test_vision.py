"""Vision tower + multimodal merge: logits parity with HF Gemma4ForConditionalGeneration (float32, every parameter
randomised, clipped linears and standardisation on), for one image, several images of different aspect ratios in a
batch, video, image + video, with and without bidirectional vision attention; and the errors of bad inputs."""

from __future__ import annotations

import numpy as np
import pytest

from hf_reference import (
    BASE_VISION,
    TINY_MM_TOKENS,
    TINY_PATCH,
    hf_multimodal_logits,
    make_multimodal_checkpoint,
    rel_err,
)

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

import gemma4_jax  # noqa: E402
from gemma4_jax.config import ConfigError, config_from_dict  # noqa: E402
from gemma4_jax.multimodal import vision_block_ids  # noqa: E402
from gemma4_jax.processing import ImageProcessor, VideoProcessor  # noqa: E402

TOL = 5e-4
IMG, VID, BOI, EOI = (TINY_MM_TOKENS[k] for k in ("image_token_id", "video_token_id", "boi_token_id", "eoi_token_id"))


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    # PLE on (placeholder ids must become pad in the PLE lookup), a window shorter than an image (the bidirectional
    # block is bounded towards the past by it) and bidirectional vision attention.
    path, hf = tiny_checkpoint("vision", seed=3, maker=make_multimodal_checkpoint, hidden_size_per_layer_input=8,
                               sliding_window=8, use_bidirectional_attention="vision")
    return hf, gemma4_jax.from_pretrained(path, dtype="float32")


def _images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _prompt(counts, token=IMG, text=(20, 21)):
    ids = [2, 10, 11]
    for c in counts:
        ids += [BOI] + [token] * c + [EOI, *text]
    return ids


def _check(hf, ours, ids, **inputs):
    ref = hf_multimodal_logits(hf, ids, **inputs)
    got = np.asarray(ours.logits(ids, **inputs))
    err = rel_err(got, ref)
    assert err <= TOL, err
    return ref


def test_one_image(models):
    hf, ours = models
    out = ImageProcessor(**TINY_PATCH)(_images([(40, 60)]))
    ids = np.array([_prompt(out["num_soft_tokens_per_image"])])
    _check(hf, ours, ids, pixel_values=out["pixel_values"], image_position_ids=out["image_position_ids"])


def test_several_aspect_ratios_in_a_batch(models):
    hf, ours = models
    # wide, tall, thin strip and square: different patch grids, so pooling and (x, y) positions are all exercised
    out = ImageProcessor(**TINY_PATCH)(_images([(40, 60), (100, 30), (7, 300), (24, 24)], seed=1))
    n = out["num_soft_tokens_per_image"]
    row0, row1 = _prompt(n[:2]), _prompt(n[2:])
    width = max(len(row0), len(row1))
    ids = np.array([row0 + [30] * (width - len(row0)), row1 + [30] * (width - len(row1))])
    inputs = dict(pixel_values=out["pixel_values"], image_position_ids=out["image_position_ids"])
    causal = _check(hf, ours, ids, **inputs)
    types = (ids == IMG).astype(np.int64)
    bidirectional = _check(hf, ours, ids, mm_token_type_ids=types, **inputs)
    # the bidirectional mask changes the logits a lot: the comparison above is sensitive to it
    assert rel_err(bidirectional, causal) > 0.05


def test_video_and_image_bidirectional(models):
    hf, ours = models
    rng = np.random.default_rng(2)
    videos = [rng.integers(0, 256, (5, 30, 45, 3), dtype=np.uint8), rng.integers(0, 256, (4, 50, 20, 3), np.uint8)]
    vid = VideoProcessor(**TINY_PATCH, num_frames=2)(videos, fps=[2.0, None])
    img = ImageProcessor(**TINY_PATCH)(_images([(36, 36)], seed=4))
    ids = _prompt(img["num_soft_tokens_per_image"])
    for per_frame, frames in zip(vid["num_soft_tokens_per_video"], vid["num_frames_per_video"], strict=True):
        for _ in range(frames):
            ids += [40, 41] + [BOI] + [VID] * per_frame + [EOI]  # "mm:ss" stand-ins before each frame
    ids = np.array([ids])
    inputs = dict(pixel_values=img["pixel_values"], image_position_ids=img["image_position_ids"],
                  pixel_values_videos=vid["pixel_values_videos"], video_position_ids=vid["video_position_ids"],
                  num_frames_per_video=np.array(vid["num_frames_per_video"]))
    _check(hf, ours, ids, **inputs)
    types = np.where(ids == IMG, 1, np.where(ids == VID, 2, 0))
    _check(hf, ours, ids, mm_token_type_ids=types, **inputs)


@pytest.mark.slow  # video is also checked (with an image, both masks) by test_video_and_image_bidirectional
def test_video_only(models):
    hf, ours = models
    rng = np.random.default_rng(5)
    vid = VideoProcessor(**TINY_PATCH, num_frames=3)([rng.integers(0, 256, (3, 60, 40, 3), dtype=np.uint8)])
    ids = [2, 12]
    for _ in range(3):
        ids += [40, BOI] + [VID] * vid["num_soft_tokens_per_video"][0] + [EOI]
    _check(hf, ours, np.array([ids]), pixel_values_videos=vid["pixel_values_videos"],
           video_position_ids=vid["video_position_ids"], num_frames_per_video=np.array([3]))


def test_block_ids_follow_hf():
    types = np.array([[0, 1, 1, 0, 2, 2, 1, 0, 3, 1], [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]])
    # one id per contiguous run of image/video tokens (an image run touching a video run is one block, as HF)
    assert vision_block_ids(types).tolist() == [[-1, 0, 0, -1, 1, 1, 1, -1, -1, 2], [0, 0] + [-1] * 8]


def test_bad_inputs(models):
    _, ours = models
    out = ImageProcessor(**TINY_PATCH)(_images([(40, 60)]))
    n = out["num_soft_tokens_per_image"][0]
    good = dict(pixel_values=out["pixel_values"], image_position_ids=out["image_position_ids"])
    with pytest.raises(ValueError, match="placeholder tokens"):
        ours.logits(np.array([_prompt([n - 1])]), **good)
    with pytest.raises(ValueError, match="no pixel_values"):
        ours.logits(np.array([_prompt([n])]))
    with pytest.raises(ValueError, match="image_position_ids"):
        ours.logits(np.array([_prompt([n])]), pixel_values=out["pixel_values"])
    with pytest.raises(ValueError, match="values per patch"):
        ours.logits(np.array([_prompt([n])]), pixel_values=out["pixel_values"][..., :10],
                    image_position_ids=out["image_position_ids"])
    far = out["image_position_ids"].copy()
    far[0, 0] = (BASE_VISION["position_embedding_size"], 0)
    with pytest.raises(ValueError, match="position table"):
        ours.logits(np.array([_prompt([n])]), pixel_values=out["pixel_values"], image_position_ids=far)
    with pytest.raises(ValueError, match="mm_token_type_ids shape"):
        ours.logits(np.array([_prompt([n])]), mm_token_type_ids=np.zeros((1, 3), np.int64), **good)
    # the guard runs before any weight is touched, so a text-only Model needs no state here
    text_only = gemma4_jax.Model(gemma4_jax.preset("tiny"), None, None, None, None)
    with pytest.raises(TypeError, match="text-only"):
        text_only.logits(np.array([[2, 3]]), **good)


def test_vision_config_errors():
    base = {"model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"],
            "text_config": gemma4_jax.config.preset_dict("tiny") | {"model_type": "gemma4_text"}}
    cfg = config_from_dict({**base, "vision_config": {"hidden_size": 96, "num_attention_heads": 4,
                                                      "num_key_value_heads": 2}})
    assert cfg.vision.head_dim == 24 and cfg.vision.rope_theta == 100.0 and not cfg.vision_bidirectional
    with pytest.raises(ConfigError, match="axial"):
        config_from_dict({**base, "vision_config": {"rope_parameters": {"rope_type": "default"}}})
    with pytest.raises(ConfigError, match="multiple of 4"):
        config_from_dict({**base, "vision_config": {"head_dim": 6}})
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        config_from_dict({**base, "vision_config": {"num_attention_heads": 4, "num_key_value_heads": 3}})
