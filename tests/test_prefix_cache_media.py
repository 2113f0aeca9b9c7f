"""Prefix caching with images in the prompt: a repeated image prompt hits through the image (the soft tokens' K/V
are keyed by the image's content digest), the same text around another image hits only the blocks before the
first placeholder, and a hit never ends inside an image (bidirectional attention needs it in one chunk). Greedy
tokens and logprobs equal caching off."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("PIL")

import gemma4_jax  # noqa: E402
from gemma4_jax.serving.engine import Engine  # noqa: E402
from gemma4_jax.serving.sampling import SamplingParams  # noqa: E402
from hf_reference import TINY_MM_TOKENS  # noqa: E402
from mm_fixtures import make_mm_checkpoint, png_bytes  # noqa: E402

IMG = TINY_MM_TOKENS["image_token_id"]
PAGE = 8
PARAMS = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=1)


def test_image_prefix_hits_equal_caching_off(ckpt_root):
    path = str(ckpt_root / "prefix_mm")
    make_mm_checkpoint(path, seed=6)
    llm = gemma4_jax.LLM(path, dtype="float32", max_num_batched_tokens=128, max_model_len=256, max_num_seqs=2,
                         page_size=PAGE, num_window_pages=48)
    config = dataclasses.replace(llm.engine.config, enable_prefix_caching=False)
    off = Engine(llm.model, llm.tokenizer, config)
    on = llm.engine
    assert on.config.enable_prefix_caching and llm.model.config.vision_bidirectional
    img_a, img_b = png_bytes(40, 60, seed=1), png_bytes(40, 60, seed=2)  # same size: same placeholder count

    def run(engine, text, image):
        ids, media = llm.media_processor.process(text, {"image": [image]})
        before = engine.stats["prefix_cache_hits"]
        rid = engine.add_request(ids, PARAMS, media=media)
        engine.run_until_done()
        out = engine.release(rid)
        return ids, out, engine.stats["prefix_cache_hits"] - before

    text = "A long enough system text before the picture: <|image|> and then a question about it"
    for engine in (on, off):
        run(engine, text, img_a)
    cases = [(text + " again?", img_a), (text + " please?", img_b)]
    for case_text, image in cases:
        ids, got, hit = run(on, case_text, image)
        _, want, _ = run(off, case_text, image)
        assert got.token_ids == want.token_ids
        np.testing.assert_allclose([t.logprob for t in got.logprobs], [t.logprob for t in want.logprobs], atol=1e-4)
        placeholders = np.flatnonzero(np.asarray(ids) == IMG)
        first, last = int(placeholders[0]), int(placeholders[-1])
        if image is img_a:
            assert hit > last  # the hit runs through the whole image
        else:
            assert hit == first // PAGE * PAGE  # another image: only the blocks before its first placeholder
    assert on.num_used_pages == 0 and off.num_used_pages == 0
