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
    s = Running(grounder, api_key="sekret", max_queue=0, max_batch=1, request_timeout_s=1.0, max_body_bytes=200_000)
    try:
        body = json.dumps({"messages": egm_messages(scene), "max_tokens": 30}).encode()
        assert post(s.url, body)[0] == 401
        auth = {"Authorization": "Bearer sekret"}
        assert post(s.url, b"x" * 300_000, auth)[0] == 413
        # Hold the model: the first request waits (and times out), the second finds no free slot.
        s.server.engine.pause()
        results = {}
        t = threading.Thread(target=lambda: results.setdefault("first", post(s.url, body, auth)))
        t.start()
        time.sleep(0.3)
        status, resp = post(s.url, body, auth)
        assert status == 503 and "busy" in resp["error"]["message"]
        t.join()
        assert results["first"][0] == 504
        s.server.engine.resume()
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

    assert main(["serve", "--bundle", str(tmp_path / "none"), "--port", "0"]) == 2  # the port is checked first
    assert "does not exist" in capsys.readouterr().err


# -- OpenAI semantics --------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_tokens", [1, 2, 3, 4, 5, 10, 18, 19, 25])
def test_small_max_tokens_truncate_instead_of_refusing(server, scene, max_tokens):
    # The tiny bundle's answer cap is 16 and its close is 2 tokens: 19 fit an answer with no reasoning.
    status, resp = post(server.url, json.dumps({"messages": egm_messages(scene), "max_tokens": max_tokens,
                                                "think_budget": 100}).encode())
    assert status == 200, resp
    usage, choice = resp["usage"], resp["choices"][0]
    assert 1 <= usage["completion_tokens"] <= max_tokens
    assert usage["completion_tokens_details"]["reasoning_tokens"] <= max(0, max_tokens - 19)  # the budget shrank
    if max_tokens < 19:
        assert choice["finish_reason"] == "length" or usage["completion_tokens"] < max_tokens
    if max_tokens <= 3:  # not even the close and one answer token fit: the smallest output, cut at max_tokens
        assert choice["finish_reason"] == "length"
    if max_tokens <= 2:
        assert usage["completion_tokens"] == max_tokens


def test_small_max_tokens_streams_truncated(server, grounder, scene):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    stream = client.chat.completions.create(model=grounder.model_name, messages=egm_messages(scene), max_tokens=2,
                                            stream=True, extra_body={"think_budget": 5})
    finish, usage = None, None
    for chunk in stream:
        if chunk.choices:
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert finish == "length" and usage.completion_tokens == 2


@pytest.mark.parametrize("extra,needle", [({"n": 2}, "'n'"), ({"n": 0}, "'n'"), ({"top_k": -2}, "top_k"),
                                          ({"top_k": -20}, "top_k"), ({"think_budget": "lots"}, "think_budget")])
def test_unsupported_choices_are_refused(server, scene, extra, needle):
    status, resp = post(server.url, json.dumps({"messages": egm_messages(scene), **extra}).encode())
    assert status == 400 and needle in resp["error"]["message"], resp


def test_null_budget_is_unlimited_absent_is_the_bundles_default_and_top_k_minus_one_is_off():
    """One parser for the HTTP edge (DecodeSettings.from_request): JSON null means unlimited, as the API
    documents; a missing field means the bundle's default; top_k -1 is "off" as vLLM/SGLang clients send it."""
    from egm_edge.runtime.server_request import parse_decode
    from egm_edge.runtime.settings import DecodeSettings

    assert parse_decode({"think_budget": None}).unlimited
    assert parse_decode({}) == DecodeSettings() and parse_decode({}).think_budget is None
    assert parse_decode({"top_k": -1, "temperature": 0.0}).sampling.top_k == 0


def test_response_says_when_the_model_swapped_corners(server, scene):
    status, resp = post(server.url, json.dumps({"messages": egm_messages(scene), "max_tokens": 40}).encode())
    assert status == 200 and isinstance(resp["egm"]["corners_swapped"], bool)


def test_n_equal_one_is_accepted(server, scene):
    status, resp = post(server.url, json.dumps({"messages": egm_messages(scene), "n": 1, "max_tokens": 25}).encode())
    assert status == 200 and len(resp["choices"]) == 1


