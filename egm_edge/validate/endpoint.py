"""A grounding client for any OpenAI-compatible server (egm-edge serve, SGLang, vLLM, TensorRT-LLM).

Contract: `EndpointPredictor(url)` talks to `<url>/v1/models` (to learn the model
name unless one is given) and `<url>/v1/chat/completions`, nothing else. Each
request is EGM's own: one user message with the image as a base64 PNG data URL
(the exact pixels the local runners see, EXIF dropped) and the text
`grounding.user_text(expression)`, greedy (temperature 0), `max_tokens`, plus the
thinking budget in the field of the server's kind (`endpoint_kinds`: egm-edge's
`think_budget`/`budget_mode`, TensorRT-LLM's and vLLM's `thinking_token_budget`,
SGLang's `custom_params.thinking_budget`, nothing for other servers); `kind="auto"`
tells the kind from `/v1/models`, and `describe()` records the kind, how it was told
and which mechanism capped the reasoning. The box is parsed from `content`
(after `reasoning_content` when the server splits reasoning out; the whole text
when the reasoning is inlined). Connection errors, timeouts, 408/429 and 5xx are
retried `retries` times with exponential backoff, then raise `EndpointError`;
other 4xx raise at once. Standard library only.
"""

from __future__ import annotations

import base64
import io
import json
import random
import socket
import time
import urllib.error
import urllib.request
from http.client import HTTPException
from typing import Any

from egm_edge.errors import EgmError, InputError
from egm_edge.models.families import get_family
from egm_edge.validate.endpoint_kinds import AUTO, detect_kind, get_kind

RETRY_STATUS = (408, 429, 500, 502, 503, 504)


class EndpointError(EgmError):
    """An endpoint that failed (after retries) or answered something that is not a chat completion."""


def base_url(url: str) -> str:
    """`http://host:port`, `.../v1` or `.../v1/` -> `http://host:port/v1`."""
    u = url.rstrip("/")
    for tail in ("/chat/completions", "/models"):
        if u.endswith(tail):
            u = u[: -len(tail)]
    return u if u.endswith("/v1") else u + "/v1"


