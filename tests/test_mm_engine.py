"""Generation with images and audio through the serving engine, `LLM.generate` and `LLM.chat`.

Reference: the full-sequence forward `Model.logits(..., pixel_values=..., input_features=..., mm_token_type_ids=...)`
(itself at parity with HF, tests/test_vision.py and tests/test_audio.py) over prompt + generated tokens, whose
argmax at each generated position is the greedy token; plus HF Gemma4ForConditionalGeneration on one prompt. Every
generated token must equal it and its logprob must match the reference log-softmax, with prompts split over
several prefill chunks, several media requests batched with a text-only one, bidirectional vision attention on
(images kept inside one chunk) and off (images split across chunks), and after a preemption (soft tokens reused).
"""

from __future__ import annotations

import base64
import dataclasses
import io

import numpy as np
import pytest

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

import gemma4_jax  # noqa: E402
from gemma4_jax.audio_processing import AudioFeatureExtractor  # noqa: E402
from gemma4_jax.model import Model  # noqa: E402
from gemma4_jax.processing import (  # noqa: E402
    ImageProcessor,
    MediaError,
    VideoProcessor,
    expand_prompt,
    mm_token_type_ids,
)
from gemma4_jax.serving import media_chunks, mm_inputs  # noqa: E402
from gemma4_jax.serving.engine import Engine, EngineConfig  # noqa: E402
from gemma4_jax.serving.sampling import SamplingParams  # noqa: E402
from hf_reference import BASE_VISION, TINY_MM_TOKENS, hf_multimodal_logits  # noqa: E402
from mm_fixtures import N_MELS, make_mm_checkpoint, noise, png_bytes, wav_bytes  # noqa: E402

IMG, AUD = TINY_MM_TOKENS["image_token_id"], TINY_MM_TOKENS["audio_token_id"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=1)
BUDGET = 64  # tokens per step: every prompt below needs 2-4 prefill chunks


@pytest.fixture(scope="module")
def setup(ckpt_root):
    path = str(ckpt_root / "mm_engine")
    hf = make_mm_checkpoint(path, seed=5)
    llm = gemma4_jax.LLM(path, dtype="float32", max_num_batched_tokens=BUDGET, max_model_len=256, max_num_seqs=4,
                         page_size=64)  # 4 pages cover max_model_len: one page bucket, fewer compiles
    return hf, llm


def _images(items):
    return ImageProcessor(patch_size=BASE_VISION["patch_size"], max_soft_tokens=70,
                          pooling_kernel_size=BASE_VISION["pooling_kernel_size"])(items)


def _expected_ids(llm, text, images=(), clips=()):
    """The prompt ids built independently of the engine's processor (HF layout via expand_prompt)."""
    n_img = _images(list(images))["num_soft_tokens_per_image"] if images else []
    n_aud = AudioFeatureExtractor(feature_size=N_MELS)(list(clips))[1][:, ::2][:, ::2].sum(-1).tolist() if clips else []
    return llm.tokenizer.encode(expand_prompt(text, n_img, audio_tokens=n_aud))


def _reference(model, rows, generated):
    """Full-sequence logits of every row (prompt ids, images, clips) + its generated tokens (one batched forward:
    rows right-padded, which a causal model ignores) -> per row the logits at the generated positions (n, V)."""
    seqs = [ids + gen[:-1] for (ids, _, _), gen in zip(rows, generated, strict=True)]
    width = max(map(len, seqs))
    batch = np.array([s + [0] * (width - len(s)) for s in seqs])
    images = [im for _, ims, _ in rows for im in ims]
    clips = [c for _, _, cs in rows for c in cs]
    media = {}
    if images:
        out = _images(images)
        media.update(pixel_values=out["pixel_values"], image_position_ids=out["image_position_ids"])
    if clips:
        feats, mask = AudioFeatureExtractor(feature_size=N_MELS)(clips)
        media.update(input_features=feats, input_features_mask=mask)
    types = mm_token_type_ids(batch, IMG, TINY_MM_TOKENS["video_token_id"], AUD)
    logits = np.asarray(model.logits(batch, mm_token_type_ids=types, **media))
    return [logits[i, len(ids) - 1: len(ids) - 1 + len(gen)] for i, ((ids, _, _), gen) in
            enumerate(zip(rows, generated, strict=True))]


