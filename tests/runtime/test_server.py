"""The OpenAI-compatible server, driven by the `openai` client and raw HTTP, on a real CPU bundle."""

import base64
import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from egm_edge.runtime.grounder import Grounder
from egm_edge.runtime.server import ServerConfig, serve

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def grounder(tiny_bundle):
    return Grounder.open(tiny_bundle)


class Running:
    def __init__(self, grounder, **cfg):
        self.server = serve(grounder, ServerConfig(port=0, **cfg))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def server(grounder):
    s = Running(grounder)
    yield s
    s.close()


def data_url(path):
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def egm_messages(scene, text="Locate the red square, output its bbox coordinates using JSON format"):
    # Exactly the request EGM's evaluation script sends (verl/scripts/sglang_infer.py).
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(scene), "detail": "high"}},
        {"type": "text", "text": text},
    ]}]


def post(url, body: bytes, headers=None):
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_egm_request_through_the_openai_client(server, grounder, scene):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    resp = client.chat.completions.create(
        model=grounder.model_name, messages=egm_messages(scene), temperature=0.0, top_p=1.0, presence_penalty=0.0,
        max_tokens=40, extra_body={"top_k": 20, "repetition_penalty": 1.0, "think_budget": 6},
    )
    msg = resp.choices[0].message
    direct = grounder.ground(scene, "the red square", think_budget=6, max_new_tokens=40)
    assert msg.content == direct.answer
    assert msg.model_extra["reasoning_content"] == direct.reasoning
    assert resp.usage.completion_tokens_details.reasoning_tokens == 6
    assert resp.model_extra["egm"]["budget_forced"] is True


def test_streaming(server, grounder, scene):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    stream = client.chat.completions.create(model=grounder.model_name, messages=egm_messages(scene), max_tokens=40,
                                            stream=True, extra_body={"think_budget": 5})
    reasoning, content, finish = "", "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        reasoning += (d.model_extra or {}).get("reasoning_content") or ""
        content += d.content or ""
        finish = chunk.choices[0].finish_reason or finish
    direct = grounder.ground(scene, "the red square", think_budget=5, max_new_tokens=40)
    assert reasoning.strip() == direct.reasoning and content.strip() == direct.answer
    assert finish in ("stop", "length")


def test_models_and_health(server, grounder):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    assert [m.id for m in client.models.list()] == [grounder.model_name]
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"


def test_remote_image_urls_are_refused(server, scene):
    msgs = egm_messages(scene)
    msgs[0]["content"][0]["image_url"]["url"] = "http://198.51.100.7/cat.jpg"
    status, body = post(server.url, json.dumps({"messages": msgs}).encode())
    assert status == 400 and "Remote image URLs are disabled" in body["error"]["message"]


@pytest.mark.parametrize("body,needle", [
    (b"{not json", "not valid JSON"),
    (b"[]", "JSON object"),
    (json.dumps({"messages": []}).encode(), "non-empty"),
    (json.dumps({"messages": [{"role": "user", "content": "hello"}]}).encode(), "image_url"),
])
def test_malformed_requests_get_one_sentence(server, body, needle):
    status, resp = post(server.url, body)
    assert status == 400 and needle in resp["error"]["message"]


def test_bad_fields(server, scene, tmp_path):
    for extra, needle in [({"think_budget": -1}, "think budget"), ({"think_budget": "x"}, "integer"),
                          ({"temperature": 99}, "temperature"), ({"max_tokens": 0}, "max_tokens"),
                          ({"repetition_penalty": 1.3}, "not supported"), ({"budget_mode": "soft"}, "budget_mode")]:
        status, resp = post(server.url, json.dumps({"messages": egm_messages(scene), **extra}).encode())
        assert status == 400 and needle in resp["error"]["message"], (extra, resp)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    status, resp = post(server.url, json.dumps({"messages": egm_messages(bad)}).encode())
    assert status == 400 and "Image" in resp["error"]["message"]
    msgs = egm_messages(scene)
    msgs[0]["content"][0]["image_url"]["url"] = "data:image/png;base64,@@@"
    assert post(server.url, json.dumps({"messages": msgs}).encode())[0] == 400


def test_limits_key_queue_and_timeout(grounder, scene):
    s = Running(grounder, api_key="sekret", max_queue=0, request_timeout_s=1.0, max_body_bytes=200_000)
    try:
        body = json.dumps({"messages": egm_messages(scene), "max_tokens": 30}).encode()
        assert post(s.url, body)[0] == 401
        auth = {"Authorization": "Bearer sekret"}
        assert post(s.url, b"x" * 300_000, auth)[0] == 413
        # Hold the model: the first request waits (and times out), the second finds no free slot.
        s.server.model_lock.acquire()
        results = {}
        t = threading.Thread(target=lambda: results.setdefault("first", post(s.url, body, auth)))
        t.start()
        time.sleep(0.3)
        status, resp = post(s.url, body, auth)
        assert status == 503 and "busy" in resp["error"]["message"]
        t.join()
        assert results["first"][0] == 504
        s.server.model_lock.release()
        status, resp = post(s.url, body, auth)  # and it keeps serving
        assert status == 200 and resp["choices"][0]["message"]["role"] == "assistant"
    finally:
        s.close()


def test_serve_cli_starts_answers_and_stops(tiny_bundle):
    import re
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "egm_edge", "serve", "--bundle", str(tiny_bundle), "--port", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        port = int(re.search(r":(\d+)/v1", line).group(1))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            assert json.loads(r.read())["status"] == "ok"
    finally:
        p.terminate()
        p.wait(timeout=10)


def test_serve_cli_bad_bundle(tmp_path, capsys):
    from egm_edge.cli import main

    assert main(["serve", "--bundle", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
