"""A request's media off the wire: data URLs and base64 payloads -> bytes, and chat content parts (OpenAI / HF
style) -> template parts + the media they carry.

Only transport is decoded here; the bytes become pixels and samples in the model's processor
(gemma4_jax/processor.py: processing.load_image, audio_processing.load_audio), which also checks them against the
request's limits. The server passes allow_local=False: it never fetches remote URLs or reads its own files on a
client's behalf.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import unquote_to_bytes

from gemma4_jax.processing import MediaError

MEDIA_PART_TYPES = frozenset({"image", "image_url", "input_image", "audio", "input_audio", "video"})


# ----------------------------------------------------------------------------------------------------------------
# Data URLs and base64


def decode_data_url(url: str, what: str) -> bytes:
    """`data:[<mime>][;base64],<payload>` -> bytes. Other URLs (http, https, file) are refused: the server does not
    fetch remote or local media on a client's behalf."""
    if not isinstance(url, str):
        raise MediaError(f"{what}: the url must be a string")
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if ":" in url else "a plain path"
        raise MediaError(f"{what}: only data: URLs are accepted (got {scheme!r}); remote and file URLs are not "
                         "fetched. Send the bytes inline as data:<mime>;base64,<payload>")
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise MediaError(f"{what}: malformed data URL (no ',' after the header)")
    if header.endswith(";base64"):
        return decode_base64(payload, what)
    return unquote_to_bytes(payload)


def decode_base64(data: str, what: str) -> bytes:
    """Strict base64 (no stray characters) -> bytes; `what` names the part in the error."""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise MediaError(f"{what}: the data is not valid base64") from None


# ----------------------------------------------------------------------------------------------------------------
# Chat messages: OpenAI / HF content parts -> template parts + media


def has_media_parts(messages: Any) -> bool:
    """Whether any message has an image / audio / video content part (see `extract_chat_media`)."""
    return isinstance(messages, list) and any(
        isinstance(m, Mapping) and isinstance(m.get("content"), list)
        and any(isinstance(p, Mapping) and isinstance(p.get("type"), str) and p["type"] in MEDIA_PART_TYPES
                for p in m["content"])
        for m in messages)


def extract_chat_media(messages: Sequence[Mapping[str, Any]], allow_local: bool = True
                       ) -> tuple[list[dict], dict[str, list]]:
    """Pull the media out of chat messages, in order, leaving `{"type": "image"|"audio"|"video"}` parts for the
    chat template (which renders them as the placeholder tokens the processor expands).

    Parts: {"type": "image", "image": path|bytes|PIL|uint8 array}, {"type": "image_url", "image_url": {"url":
    "data:..."}} (or the url as a string), {"type": "audio", "audio": path|bytes|array|(array, rate)},
    {"type": "input_audio", "input_audio": {"data": base64, "format": "wav"}}, {"type": "video", "video": frames}.
    allow_local=False (the server) accepts only inline data: paths would read the server's files.
    Returns (messages for the template, {"image": [...], "audio": [...], "video": [...]} without empty kinds).
    """
    media: dict[str, list] = {"image": [], "audio": [], "video": []}
    out = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            what = f"message {i} content part {j}"
            if kind in ("image", "image_url", "input_image"):
                media["image"].append(_image_part(part, kind, what, allow_local))
                parts.append({"type": "image"})
            elif kind in ("audio", "input_audio"):
                media["audio"].append(_audio_part(part, kind, what, allow_local))
                parts.append({"type": "audio"})
            elif kind == "video":
                if not allow_local:
                    raise MediaError(f"{what}: video parts are not accepted by the server; send frames as images")
                media["video"].append(part.get("video"))
                parts.append({"type": "video"})
            else:
                parts.append(part)
        out.append({**message, "content": parts})
    return out, {k: v for k, v in media.items() if v}


def _image_part(part: Mapping, kind: str, what: str, allow_local: bool) -> Any:
    if kind == "image":
        value = part.get("image", part.get("url", part.get("path")))
        if value is None:
            raise MediaError(f"{what}: an image part needs an 'image' (path, bytes, PIL image or array)")
    else:
        value = part.get(kind)
        if isinstance(value, Mapping):
            value = value.get("url")
        if not isinstance(value, str):
            raise MediaError(f"{what}: an {kind} part needs {{'url': 'data:...'}}")
    if isinstance(value, str) and (value.startswith("data:") or not allow_local or kind != "image"):
        return decode_data_url(value, what)
    return value


def _audio_part(part: Mapping, kind: str, what: str, allow_local: bool) -> Any:
    if kind == "input_audio":
        spec = part.get("input_audio")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("data"), str):
            raise MediaError(f"{what}: an input_audio part needs {{'data': base64, 'format': 'wav'}}")
        fmt = str(spec.get("format", "wav")).lower()
        if fmt != "wav":
            raise MediaError(f"{what}: audio format {fmt!r} is not supported; send 16 kHz PCM WAV")
        return decode_base64(spec["data"], what)
    value = part.get("audio", part.get("url", part.get("path")))
    if value is None:
        raise MediaError(f"{what}: an audio part needs an 'audio' (WAV path or bytes, or 16 kHz samples)")
    if isinstance(value, str) and (value.startswith("data:") or not allow_local):
        return decode_data_url(value, what)
    return value
