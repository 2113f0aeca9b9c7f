"""Image/video processing and prompt expansion against HF (Gemma4ImageProcessorPil, Gemma4Processor, the video
frame sampler and prompt format), and clear errors for bad media. HF's video processor needs torchvision, which
this environment lacks: video frames are checked against HF's (PIL) image path, which resizes the same way."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402
from tokenizers import AddedToken, models, pre_tokenizers, processors  # noqa: E402
from tokenizers import Tokenizer as BackendTokenizer  # noqa: E402

from gemma4_jax.processing import (  # noqa: E402
    ImageProcessor,
    MediaError,
    MediaLimits,
    VideoProcessor,
    expand_prompt,
    sample_frame_indices,
    video_placeholder,
)
from gemma4_jax.processor import Processor  # noqa: E402
from gemma4_jax.serving.tokenizer import Tokenizer  # noqa: E402

SMALL = dict(patch_size=4, max_soft_tokens=70, pooling_kernel_size=3)
SPECIALS = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>", "audio_token": "<|audio|>",
            "boa_token": "<|audio>", "eoa_token": "<audio|>"}


def _hf_image_processor(**kw):
    from transformers import Gemma4ImageProcessorPil

    return Gemma4ImageProcessorPil(**kw)


def _images(seed=0):
    rng = np.random.default_rng(seed)
    rgb = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    palette = Image.fromarray(rgb(33, 47)).convert("P")
    return [
        Image.fromarray(rgb(40, 60)),  # wide
        Image.fromarray(rgb(100, 30)),  # tall
        Image.fromarray(rgb(7, 300)),  # a strip: one pooling cell high
        Image.fromarray(rgb(24, 24)),  # already the right size: no resize
        Image.fromarray(rgb(500, 400)),  # downscaled
        Image.fromarray(rng.integers(0, 256, (50, 50, 4), dtype=np.uint8), "RGBA"),  # alpha onto white
        Image.fromarray(rng.integers(0, 256, (30, 20), dtype=np.uint8), "L"),  # grey
        palette,
        rgb(45, 45),  # a numpy array
    ]


@pytest.mark.parametrize("settings", [SMALL, dict(patch_size=4, max_soft_tokens=140, pooling_kernel_size=3),
                                      dict(patch_size=16, max_soft_tokens=70, pooling_kernel_size=3)])
def test_image_processor_matches_hf(settings):
    images = _images()
    ref = _hf_image_processor(**settings)(images, return_tensors="np")
    ours = ImageProcessor(**settings)(images)
    np.testing.assert_array_equal(ours["pixel_values"], ref["pixel_values"])
    assert ours["pixel_values"].dtype == np.float32
    np.testing.assert_array_equal(ours["image_position_ids"], ref["image_position_ids"])
    assert list(ours["num_soft_tokens_per_image"]) == list(ref["num_soft_tokens_per_image"])


def test_image_inputs_from_paths_and_bytes(tmp_path):
    img = _images()[0]
    file = tmp_path / "a.png"
    img.save(file)
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    jpeg = Image.open(io.BytesIO(buf.getvalue()))
    proc = ImageProcessor(**SMALL)
    from_path, from_bytes = proc([str(file)]), proc([buf.getvalue()])
    np.testing.assert_array_equal(from_path["pixel_values"], proc([img])["pixel_values"])
    np.testing.assert_array_equal(from_bytes["pixel_values"], _hf_image_processor(**SMALL)([jpeg],
                                  return_tensors="np")["pixel_values"])


def _tokenizer_dir(path):
    """A word-level tokenizer with Gemma 4's media tokens and a BOS-adding post-processor."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for w in ["describe", "this", "and", "hello", "then", "00:00", "00:01", "00:02", "00:03"]:
        vocab[w] = len(vocab)
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", *SPECIALS.values(), "<|video|>"]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    backend.save(os.path.join(path, "tokenizer.json"))
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
              "tokenizer_class": "PreTrainedTokenizerFast", "extra_special_tokens": SPECIALS}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return _tokenizer_dir(tmp_path_factory.mktemp("mm_tokenizer"))


def _hf_processor(tokenizer_dir):
    from transformers import AutoTokenizer, Gemma4AudioFeatureExtractor, Gemma4Processor

    class ImagesOnlyProcessor(Gemma4Processor):
        # HF's video processor needs torchvision; images and text never touch it.
        def check_argument_for_proper_class(self, name, arg):
            return None

    return ImagesOnlyProcessor(feature_extractor=Gemma4AudioFeatureExtractor(),
                               image_processor=_hf_image_processor(**SMALL),
                               tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir), video_processor=object())


