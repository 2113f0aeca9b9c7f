"""The HTTP server with images and audio: the official `openai` client sends a data-URL PNG and a base64 WAV in chat
content parts to a live uvicorn server on 127.0.0.1 serving a tiny random image + audio checkpoint. The answer
equals the greedy tokens of the full-sequence forward `Model.logits` over the same media; bad media (corrupt image,
wrong sample rate, too many images, too many pixels or bytes, remote or local URLs, other audio formats) get a 400
in the OpenAI error envelope, and the server keeps serving."""

from __future__ import annotations

import base64
import time

import httpx
import numpy as np
import openai
import pytest

pytest.importorskip("PIL")

from test_server import live_server  # noqa: E402

import gemma4_jax  # noqa: E402
from gemma4_jax.audio_processing import AudioFeatureExtractor  # noqa: E402
from gemma4_jax.processing import ImageProcessor, mm_token_type_ids  # noqa: E402
from gemma4_jax.serving.mm_inputs import ServingLimits  # noqa: E402
from gemma4_jax.serving.server import ServerConfig, create_app  # noqa: E402
from hf_reference import BASE_VISION, TINY_MM_TOKENS  # noqa: E402
from mm_fixtures import N_MELS, make_mm_checkpoint, noise, png_bytes, wav_bytes  # noqa: E402

API_KEY = "mm-key"
MODEL = "tiny-gemma4-mm"
LIMITS = ServingLimits(max_images=2, max_image_pixels=200 * 200, max_image_bytes=64 * 1024, max_audios=1,
                       max_audio_seconds=1.0)


