"""An OpenAI-compatible grounding server on the standard library (no web framework, no torch).

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions`.
The request EGM's evaluation sends works unchanged: one user message whose content
holds an `image_url` (a base64 data URL) and a `text` part, with temperature,
top_p, max_tokens and the `extra_body` fields top_k / repetition_penalty. The
extension field `think_budget` (int, or null for unlimited) and `budget_mode`
(hard | qwen | none) cap the reasoning. Responses carry `reasoning_content` and
`content` like reasoning-aware servers (SGLang, vLLM), plus an `egm` block with
the parsed box and timings. `stream: true` sends server-sent events.

Operations: one model, one request at a time (a CPU or a Jetson runs one
grounding fastest alone); at most `max_queue` requests wait, beyond that 503;
a request waiting or running past `request_timeout_s` gets 504; bodies over
`max_body_bytes` get 413; an optional API key (Bearer). Remote image URLs are
refused unless the operator passed `allow_remote_images`. Bad input is a 4xx
with one sentence; the server keeps serving.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from egm_edge.errors import EgmError, InputError
from egm_edge.runtime.budget import MODES, BudgetSpec
from egm_edge.runtime.image import decode_data_url, load_image
from egm_edge.runtime.sampling import SamplingSpec


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    max_queue: int = 8
    request_timeout_s: float = 120.0
    max_body_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    allow_remote_images: bool = False
    remote_timeout_s: float = 10.0


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class _Timeout(Exception):
    pass


def _fetch_remote(url: str, cfg: ServerConfig) -> bytes:
    import urllib.request

    req = urllib.request.Request(url, headers={"User-Agent": "egm-edge"})
    try:
        with urllib.request.urlopen(req, timeout=cfg.remote_timeout_s) as r:  # noqa: S310 (operator-enabled)
            data = r.read(cfg.max_body_bytes + 1)
    except Exception as e:  # network errors of every kind become one sentence
        raise HttpError(400, f"Could not fetch the image URL ({type(e).__name__}: {e}).") from None
    if len(data) > cfg.max_body_bytes:
        raise HttpError(413, f"The image at the URL is larger than {cfg.max_body_bytes} bytes.")
    return data


def parse_request(body: dict, cfg: ServerConfig) -> dict:
    """Validate a chat-completions body; returns the arguments for the grounder."""
    if not isinstance(body, dict):
        raise HttpError(400, "The request body must be a JSON object.")
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
            texts.append(part["text"])
        else:
            raise HttpError(400, f"Unsupported content part type {kind!r}; send image_url and text.")
    if len(images) != 1:
        raise HttpError(400, f"Exactly one image is supported per request, got {len(images)}.")
    text = "".join(texts).strip()
    if not text:
        raise HttpError(400, "The request has no text; send the grounding prompt, e.g. 'Locate the dog, output its bbox coordinates using JSON format'.")
    if len(text) > 4000:
        raise HttpError(400, f"The text has {len(text)} characters, over the limit of 4000.")
    url = images[0]
    if url.startswith("data:"):
        try:
            raw = decode_data_url(url, max_bytes=cfg.max_body_bytes)
        except InputError as e:
            raise HttpError(400, str(e)) from None
    elif url.startswith(("http://", "https://")):
        if not cfg.allow_remote_images:
            raise HttpError(400, "Remote image URLs are disabled on this server; send a base64 data URL, or start it with --allow-remote-images.")
        raw = _fetch_remote(url, cfg)
    else:
        raise HttpError(400, "image_url must be a data: URL (or http(s) where the operator allows it).")
    try:
        image = load_image(raw, max_pixels=cfg.max_image_pixels)
    except InputError as e:
        raise HttpError(400, str(e)) from None

    def num(name, default, cast=float):
        v = body.get(name, default)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise HttpError(400, f"'{name}' must be a number, got {v!r}.")
        return cast(v)

    rp = num("repetition_penalty", 1.0)
    pp, fp = num("presence_penalty", 0.0), num("frequency_penalty", 0.0)
    if rp != 1.0 or pp != 0.0 or fp != 0.0:
        raise HttpError(400, "repetition/presence/frequency penalties are not supported; leave them at their neutral values.")
    budget = body.get("think_budget", "default")
    if budget != "default" and budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)):
        raise HttpError(400, f"'think_budget' must be an integer or null, got {budget!r}.")
    mode = body.get("budget_mode")
    if mode is not None and mode not in MODES:
        raise HttpError(400, f"'budget_mode' must be one of {', '.join(MODES)}, got {mode!r}.")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise HttpError(400, f"'max_tokens' must be a positive integer, got {max_tokens!r}.")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise HttpError(400, f"'seed' must be an integer, got {seed!r}.")
    try:
        sampling = SamplingSpec(num("temperature", 0.0), num("top_p", 1.0), num("top_k", 0, int) if num("top_k", 0, int) > 0 else 0, seed)
        if budget not in ("default", None):
            BudgetSpec(budget, mode or "hard")
    except InputError as e:
        raise HttpError(400, str(e)) from None
    kw = {"sampling": sampling, "budget_mode": mode, "max_new_tokens": max_tokens}
    if budget != "default":
        kw["think_budget"] = budget
    return {"image": image, "text": text, "kw": kw, "stream": bool(body.get("stream", False))}


class GroundingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, grounder, cfg: ServerConfig):
        self.grounder, self.cfg = grounder, cfg
        self.model_lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(cfg.max_queue + 1)  # running + waiting
        self.started = time.time()
        super().__init__((cfg.host, cfg.port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: GroundingServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet by default; errors are returned to the client
        pass

    # -- plumbing -----------------------------------------------------------------------------------------
    def _send_json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: HttpError) -> None:
        self._send_json(e.status, {"error": {"message": e.message, "type": e.kind, "code": e.status}})

    def _auth(self) -> None:
        key = self.server.cfg.api_key
        if key and self.headers.get("Authorization", "") != f"Bearer {key}":
            raise HttpError(401, "Missing or wrong API key; send 'Authorization: Bearer <key>'.", "authentication_error")

    def _body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None:
            raise HttpError(411, "The request needs a Content-Length header.")
        try:
            n = int(length)
        except ValueError:
            raise HttpError(400, f"Bad Content-Length {length!r}.") from None
        if n > self.server.cfg.max_body_bytes:
            raise HttpError(413, f"The request body has {n} bytes, over the limit of {self.server.cfg.max_body_bytes}.")
        raw = self.rfile.read(n)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HttpError(400, f"The request body is not valid JSON ({e.msg if hasattr(e, 'msg') else e}).") from None

    # -- routes -------------------------------------------------------------------------------------------
    def do_GET(self):
        try:
            if self.path == "/health":
                return self._send_json(200, {"status": "ok", "model": self.server.grounder.model_name,
                                             "uptime_s": round(time.time() - self.server.started, 1)})
            self._auth()
            if self.path == "/v1/models":
                return self._send_json(200, {"object": "list", "data": [
                    {"id": self.server.grounder.model_name, "object": "model", "created": int(self.server.started), "owned_by": "egm-edge"}]})
            raise HttpError(404, f"No route {self.path}.")
        except HttpError as e:
            self._error(e)

    def do_POST(self):
        try:
            self._auth()
            if self.path != "/v1/chat/completions":
                raise HttpError(404, f"No route {self.path}.")
            body = self._body()
            req = parse_request(body, self.server.cfg)
            if not self.server.slots.acquire(blocking=False):
                raise HttpError(503, f"The server is busy ({self.server.cfg.max_queue} requests already waiting); retry later.", "server_busy")
            try:
                self._complete(req, body)
            finally:
                self.server.slots.release()
        except HttpError as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _complete(self, req: dict, body: dict) -> None:
        cfg = self.server.cfg
        deadline = time.monotonic() + cfg.request_timeout_s
        if not self.server.model_lock.acquire(timeout=cfg.request_timeout_s):
            raise HttpError(504, f"The request waited longer than {cfg.request_timeout_s:.0f} s for the model.", "timeout")
        try:
            rid = "chatcmpl-" + uuid.uuid4().hex[:24]
            created = int(time.time())
            model = self.server.grounder.model_name
            events = self.server.grounder.stream_text(req["image"], req["text"], **req["kw"])
            if req["stream"]:
                return self._stream(events, rid, created, model, deadline)
            result = None
            try:
                for ev in events:
                    if time.monotonic() > deadline:
                        raise HttpError(504, f"The request ran longer than {cfg.request_timeout_s:.0f} s.", "timeout")
                    result = ev.result or result
            except EgmError as e:
                raise HttpError(400, str(e)) from None
            self._send_json(200, {
                "id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "finish_reason": _finish(result),
                             "message": {"role": "assistant", "content": result.answer, "reasoning_content": result.reasoning}}],
                "usage": _usage(result),
                "egm": _egm(result),
            })
        finally:
            self.server.model_lock.release()

    def _stream(self, events, rid, created, model, deadline) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def send(obj):
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
        send({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
        try:
            for ev in events:
                if time.monotonic() > deadline:
                    raise HttpError(504, "The request ran past its time limit.", "timeout")
                if ev.result is not None:
                    r = ev.result
                    send({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": _finish(r)}], "usage": _usage(r), "egm": _egm(r)})
                elif ev.text:
                    key = "reasoning_content" if ev.phase == "reasoning" else "content"
                    send({**base, "choices": [{"index": 0, "delta": {key: ev.text}, "finish_reason": None}]})
        except (HttpError, EgmError) as e:
            msg = e.message if isinstance(e, HttpError) else str(e)
            send({"error": {"message": msg, "type": "server_error"}})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def _finish(r) -> str:
    return "length" if r.truncated else "stop"


def _usage(r) -> dict:
    p, c = r.timings.get("prompt_tokens", 0), r.timings.get("output_tokens", 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "completion_tokens_details": {"reasoning_tokens": r.think_tokens}}


def _egm(r) -> dict:
    return {"box": r.to_dict()["box"], "box_norm1000": r.to_dict()["box_norm1000"], "think_tokens": r.think_tokens,
            "answer_tokens": r.answer_tokens, "budget_forced": r.budget_forced, "parse_reason": r.parse_reason,
            "timings": r.timings}


def serve(grounder, cfg: ServerConfig) -> GroundingServer:
    """Create the server (bound, not yet serving); call `serve_forever()` on it."""
    try:
        return GroundingServer(grounder, cfg)
    except OSError as e:
        raise EgmError(f"Cannot listen on {cfg.host}:{cfg.port} ({e.strerror}); choose another --port.") from None