def test_prompt_expansion_matches_hf_processor(tokenizer_dir):
    hf = _hf_processor(tokenizer_dir)
    ours = Processor(Tokenizer.from_dir(tokenizer_dir), ImageProcessor(**SMALL))
    text = "describe <|image|> and <|image|> then <|image|> hello"
    images = _images(1)[:3]
    ref = hf(text=[text], images=[images], return_tensors="np")
    got = ours(text, images=images)
    np.testing.assert_array_equal(got["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(got["mm_token_type_ids"], ref["mm_token_type_ids"])
    np.testing.assert_array_equal(got["pixel_values"], ref["pixel_values"])
    np.testing.assert_array_equal(got["image_position_ids"], ref["image_position_ids"])
    counts = ImageProcessor(**SMALL)(images)["num_soft_tokens_per_image"]
    assert int((got["mm_token_type_ids"] == 1).sum()) == sum(counts)


def test_video_prompt_and_frames_match_hf(tokenizer_dir):
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    for total, wanted in [(10, 4), (7, 7), (33, 32), (5, 1)]:
        meta = VideoMetadata(total_num_frames=total, fps=2.0)
        np.testing.assert_array_equal(sample_frame_indices(total, wanted), default_sample_indices_fn(meta, wanted))
    rng = np.random.default_rng(3)
    video = rng.integers(0, 256, (10, 30, 45, 3), dtype=np.uint8)
    out = VideoProcessor(**SMALL, num_frames=4)([video], fps=[0.5])
    indices = sample_frame_indices(10, 4)
    assert out["num_frames_per_video"] == [4] and out["timestamps"] == [[i / 0.5 for i in indices]]
    # frames: HF's PIL image path (its video processor resizes with torchvision, unavailable here)
    ref = _hf_image_processor(**SMALL)([video[i] for i in indices], return_tensors="np")
    np.testing.assert_array_equal(out["pixel_values_videos"], ref["pixel_values"])
    np.testing.assert_array_equal(out["video_position_ids"], ref["image_position_ids"])
    assert out["num_soft_tokens_per_video"] == [ref["num_soft_tokens_per_image"][0]]
    # prompt: HF's replace_video_token on the same sampled frames
    hf = _hf_processor(tokenizer_dir)
    meta = VideoMetadata(total_num_frames=10, fps=0.5, frames_indices=list(indices))
    expected = hf.replace_video_token({"num_soft_tokens_per_video": out["num_soft_tokens_per_video"],
                                       "video_metadata": [meta]}, 0)
    assert video_placeholder(out["num_soft_tokens_per_video"][0], out["timestamps"][0]) == expected
    assert expected.startswith("00:00 <|image><|video|>") and expected.count("<|image>") == 4
    processor = Processor(Tokenizer.from_dir(tokenizer_dir), ImageProcessor(**SMALL),
                          VideoProcessor(**SMALL, num_frames=4))
    got = processor("describe <|video|> hello", videos=[video], video_fps=[0.5])
    assert got["text"] == "describe " + expected + " hello"
    assert int((got["mm_token_type_ids"] == 2).sum()) == 4 * out["num_soft_tokens_per_video"][0]


def test_bad_media_errors(tmp_path):
    proc = ImageProcessor(**SMALL, limits=MediaLimits(max_images=2, max_image_pixels=10_000, max_image_bytes=50_000))
    buf = io.BytesIO()
    _images()[0].save(buf, format="PNG")
    png = buf.getvalue()
    with pytest.raises(MediaError, match="cannot decode"):
        proc([b"not an image at all"])
    with pytest.raises(MediaError, match="cannot decode"):
        proc([png[: len(png) // 2]])  # truncated
    with pytest.raises(MediaError, match="over the limit of 2"):
        proc([png, png, png])
    with pytest.raises(MediaError, match="pixels, over the limit"):
        proc([np.zeros((200, 100, 3), np.uint8)])
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 150, 3), dtype=np.uint8)).save(big, "PNG")
    with pytest.raises(MediaError, match="bytes, over the limit"):
        proc([big.getvalue()])
    with pytest.raises(MediaError, match="pixels, over the limit"):
        ImageProcessor(**SMALL, limits=MediaLimits(max_image_pixels=100))([png])  # checked before decoding
    with pytest.raises(MediaError, match="empty"):
        proc([np.zeros((0, 5, 3), np.uint8)])
    with pytest.raises(MediaError, match="uint8"):
        proc([np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(MediaError, match="no image file"):
        proc([str(tmp_path / "missing.png")])
    with pytest.raises(MediaError, match="unsupported type"):
        proc([12])
    with pytest.raises(ValueError, match="max_soft_tokens"):
        ImageProcessor(max_soft_tokens=100)
    with pytest.raises(MediaError, match="cannot sample 5 frames"):
        VideoProcessor(**SMALL, num_frames=5)([np.zeros((3, 24, 24, 3), np.uint8)])
    with pytest.raises(MediaError, match="frames, over the limit"):
        VideoProcessor(**SMALL, num_frames=None, limits=MediaLimits(max_frames=2))([np.zeros((3, 24, 24, 3),
                                                                                            np.uint8)])
    with pytest.raises(MediaError, match="2 <|image|> placeholder"):
        expand_prompt("<|image|> <|image|>", image_tokens=[3])


def test_media_parts_with_a_non_string_type_are_not_media():
    """A content part whose type is an object is no media part (it used to raise 'unhashable type' -> a 500)."""
    from gemma4_jax.serving.media_decode import has_media_parts

    assert has_media_parts([{"role": "user", "content": [{"type": {}, "text": ""}]}]) is False
    assert has_media_parts([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