@pytest.fixture(scope="module")
def server(ckpt_root):
    path = str(ckpt_root / "mm_server")
    make_mm_checkpoint(path, seed=21)
    llm = gemma4_jax.LLM(path, dtype="float32", max_num_batched_tokens=64, max_model_len=256, max_num_seqs=4,
                         page_size=16)
    app = create_app(llm, ServerConfig(served_model_name=MODEL, api_key=API_KEY, media_limits=LIMITS,
                                       grace_period_s=2))
    with live_server(app) as (url, uv, thread):
        yield type("Live", (), {"url": url, "llm": llm})


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _flat_png(height: int, width: int) -> bytes:
    """A one-colour PNG: many pixels in few bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (40, 90, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _audio_part(data: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def _greedy_reference(llm, ids: list[int], images: list[bytes], clips: list[np.ndarray], n: int):
    """Greedy continuation by repeated full-sequence forwards (Model.logits with the processor's media) ->
    (token ids, their logprobs)."""
    img = ImageProcessor(patch_size=BASE_VISION["patch_size"], max_soft_tokens=70,
                         pooling_kernel_size=BASE_VISION["pooling_kernel_size"])(images)
    feats, mask = AudioFeatureExtractor(feature_size=N_MELS)(clips)
    seq, logprobs = list(ids), []
    for _ in range(n):
        types = mm_token_type_ids(np.array([seq]), TINY_MM_TOKENS["image_token_id"], TINY_MM_TOKENS["video_token_id"],
                                  TINY_MM_TOKENS["audio_token_id"])
        logits = llm.model.logits(np.array([seq]), pixel_values=img["pixel_values"],
                                  image_position_ids=img["image_position_ids"], input_features=feats,
                                  input_features_mask=mask, mm_token_type_ids=types)
        last = np.asarray(logits)[0, -1].astype(np.float64)
        seq.append(int(last.argmax()))
        logprobs.append(last.max() - last.max() - np.log(np.exp(last - last.max()).sum()))
    return seq[len(ids):], logprobs


def test_chat_with_data_url_image_and_base64_wav(server, client):
    image, clip = png_bytes(40, 60, seed=3), noise(2900, seed=4)
    content = [{"type": "text", "text": "What is in"}, {"type": "image_url", "image_url": {"url": _data_url(image)}},
               {"type": "text", "text": "and"}, _audio_part(wav_bytes(clip))]
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                           max_tokens=4, temperature=0.0, logprobs=True)
    choice = reply.choices[0]
    ids, media = server.llm.media_processor.process_chat([{"role": "user", "content": content}], allow_local=False)
    assert reply.usage.prompt_tokens == len(ids) and media.num_soft_tokens > 60
    expected, logprobs = _greedy_reference(server.llm, ids, [image], [clip], 4)
    assert choice.message.content == server.llm.tokenizer.decode(expected)
    np.testing.assert_allclose([t.logprob for t in choice.logprobs.content], logprobs, atol=2e-4)
    assert reply.usage.completion_tokens == 4
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
        counted = http.post("/tokenize", json={"model": MODEL, "messages": [{"role": "user", "content": content}]})
    assert counted.status_code == 200 and counted.json()["tokens"] == ids

    # Streaming gives the same text.
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                            max_tokens=4, temperature=0.0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == choice.message.content


@pytest.mark.parametrize(
    ("part", "match"),
    [
        ({"type": "image_url", "image_url": {"url": _data_url(b"\x89PNG\r\n\x1a\n-corrupt-")}},
         "cannot decode the image"),
        ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, "only data: URLs"),
        ({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, "only data: URLs"),
        ({"type": "image", "image": "/etc/passwd"}, "only data: URLs"),
        ({"type": "image_url", "image_url": {"url": _data_url(_flat_png(300, 300))}}, "over the limit of 40000"),
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}, "not valid base64"),
        (_audio_part(wav_bytes(noise(1600), rate=8000)), "sample rate 8000 Hz"),
        (_audio_part(b"RIFFjunk"), "cannot decode the audio as WAV"),
        (_audio_part(wav_bytes(noise(40000))), "over the limit of 1 s"),
        (_audio_part(b"ID3...", fmt="mp3"), "audio format 'mp3' is not supported"),
    ],
)
def test_bad_media_400(server, part, match):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
        r = http.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2,
                                                    "messages": [{"role": "user", "content": [part]}]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert match in error["message"], error["message"]


def test_caps_and_recovery(server, client):
    big = png_bytes(180, 180, seed=5)  # under the pixel cap, over the byte cap (random pixels do not compress)
    assert len(big) > LIMITS.max_image_bytes
    small = {"type": "image_url", "image_url": {"url": _data_url(png_bytes(20, 20))}}
    for content, match in (([small] * 3, "3 images, over the limit of 2"),
                           ([{"type": "image_url", "image_url": {"url": _data_url(big)}}], "bytes, over the limit"),
                           ([_audio_part(wav_bytes(noise(2000)))] * 2, "2 audio clips, over the limit of 1")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=2)
        assert e.value.status_code == 400 and match in e.value.body["message"]
    # Still serving: text and media requests after the refusals; no page leaked.
    # Sampled at temperature 1 without a seed: a random model may end with EOS inside 2 tokens ("stop").
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=2)
    assert reply.choices[0].finish_reason in ("length", "stop") and 1 <= reply.usage.completion_tokens <= 2
    reply = client.chat.completions.create(model=MODEL, max_tokens=2,
                                           messages=[{"role": "user", "content": [small, {"type": "text",
                                                                                          "text": "what?"}]}])
    assert 1 <= reply.usage.completion_tokens <= 2
    deadline = time.monotonic() + 10
    while server.llm.engine.num_used_pages and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.llm.engine.num_used_pages == 0


def test_warmed_multimodal_server_compiles_nothing_for_media(ckpt_root):
    """`serve`'s warm-up on a model with towers: every prefill program carries media (empty for text chunks) and
    the vision and audio towers are compiled at the processor's budgets and the audio buckets up to the limit, so
    chats with an image, an audio clip, both, and text alone compile nothing after ready."""
    from test_warmup import CompileCounter

    path = str(ckpt_root / "mm_server_warm")
    make_mm_checkpoint(path, seed=22)
    llm = gemma4_jax.LLM(path, dtype="float32", max_num_batched_tokens=64, max_model_len=256, max_num_seqs=2,
                         page_size=16, compilation_cache=False)
    app = create_app(llm, ServerConfig(served_model_name=MODEL, media_limits=LIMITS), warmup=True)
    state = app.state.server
    with CompileCounter() as compiles, live_server(app) as (url, _, _):
        deadline = time.monotonic() + 900
        while httpx.get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline and state.load_error is None, state.load_error
            time.sleep(0.2)
        after_ready = compiles.count
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        image, clip = png_bytes(40, 60, seed=5), noise(2900, seed=6)
        parts = [
            [{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {"url": _data_url(image)}}],
            [{"type": "text", "text": "Listen:"}, _audio_part(wav_bytes(clip))],
            [{"type": "image_url", "image_url": {"url": _data_url(png_bytes(30, 50, seed=7))}},
             _audio_part(wav_bytes(noise(9000, seed=8))), {"type": "text", "text": "both"}],
            [{"type": "text", "text": "just text, a little longer than the others"}],
        ]
        for content in parts:
            reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                                   max_tokens=3, temperature=0.0)
            assert reply.usage.completion_tokens == 3
        assert compiles.count == after_ready, f"{compiles.count - after_ready} compiles after ready"