def test_images_above_max_pixels_are_reduced_and_boxes_stay_in_the_original_frame(server, grounder, scene, tmp_path):
    from PIL import Image

    from egm_edge.grounding.parse import to_pixels
    from egm_edge.runtime.image import load_image
    from egm_edge.runtime.preprocess import preprocess_image

    big = tmp_path / "big.png"  # 2400x1600 = 3.8 MP, 15x the tiny bundle's max_pixels
    Image.open(scene).resize((2400, 1600), Image.NEAREST).save(big)
    cfg = grounder.bundle.image_processor
    full, reduced = load_image(big), load_image(big, reduce_to=cfg.max_pixels)
    assert reduced.size[0] * reduced.size[1] >= cfg.max_pixels and reduced.size[0] < 2400
    a, b = preprocess_image(full, cfg), preprocess_image(reduced, cfg)
    assert a.grid_thw == b.grid_thw  # same tokens for the model
    # Box-filter reduction then bicubic vs bicubic alone: mean difference a few levels of 255 (normalised by 0.5).
    assert abs(a.pixel_values - b.pixel_values).mean() < 0.02
    small = load_image(scene, reduce_to=cfg.max_pixels)  # 300x200 is under max_pixels: untouched
    assert small.tobytes() == load_image(scene).tobytes()

    status, resp = post(server.url, json.dumps({"messages": egm_messages(big), "max_tokens": 40,
                                                "think_budget": 4}).encode())
    assert status == 200
    egm = resp["egm"]
    if egm["box_norm1000"] is not None:
        assert egm["box"] == list(to_pixels(egm["box_norm1000"], 2400, 1600))


def test_header_probe_and_jpeg_draft(tmp_path):
    from PIL import Image

    from egm_edge.runtime.image import load_image, probe_image

    p = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 3000), (10, 200, 30)).save(p, quality=90)
    size, decoded = probe_image(p.read_bytes(), reduce_to=262144)
    assert size == (4000, 3000) and decoded == (1000, 750)  # DCT scaling 1/4 keeps >= 262144 pixels
    img = load_image(p.read_bytes(), reduce_to=262144)
    assert img.size[0] * img.size[1] >= 262144 and img.size[0] <= 1000 and img.mode == "RGB"
    assert probe_image(p.read_bytes()) == ((4000, 3000), (4000, 3000))


# -- the command line: key file, warning, port -------------------------------------------------------------

def test_api_key_on_the_command_line_warns(tmp_path, capsys):
    from egm_edge.cli import main

    assert main(["serve", "--bundle", str(tmp_path / "none"), "--port", "0", "--api-key", "sekret"]) == 2
    err = capsys.readouterr().err
    assert "visible" in err and "--api-key-file" in err and "sekret" not in err


@pytest.mark.parametrize("content,needle", [(None, "does not exist"), ("", "empty"), ("  \n", "empty")])
def test_api_key_file_errors(tmp_path, capsys, content, needle):
    from egm_edge.cli import main

    kf = tmp_path / "key"
    if content is not None:
        kf.write_text(content)
    assert main(["serve", "--bundle", str(tmp_path / "none"), "--api-key-file", str(kf)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "--api-key-file" in err and "Traceback" not in err


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_bad_port_fails_before_loading_the_bundle(tmp_path, capsys, port):
    from egm_edge.cli import main

    # The bundle does not exist: the port must be refused first, in one sentence.
    assert main(["serve", "--bundle", str(tmp_path / "none"), "--port", port]) == 2
    err = capsys.readouterr().err
    assert f"--port {port}" in err and "0 and 65535" in err and "does not exist" not in err


def test_port_in_use_fails_before_loading_the_bundle(tmp_path, capsys):
    import socket

    from egm_edge.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--bundle", str(tmp_path / "none"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "does not exist" not in err


def test_serve_cli_with_an_api_key_file(tiny_bundle, tmp_path):
    import re
    import subprocess
    import sys

    kf = tmp_path / "key"
    kf.write_text("file-sekret\n")
    p = subprocess.Popen([sys.executable, "-m", "egm_edge", "serve", "--bundle", str(tiny_bundle), "--port", "0",
                          "--api-key-file", str(kf)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(re.search(r":(\d+)/v1", p.stdout.readline()).group(1))
        url = f"http://127.0.0.1:{port}/v1/models"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url, timeout=10)
        assert e.value.code == 401
        req = urllib.request.Request(url, headers={"Authorization": "Bearer file-sekret"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200
    finally:
        p.terminate()
        p.wait(timeout=10)


def test_api_key_sources(tmp_path, monkeypatch, capsys):
    import argparse

    from egm_edge.commands.serve import api_key
    from egm_edge.errors import InputError

    ns = lambda **kw: argparse.Namespace(**{"api_key": None, "api_key_file": None, **kw})  # noqa: E731
    monkeypatch.delenv("EGM_EDGE_API_KEY", raising=False)
    assert api_key(ns()) is None
    monkeypatch.setenv("EGM_EDGE_API_KEY", "from-env")
    assert api_key(ns()) == "from-env" and capsys.readouterr().err == ""  # no warning for the environment
    kf = tmp_path / "key"
    kf.write_text("from-file\n")
    assert api_key(ns(api_key_file=str(kf))) == "from-file"  # the file wins over the environment
    with pytest.raises(InputError, match="not both|one way"):
        api_key(ns(api_key="x", api_key_file=str(kf)))
