"""Helpers for validate tests: a small on-disk grounding set and scripted predictors (no model)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image, ImageDraw

from egm_edge.grounding import GroundingResult, format_answer, to_norm1000


def write_dataset(root, n: int = 12, splits=("a", "b"), size=(160, 120)):
    """n images, each with one red box; split i % len(splits); returns (jsonl path, records)."""
    root.mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n):
        w, h = size
        x1, y1 = 5 + (i * 11) % 80, 5 + (i * 7) % 50
        box = [x1, y1, x1 + 40 + i % 5, y1 + 30 + i % 3]
        img = Image.new("RGB", size, (235, 235, 235))
        ImageDraw.Draw(img).rectangle(box, fill=(210, 30, 30))
        img.save(root / f"img{i:03d}.png")
        recs.append({"image": f"img{i:03d}.png", "sent": f"the red box number {i}", "bbox": box, "height": h, "width": w,
                     "split": splits[i % len(splits)]})
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path, recs


class Scripted:
    """A predictor that answers from a table: expression -> pixel box (or None); counts calls; can fail or stop."""

    kind = "scripted"
    concurrent = False

    def __init__(self, boxes: dict, name: str = "scripted", tokenizer: str | None = "tok0", fail_on=(), stop_after=None,
                 think_tokens: int = 3):
        self.boxes, self.name, self.tok = boxes, name, tokenizer
        self.fail_on, self.stop_after, self.think = set(fail_on), stop_after, think_tokens
        self.calls = 0

    def describe(self):
        return {"kind": self.kind, "name": self.name, "path": self.name}

    def fingerprint(self):
        return {"kind": self.kind, "name": self.name}

    def tokenizer_sha256(self):
        return self.tok

    def defaults(self):
        return {}

    def predict(self, image, expression, task, settings):
        from egm_edge.errors import InputError

        if self.stop_after is not None and self.calls >= self.stop_after:
            raise KeyboardInterrupt
        self.calls += 1
        if expression in self.fail_on:
            raise InputError(f"scripted failure for {expression!r}")
        box = self.boxes.get(expression)
        w, h = image.size
        text = "thinking</think>\n\n" + (format_answer(to_norm1000(box, w, h), "x") if box else "no idea")
        return GroundingResult.from_output(text, w, h, think_tokens=self.think, answer_tokens=5, budget_forced=False,
                                           timings={"total": 10.0 + self.calls})


def exact(recs):
    return {r["sent"]: tuple(r["bbox"]) for r in recs}


def shifted(recs, dx):
    return {r["sent"]: (r["bbox"][0] + dx, r["bbox"][1], r["bbox"][2] + dx, r["bbox"][3]) for r in recs}


class JsonHandler(BaseHTTPRequestHandler):
    """A quiet request handler for fake servers, with `_send(code, obj)` answering JSON."""

    def log_message(self, *a):
        pass

    def _send(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class ThreadedServer:
    """Serves `handler` on 127.0.0.1 (a free port) in a daemon thread: `url`, then `close()`."""

    def start(self, handler) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class FakeChat(ThreadedServer):
    """A fake OpenAI-compatible server. GET /v1/models lists model "served" (owned_by `owned_by`, none if None);
    a POST to chat completions is checked by `check(body)` (a message: HTTP 400, as a request model rejects) and,
    after `delay(body)` seconds, answered with `answer(body)` -> (message dict, usage dict). `bodies` holds every
    POST body, `rejected` those refused, `gets` counts GETs."""

    def __init__(self, answer, owned_by: str | None = None, check=None, delay=None):
        import time

        outer = self
        self.bodies, self.rejected, self.gets = [], [], 0

        class H(JsonHandler):
            def do_GET(self):
                outer.gets += 1
                card = {"id": "served", "object": "model", **({"owned_by": owned_by} if owned_by else {})}
                self._send(200, {"object": "list", "data": [card]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.bodies.append(body)
                problem = check(body) if check else None
                if problem:
                    outer.rejected.append(body)
                    return self._send(400, {"object": "error", "message": problem, "code": 400})
                if delay:
                    time.sleep(delay(body))
                message, usage = answer(body)
                self._send(200, {"choices": [{"message": {"role": "assistant", **message}, "finish_reason": "stop"}],
                                 "usage": usage})

        self.start(H)
