"""From an HTTP chat-completions body to grounder arguments, with one sentence for every bad input.

Contract: `parse_body` turns the raw bytes into a JSON object or raises `HttpError`
400 (not UTF-8, not JSON, Infinity/NaN, nested too deeply). `parse_request` checks
the messages (one image, one text) and returns a `ChatRequest` that holds the
image's encoded bytes (or its URL), never decoded pixels: the server decodes only
after admitting the request. `parse_decode` is the one place the decode settings
(n, sampling, penalties, think_budget, budget_mode, max_tokens) are read.
`fit_max_tokens` maps OpenAI's `max_tokens` onto the grounder's limits. No torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from egm_edge.errors import InputError
from egm_edge.runtime.image import decode_data_url
from egm_edge.runtime.settings import DecodeSettings

MAX_TEXT_CHARS = 4000


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


@dataclass(frozen=True)
class ChatRequest:
    image: bytes | str  # the encoded image, or an http(s) URL the server may fetch
    text: str
    settings: DecodeSettings  # what the request asked for; the bundle's defaults fill the rest
    stream: bool


def _clip(v, n: int = 40) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


def _no_constant(name: str):
    raise HttpError(400, f"The request body uses {name}, which is not a JSON number; send finite numbers.")


def parse_body(raw: bytes) -> dict:
    """The JSON object in a request body (json's Infinity/NaN extensions refused)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HttpError(400, f"The request body is not valid UTF-8 (bad byte at offset {e.start}); send UTF-8 JSON.") from None
    try:
        body = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise HttpError(400, f"The request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}).") from None
    except RecursionError:
        raise HttpError(400, "The request body is nested too deeply to parse; send a flat chat-completions object.") from None
    if not isinstance(body, dict):
        raise HttpError(400, "The request body must be a JSON object.")
    return body


def _check_unicode(s: str, where: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise HttpError(400, f"The {where} contains a lone surrogate ({s[e.start]!r} at character {e.start}), "
                             "which is not valid Unicode; send valid UTF-8 text.") from None
    return s


def parse_request(body: dict, cfg) -> ChatRequest:
    """Validate a chat-completions body (`cfg`: the server's ServerConfig)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise HttpError(400, "'messages' must be a non-empty list.")
    users = [m for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise HttpError(400, "'messages' has no user message.")
    content = users[-1].get("content")
    if isinstance(content, str) or not isinstance(content, list):
        raise HttpError(400, "The user message must hold a list with one image_url part and one text part.")
    images, texts = [], []
    for part in content:
        if not isinstance(part, dict):
            raise HttpError(400, "Each content part must be an object.")
        kind = part.get("type") or ("image_url" if "image_url" in part else "text" if "text" in part else None)
        if kind == "image_url":
            iu = part.get("image_url")
            url = iu.get("url") if isinstance(iu, dict) else iu
            if not isinstance(url, str):
                raise HttpError(400, "image_url.url must be a string.")
            images.append(url)
        elif kind == "text":
            if not isinstance(part.get("text"), str):
                raise HttpError(400, "A text part must have a string 'text'.")
            texts.append(_check_unicode(part["text"], "text"))
        else:
            raise HttpError(400, f"Unsupported content part type {_clip(kind)}; send image_url and text.")
    if len(images) != 1:
        raise HttpError(400, f"Exactly one image is supported per request, got {len(images)}.")
    # The text as sent: EGM's InternVL grounding prompt ends with a space, which belongs to the prompt.
    text = "".join(texts)
    if not text.strip():
        raise HttpError(400, "The request has no text; send the grounding prompt after the image, as EGM's evaluation does.")
    if len(text) > MAX_TEXT_CHARS:
        raise HttpError(400, f"The text has {len(text)} characters, over the limit of {MAX_TEXT_CHARS}.")
    url = _check_unicode(images[0], "image URL")
    if url.startswith("data:"):
        try:
            image: bytes | str = decode_data_url(url, max_bytes=cfg.max_body_bytes)
        except InputError as e:
            raise HttpError(400, str(e)) from None
    elif url.startswith(("http://", "https://")):
        if not cfg.allow_remote_images:
            raise HttpError(400, "Remote image URLs are disabled on this server; send a base64 data URL, or start it with --allow-remote-images.")
        image = url
    else:
        raise HttpError(400, "image_url must be a data: URL (or http(s) where the operator allows it).")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise HttpError(400, f"'stream' must be true or false, got {_clip(stream)}.")
    return ChatRequest(image, text, parse_decode(body), bool(stream))


def _number(body: dict, name: str, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise HttpError(400, f"'{name}' must be a number, got {_clip(v)}.")
    try:
        return float(v)
    except OverflowError:
        raise HttpError(400, f"'{name}' must be a finite number, got {_clip(v)}.") from None


def _integer(body: dict, name: str, what: str, lo: int, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        raise HttpError(400, f"'{name}' must be {what}, got {_clip(v)}.")
    return v


def parse_decode(body: dict) -> DecodeSettings:
    """The request's decode settings (`DecodeSettings.from_request`), after what only HTTP has: n, penalties."""
    _integer(body, "n", "1 (this server returns one choice per request)", 1, 1)
    rp = _number(body, "repetition_penalty", 1.0)
    pp, fp = _number(body, "presence_penalty", 0.0), _number(body, "frequency_penalty", 0.0)
    if rp != 1.0 or pp != 0.0 or fp != 0.0:
        raise HttpError(400, "repetition/presence/frequency penalties are not supported; leave them at their neutral values.")
    try:
        return DecodeSettings.from_request(body)
    except InputError as e:
        raise HttpError(400, str(e)) from None


def fit_max_tokens(settings: DecodeSettings, grounder) -> tuple[DecodeSettings, int | None]:
    """OpenAI's max_tokens on the grounder: (settings to run, cap on tokens returned or None).

    The budget policy reserves room for the close of the reasoning, the answer cap and a
    stop token, and shrinks the thinking budget into what is left. When max_tokens
    is below that reserve the answer cap shrinks to fit; when not even the close and
    one answer token fit, the grounder runs its smallest output and the server
    returns its first max_tokens tokens with finish_reason "length".
    """
    n = settings.max_new_tokens
    if n is None:
        return settings, None
    answer = settings.resolved(grounder.defaults).max_answer_tokens
    ids = grounder.ids
    if n >= ids.reserve(answer):
        return settings, None
    smallest = ids.reserve(1)
    if n >= smallest:
        return settings.override(max_answer_tokens=n - smallest + 1), None
    return settings.override(max_answer_tokens=1, max_new_tokens=smallest), n


def fetch_image(req: ChatRequest, cfg) -> bytes:
    """The request's encoded image: its data-URL bytes, or the remote URL fetched (bounded in size and time)."""
    if isinstance(req.image, bytes):
        return req.image
    import urllib.request

    r = urllib.request.Request(req.image, headers={"User-Agent": "egm-edge"})
    try:
        with urllib.request.urlopen(r, timeout=cfg.remote_timeout_s) as resp:  # noqa: S310 (operator-enabled)
            data = resp.read(cfg.max_body_bytes + 1)
    except Exception as e:  # network errors of every kind become one sentence
        raise HttpError(400, f"Could not fetch the image URL ({type(e).__name__}: {e}).") from None
    if len(data) > cfg.max_body_bytes:
        raise HttpError(413, f"The image at the URL is larger than {cfg.max_body_bytes} bytes.")
    return data