def png_data_url(image) -> str:
    """The image's decoded pixels as a lossless PNG data URL (no EXIF: the stored frame is what is sent)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class EndpointPredictor:
    kind = "endpoint"
    concurrent = True

    def __init__(self, url: str, *, model_name: str | None = None, api_key: str | None = None, timeout_s: float = 120.0,
                 retries: int = 3, backoff_s: float = 0.5, family: str = "qwen3_vl", kind: str = AUTO):
        if retries < 0 or timeout_s <= 0:
            raise InputError(f"retries must be >= 0 and the timeout positive, got retries={retries}, timeout={timeout_s}.")
        self.url = url
        self.base = base_url(url)
        self.api_key = api_key
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self.family = get_family(family).name  # an unknown family is refused before any request
        self.endpoint_kind = None if kind == AUTO else get_kind(kind)  # likewise an unknown kind
        self.detected_by = "given (--endpoint-kind)"
        listing = None
        if model_name is None or self.endpoint_kind is None:
            listing = self._listing(required=model_name is None)
        self.model_name = model_name or self._first_model(listing)
        if self.endpoint_kind is None:
            self.endpoint_kind, self.detected_by = detect_kind(listing)
        self._settings = None  # the settings of the last request, for describe()

    # -- HTTP -------------------------------------------------------------------------------------------------
    def _request(self, path: str, body: dict | None = None) -> dict:
        """GET (body None) or POST JSON with bounded retries; returns the decoded JSON object."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "egm-edge-validate"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(self.backoff_s * 2 ** (attempt - 1), 30.0)
                time.sleep(delay * (0.75 + 0.5 * random.random()))  # jitter: concurrent workers do not retry in lockstep
            req = urllib.request.Request(self.base + path, data=data, headers=headers, method="GET" if body is None else "POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as r:  # noqa: S310 (the user's endpoint)
                    raw = r.read()
            except urllib.error.HTTPError as e:
                detail = _error_detail(e)
                last = f"HTTP {e.code}{': ' + detail if detail else ''}"
                if e.code in RETRY_STATUS:
                    continue
                raise EndpointError(f"{self.base}{path} answered {last}; fix the request or the server, it was not retried.") from None
            except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError, HTTPException, OSError) as e:
                reason = getattr(e, "reason", e)
                last = f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason
                continue
            try:
                return json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise EndpointError(f"{self.base}{path} answered something that is not JSON ({raw[:80]!r}).") from None
        raise EndpointError(f"{self.base}{path} failed {self.retries + 1} times (last: {last}); check the server, then rerun to retry.")

    def _listing(self, required: bool) -> dict | None:
        """GET /v1/models; without it the model name is unknown (InputError when `required`), the kind undetected."""
        try:
            listing = self._request("/models")
        except EndpointError as e:
            if not required:
                return None
            raise InputError(f"The endpoint {self.url} did not list its models ({e}); check the URL or pass --model-name.") from None
        return listing if isinstance(listing, dict) else {}

    def _first_model(self, listing: dict) -> str:
        models = [m.get("id") for m in (listing.get("data") or []) if isinstance(m, dict) and m.get("id")]
        if not models:
            raise InputError(f"The endpoint {self.url} lists no models at /v1/models; pass --model-name.")
        return str(models[0])

    # -- predictor interface ----------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        d = {"kind": self.kind, "url": self.base, "name": self.model_name, "model": self.model_name,
             "endpoint_kind": self.endpoint_kind.name, "endpoint_kind_source": self.detected_by,
             "budget_field": self.endpoint_kind.budget_field}
        if self._settings is not None:  # set by the first request of this run (a wholly resumed run has none)
            d["budget_mechanism"] = self.endpoint_kind.mechanism(self._settings)
        return d

    def fingerprint(self) -> dict[str, Any]:
        # What a remote server runs cannot be hashed; the URL and model name stand for it. The kind joins them
        # only where it is not egm-edge's (whose fields every request carried before kinds existed), so an
        # egm-edge server's predictions made then still resume; another kind's budget now reaches the server.
        fp = {"kind": self.kind, "url": self.base, "model": self.model_name}
        return fp if self.endpoint_kind.name == "egm" else {**fp, "endpoint_kind": self.endpoint_kind.name}

    def tokenizer_sha256(self) -> str | None:
        return None

    def defaults(self) -> dict[str, Any]:
        return {}

    def request_body(self, image, expression: str, task: str, settings) -> dict:
        from egm_edge.grounding import user_text

        body = {
            "model": self.model_name,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": png_data_url(image)}},
                {"type": "text", "text": user_text(expression, task=task, family=self.family)},
            ]}],
            "temperature": 0.0,
            "top_p": 1.0,
            "max_tokens": settings.max_new_tokens,
            "stream": False,
        }
        self._settings = settings
        return {**body, **self.endpoint_kind.budget_fields(settings)}

    def predict(self, image, expression: str, task: str, settings):
        t0 = time.perf_counter()
        resp = self._request("/chat/completions", self.request_body(image, expression, task, settings))
        wall_ms = (time.perf_counter() - t0) * 1000.0
        return result_from_response(resp, image.size[0], image.size[1], wall_ms, family=self.family, where=self.base)


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read() or b"{}")
        msg = (body.get("error") or {}).get("message") if isinstance(body.get("error"), dict) else body.get("error") or body.get("message")
        return str(msg)[:200] if msg else ""
    except (ValueError, AttributeError, OSError):
        return ""


def result_from_response(resp: dict, width: int, height: int, wall_ms: float, *, family="qwen3_vl", where: str = "the endpoint"):
    """A GroundingResult from a chat completion; think tokens from usage (None when the server does not say).
    A reasoning split out by the server is joined back with `family`'s closing think tag."""
    from egm_edge.grounding import GroundingResult

    try:
        choice = resp["choices"][0]
        msg = choice["message"]
    except (KeyError, IndexError, TypeError):
        raise EndpointError(f"{where} answered JSON without choices[0].message ({json.dumps(resp)[:120]}).") from None
    content = msg.get("content") or ""
    reasoning = msg.get("reasoning_content") or msg.get("reasoning")
    close = get_family(family).tokens.think_close
    text = f"{reasoning}{close}\n\n{content}" if reasoning else content
    usage = resp.get("usage") or {}
    details = usage.get("completion_tokens_details") or {}
    egm = resp.get("egm") or {}
    think = details.get("reasoning_tokens", egm.get("think_tokens"))
    completion = usage.get("completion_tokens")
    answer = egm.get("answer_tokens")
    if answer is None and completion is not None:
        answer = completion - (think or 0)
    timings = {"total": round(wall_ms, 3), "request": round(wall_ms, 3)}
    if isinstance(egm.get("timings"), dict):
        timings["server"] = egm["timings"]
    r = GroundingResult.from_output(
        text, width, height, think_tokens=think, answer_tokens=answer if answer is not None else 0,
        budget_forced=bool(egm.get("budget_forced", False)), family=family, timings=timings,
        truncated=choice.get("finish_reason") == "length",
    )
    if not reasoning and close not in content:
        r.answer = content.strip()  # a server that hides the reasoning returns only the answer
    return r