def _assert_matches(out, ref_logits):
    """Greedy tokens == reference argmax, and the engine's logprobs == the reference log-softmax."""
    assert out.token_ids == ref_logits.argmax(-1).tolist()
    ref = ref_logits - np.log(np.exp(ref_logits - ref_logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - ref_logits.max(-1, keepdims=True)
    got = np.array([lp.logprob for lp in out.logprobs])
    np.testing.assert_allclose(got, ref[np.arange(len(got)), out.token_ids], atol=2e-4)


class _Spy:
    """Records each engine step's rows (request, start, length) and whether its media held soft tokens (every
    prefill step of a model with towers carries a StepMedia, empty for text-only chunks)."""

    def __init__(self, engine, monkeypatch):
        self.chunks, self.media_steps, self.encodes = [], 0, 0
        real_run, real_chunk, real_vision = engine._run, media_chunks.chunk_media, mm_inputs._vision_tokens

        def run(rows, *args):
            self.chunks.append([(req, start, len(ids)) for req, ids, start in rows])
            return real_run(rows, *args)

        def chunk(*args):
            media = real_chunk(*args)
            self.media_steps += media is not None and bool(np.any(media.tokens.slots < media.tokens.slots.size))
            return media

        def vision(*args):
            self.encodes += 1
            return real_vision(*args)

        monkeypatch.setattr(engine, "_run", run)
        monkeypatch.setattr(media_chunks, "chunk_media", chunk)
        monkeypatch.setattr(mm_inputs, "_vision_tokens", vision)


def test_media_requests_batched_with_text_match_full_forward_and_hf(setup, monkeypatch):
    import torch

    hf, llm = setup
    spy = _Spy(llm.engine, monkeypatch)
    img_a, img_b = png_bytes(40, 60, seed=1), png_bytes(60, 30, seed=2)
    clip_a, clip_b = noise(2900, seed=3), noise(1700, seed=4)
    prompts = [
        {"prompt": "Describe <|image|> briefly.", "multi_modal_data": {"image": [img_a]}},
        {"prompt": "Say what you hear: <|audio|>", "multi_modal_data": {"audio": clip_a}},
        {"prompt": "A <|image|> then <|audio|>, <|image|> and <|audio|> end",
         "multi_modal_data": {"image": [img_b, img_a], "audio": [clip_a, clip_b]}},
        "A text-only request in the same batch.",
    ]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    rows = [(_expected_ids(llm, "Describe <|image|> briefly.", [img_a]), [img_a], []),
            (_expected_ids(llm, "Say what you hear: <|audio|>", clips=[clip_a]), [], [clip_a]),
            (_expected_ids(llm, prompts[2]["prompt"], [img_b, img_a], [clip_a, clip_b]), [img_b, img_a],
             [clip_a, clip_b]),
            (llm.tokenizer.encode(prompts[3]), [], [])]
    for out, (ids, _, _) in zip(outs, rows, strict=True):
        assert out.prompt_token_ids == ids
    refs = _reference(llm.model, rows, [o.token_ids for o in outs])
    for out, ref in zip(outs, refs, strict=True):
        _assert_matches(out, ref)

    # HF on the image + audio prompt (bidirectional vision attention: HF needs mm_token_type_ids).
    ids = rows[2][0] + outs[2].token_ids[:-1]
    img, (feats, mask) = _images([img_b, img_a]), AudioFeatureExtractor(feature_size=N_MELS)([clip_a, clip_b])
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor([ids]), pixel_values=torch.as_tensor(img["pixel_values"]),
                 image_position_ids=torch.as_tensor(img["image_position_ids"]),
                 input_features=torch.as_tensor(feats), input_features_mask=torch.as_tensor(mask),
                 mm_token_type_ids=torch.as_tensor(mm_token_type_ids(np.array([ids]), IMG,
                                                                     TINY_MM_TOKENS["video_token_id"], AUD)),
                 use_cache=False).logits.numpy()
    _assert_matches(outs[2], ref[0, len(rows[2][0]) - 1:])
    n = GREEDY.max_tokens
    with torch.no_grad():  # and HF's own greedy generate (KV cache, its masks)
        generated = hf.generate(input_ids=torch.as_tensor([rows[2][0]]), pixel_values=torch.as_tensor(
            img["pixel_values"]), image_position_ids=torch.as_tensor(img["image_position_ids"]),
            input_features=torch.as_tensor(feats), input_features_mask=torch.as_tensor(mask),
            mm_token_type_ids=torch.as_tensor(mm_token_type_ids(np.array([rows[2][0]]), IMG,
                                                                TINY_MM_TOKENS["video_token_id"], AUD)),
            attention_mask=torch.ones(1, len(rows[2][0]), dtype=torch.long), max_new_tokens=n, min_new_tokens=n,
            do_sample=False)
    assert generated[0, len(rows[2][0]):].tolist() == outs[2].token_ids

    # Prompts were split over several chunks, and no chunk started or ended inside an image (bidirectional).
    for step in spy.chunks:
        for req, start, n in step:
            for a, b in _image_runs(req.prompt_ids):
                assert not a < start + n < b and not a < start < b, (start, n, a, b)
    chunks_per_req = {}
    for step in spy.chunks:
        for req, start, n in step:
            if n > 1 or start < len(req.prompt_ids):
                chunks_per_req[req.request_id] = chunks_per_req.get(req.request_id, 0) + 1
    assert max(chunks_per_req.values()) >= 3
    # Steps mixed media requests with each other and with the text-only one.
    assert any(sum(r.prompt is None for r, _, _ in step) >= 2 and any(r.prompt for r, _, _ in step)
               for step in spy.chunks)
    # Towers ran once per image; only chunks holding placeholders took the media step (decode never did).
    assert spy.encodes == 3
    with_media = sum(any(req.prompt is None and np.any((np.asarray(req.prompt_ids[s: s + n]) == IMG)
                                                      | (np.asarray(req.prompt_ids[s: s + n]) == AUD))
                         for req, s, n in step) for step in spy.chunks)
    assert spy.media_steps == with_media >= 3
    assert llm.engine.num_used_pages == 0


def _image_runs(ids):
    """[start, end) of each run of image placeholders."""
    is_img = np.asarray(ids) == IMG
    edges = np.flatnonzero(np.diff(np.concatenate([[0], is_img.astype(int), [0]])))
    return edges.reshape(-1, 2).tolist()


def test_preempted_request_reuses_soft_tokens(setup, monkeypatch):
    _, llm = setup
    engine = llm.engine
    spy = _Spy(engine, monkeypatch)
    img = png_bytes(50, 50, seed=7)
    ids, media = llm.media_processor.process("Picture: <|image|> and words after it", {"image": [img]})
    params = dataclasses.replace(GREEDY, max_tokens=6)
    rid = engine.add_request(ids, params, media=media)
    req = engine.requests[rid]
    while len(req.output_ids) < 2:
        engine.step()
    engine._preempt(req)  # as the scheduler does when pages run out: recompute prompt + outputs later
    while engine.has_unfinished():
        engine.step()
    out = engine.output(req)
    engine.requests.pop(rid)
    assert req.num_preemptions == 1 and spy.encodes == 1  # the tower ran once
    ref = _reference(llm.model, [(ids, [img], [])], [out.token_ids])[0]
    _assert_matches(out, ref)


def test_chat_with_image_and_audio_parts(setup):
    _, llm = setup
    img, clip = png_bytes(36, 48, seed=9), noise(2500, seed=10)
    data_url = "data:image/png;base64," + base64.b64encode(img).decode()
    wav = base64.b64encode(wav_bytes(clip)).decode()
    chat = [{"role": "user", "content": [
        {"type": "text", "text": "What is in"}, {"type": "image_url", "image_url": {"url": data_url}},
        {"type": "text", "text": "and"}, {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}]}]
    out = llm.chat(chat, GREEDY, use_tqdm=False)[0]
    # The same chat with a PIL image and the samples themselves: same prompt, same tokens.
    pil_chat = [{"role": "user", "content": [
        {"type": "text", "text": "What is in"}, {"type": "image", "image": Image.open(io.BytesIO(img))},
        {"type": "text", "text": "and"}, {"type": "audio", "audio": clip}]}]
    again = llm.chat(pil_chat, GREEDY, use_tqdm=False)[0]
    assert again.prompt_token_ids == out.prompt_token_ids and again.token_ids == out.token_ids
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": "What is in\n\n<|image|>\n\nand<|audio|>"}])
    n_img = _images([img])["num_soft_tokens_per_image"]
    n_aud = AudioFeatureExtractor(feature_size=N_MELS)([clip])[1][:, ::2][:, ::2].sum(-1).tolist()
    expected = llm.tokenizer.encode(expand_prompt(text, n_img, audio_tokens=n_aud), add_special_tokens=False)
    assert out.prompt_token_ids == expected and expected.count(IMG) == n_img[0] and expected.count(AUD) == n_aud[0]
    _assert_matches(out, _reference(llm.model, [(expected, [img], [clip])], [out.token_ids])[0])


def test_causal_vision_config_splits_images_across_chunks(setup, monkeypatch):
    """Without bidirectional vision attention an image may span chunks (budget 16 < an image's 64 tokens)."""
    hf, llm = setup
    cfg = dataclasses.replace(llm.model.config, vision_bidirectional=False)
    m = llm.model
    model = Model(cfg, m.graphdef, m.state, m.mesh, m.dtype, path=m.path)
    causal = gemma4_jax.LLM(model, tokenizer=llm.tokenizer, max_num_batched_tokens=16, max_model_len=256,
                            max_num_seqs=4, page_size=64)
    spy = _Spy(causal.engine, monkeypatch)
    img = png_bytes(60, 60, seed=11)
    out = causal.generate({"prompt": "See <|image|> now", "multi_modal_data": {"image": img}}, GREEDY,
                          use_tqdm=False)[0]
    ids = out.prompt_token_ids
    first = ids.index(IMG)
    starts = [s for step in spy.chunks for _, s, n in step if n > 1]
    assert any(first < s < first + ids.count(IMG) for s in starts)  # a chunk started inside the image
    ref = hf_multimodal_logits(hf, np.array([ids + out.token_ids[:-1]]), **{
        k: v for k, v in _images([img]).items() if k != "num_soft_tokens_per_image"})  # causal: no type ids
    _assert_matches(out, ref[0, len(ids) - 1:])


def test_video_frames(setup):
    """A video (decoded frames; 2 sampled, each its own image block after a timestamp) through LLM.generate."""
    _, llm = setup
    rng = np.random.default_rng(14)
    frames = [Image.fromarray(rng.integers(0, 256, (30, 45, 3), dtype=np.uint8)) for _ in range(4)]
    out = llm.generate({"prompt": "Clip: <|video|> done", "multi_modal_data": {"video": [frames]}}, GREEDY,
                       use_tqdm=False)[0]
    vid = VideoProcessor(patch_size=BASE_VISION["patch_size"], max_soft_tokens=70,
                         pooling_kernel_size=BASE_VISION["pooling_kernel_size"], num_frames=2)([frames])
    items = list(zip(vid["num_soft_tokens_per_video"], vid["timestamps"], strict=True))
    ids = llm.tokenizer.encode(expand_prompt("Clip: <|video|> done", videos=items))
    assert out.prompt_token_ids == ids and "00:00" in llm.tokenizer.decode(ids)
    seq = np.array([ids + out.token_ids[:-1]])
    logits = np.asarray(llm.model.logits(
        seq, pixel_values_videos=vid["pixel_values_videos"], video_position_ids=vid["video_position_ids"],
        num_frames_per_video=np.array(vid["num_frames_per_video"]),
        mm_token_type_ids=mm_token_type_ids(seq, IMG, TINY_MM_TOKENS["video_token_id"], AUD)))
    _assert_matches(out, logits[0, len(ids) - 1:])


def test_token_id_prompts_expand_like_text(setup):
    _, llm = setup
    proc = llm.media_processor
    img, clip = png_bytes(30, 50, seed=12), noise(1800, seed=13)
    data = {"image": [img], "audio": [clip]}
    text_ids, _ = proc.process("A<|image|>B<|audio|>", data)
    a, b = (llm.tokenizer.encode(c, add_special_tokens=False)[0] for c in "AB")
    ids, media = proc.process([2, a, IMG, b, AUD], data)  # one placeholder id per item
    assert ids == text_ids and ids.count(IMG) == media.kinds.tolist().count(1) > 0
    assert proc.process(ids, data)[0] == ids  # already expanded: kept
    with pytest.raises(MediaError, match="2 image placeholder ids"):
        proc.process([2, IMG, IMG, AUD], data)


def test_bad_media_raise_clear_errors(setup):
    _, llm = setup
    proc = llm.media_processor
    with pytest.raises(MediaError, match="sample rate 8000 Hz"):
        proc.process("<|audio|>", {"audio": [wav_bytes(noise(800), rate=8000)]})
    with pytest.raises(MediaError, match="cannot decode the image"):
        proc.process("<|image|>", {"image": [b"\x89PNG\r\n\x1a\nnot really"]})
    with pytest.raises(MediaError, match="cannot decode the audio as WAV"):
        proc.process("<|audio|>", {"audio": [b"RIFF....WAVEjunk"]})
    with pytest.raises(MediaError, match="3 images, over the limit of 2"):
        proc.process("<|image|>" * 3, {"image": [png_bytes(8, 8)] * 3}, mm_inputs.ServingLimits(max_images=2))
    with pytest.raises(MediaError, match="over the limit of 100"):
        proc.process("<|image|>", {"image": [png_bytes(20, 20)]}, mm_inputs.ServingLimits(max_image_pixels=100))
    with pytest.raises(MediaError, match="1 <|image|> placeholder"):
        proc.process("one <|image|> only", {"image": [png_bytes(8, 8)] * 2})
    with pytest.raises(MediaError, match="over the limit of 1 s"):
        proc.process("<|audio|>", {"audio": noise(20000)}, mm_inputs.ServingLimits(max_audio_seconds=1))
    with pytest.raises(MediaError, match="no image was given"):
        llm.engine.add_request([2, IMG, 5], GREEDY)
    # Bidirectional attention needs an image inside one chunk: a budget below an image's run is refused up front.
    ids, media = proc.process("<|image|>", {"image": [png_bytes(60, 60)]})
    small = Engine(llm.model, llm.tokenizer, EngineConfig(max_num_batched_tokens=32, max_model_len=256,
                                                          max_num_seqs=2, num_pages=8))
    with pytest.raises(MediaError, match="does not fit in one prefill chunk"):
        small.add_request(ids, GREEDY, media=media)
    assert not llm.engine.has_unfinished()
