"""Endpoints as a side of validate: a live `egm-edge serve` in a thread, and servers that fail."""

from __future__ import annotations

import json
import threading
import time

import pytest

from egm_edge.errors import InputError
from egm_edge.validate import EndpointPredictor, validate
from egm_edge.validate.endpoint import base_url, result_from_response

from validate_helpers import JsonHandler, Scripted, ThreadedServer, exact


class Live:
    """`egm-edge serve` on the tiny bundle, in a thread."""

    def __init__(self, bundle):
        from egm_edge.runtime.grounder import Grounder
        from egm_edge.runtime.server import ServerConfig, serve

        self.server = serve(Grounder.open(bundle), ServerConfig(port=0))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Failing(ThreadedServer):
    """Lists a model, then answers chat completions with `status` (or sleeps `delay` s first); records concurrency."""

    def __init__(self, status=500, delay=0.0):
        outer = self
        self.calls, self.inflight, self.max_inflight = 0, 0, 0
        self.lock = threading.Lock()

        class H(JsonHandler):
            def do_GET(self):
                self._send(200, {"data": [{"id": "broken-model"}]})

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                with outer.lock:
                    outer.calls += 1
                    outer.inflight += 1
                    outer.max_inflight = max(outer.max_inflight, outer.inflight)
                try:
                    time.sleep(max(delay, 0.02))
                    self._send(status, {"error": {"message": "the model crashed"}})
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with outer.lock:
                        outer.inflight -= 1

        self.start(H)


@pytest.fixture(scope="module")
def live(tiny_bundle):
    s = Live(tiny_bundle)
    yield s
    s.close()


def test_bundle_against_its_own_server_agrees(live, tiny_bundle, dataset, tmp_path):
    path, _ = dataset
    rep = validate(tiny_bundle, live.url + "/v1", path, out_dir=tmp_path / "o", limit=3, think_budget=4, progress=False, concurrency=2)
    assert rep.data["reference"]["kind"] == "endpoint" and rep.data["reference"]["model"] == "bundle"
    assert "not checked: the reference is an endpoint" in rep.data["tokenizer_check"]
    o = rep.data["groups"]["overall"]
    assert o["reference"]["errors"] == 0 and o["delta"]["pairs"] == 3
    assert o["delta"]["miou_delta"] == 0.0 and rep.verdict == "pass"
    cand = [json.loads(x) for x in (tmp_path / "o" / "predictions-candidate.jsonl").read_text().splitlines()]
    ref = {r["id"]: r for r in map(json.loads, (tmp_path / "o" / "predictions-reference.jsonl").read_text().splitlines())}
    for c in cand:  # the same pixels (lossless PNG) and settings give the same text and box
        r = ref[c["id"]]
        assert r["result"]["answer"] == c["result"]["answer"] and r["result"]["box"] == c["result"]["box"]
        assert r["think_tokens"] == c["think_tokens"] == 4


def test_a_500_endpoint_is_retried_then_reported_not_scored(dataset, tmp_path):
    path, recs = dataset
    srv = Failing(500)
    try:
        rep = validate(Scripted(exact(recs)), srv.url, path, out_dir=tmp_path / "o", limit=4, retries=2, backoff_s=0.01,
                       concurrency=2, progress=False)
    finally:
        srv.close()
    assert srv.calls == 4 * 3 and srv.max_inflight <= 2
    assert rep.verdict == "incomplete" and rep.exit_code == 2
    o = rep.data["groups"]["overall"]
    assert o["reference"]["errors"] == 4 and o["reference"]["acc"] is None and o["delta"]["pairs"] == 0
    assert any("HTTP 500: the model crashed" in n and "4 reference samples failed" in n for n in rep.data["notes"])
    rows = [json.loads(x) for x in (tmp_path / "o" / "predictions-reference.jsonl").read_text().splitlines()]
    assert all(r["error"] and "hit" not in r for r in rows)


def test_timeouts_are_errors(dataset, tmp_path):
    path, recs = dataset
    srv = Failing(200, delay=1.0)
    try:
        rep = validate(Scripted(exact(recs)), srv.url, path, out_dir=tmp_path / "o", limit=2, retries=1, backoff_s=0.01,
                       timeout_s=0.2, progress=False)
    finally:
        srv.close()
    assert rep.data["groups"]["overall"]["reference"]["errors"] == 2
    assert any("failed 2 times" in n for n in rep.data["notes"])


def test_a_4xx_is_not_retried(dataset, tmp_path):
    path, recs = dataset
    srv = Failing(400)
    try:
        rep = validate(Scripted(exact(recs)), srv.url, path, out_dir=tmp_path / "o", limit=2, retries=3, backoff_s=0.01, progress=False)
    finally:
        srv.close()
    assert srv.calls == 2 and rep.data["groups"]["overall"]["reference"]["errors"] == 2


def test_an_endpoint_that_is_down_is_bad_input(tmp_path):
    srv = Failing()
    url = srv.url
    srv.close()
    with pytest.raises(InputError, match="did not list its models"):
        EndpointPredictor(url, retries=1, backoff_s=0.01, timeout_s=1)


def test_url_forms_and_responses():
    assert base_url("http://h:1") == base_url("http://h:1/v1/") == base_url("http://h:1/v1/chat/completions") == "http://h:1/v1"
    resp = {"choices": [{"message": {"content": '```json\n[{"bbox_2d": [100, 100, 500, 500], "label": "x"}]\n```',
                                     "reasoning_content": "It is the left one."}, "finish_reason": "stop"}],
            "usage": {"completion_tokens": 30, "completion_tokens_details": {"reasoning_tokens": 7}}}
    r = result_from_response(resp, 200, 100, 12.5)
    assert r.box == (20.0, 10.0, 100.0, 50.0) and r.think_tokens == 7 and r.answer_tokens == 23 and r.reasoning == "It is the left one."
    inline = {"choices": [{"message": {"content": 'hmm [1, 2, 3, 4]</think>\n\n{"bbox_2d": [0, 0, 1000, 1000]}'}}]}
    r = result_from_response(inline, 200, 100, 1.0)
    assert r.box == (0.0, 0.0, 199.0, 99.0) and r.think_tokens is None
    bare = {"choices": [{"message": {"content": '{"bbox_2d": [0, 0, 500, 500]}', "reasoning_content": None}}]}
    assert result_from_response(bare, 200, 100, 1.0).answer == '{"bbox_2d": [0, 0, 500, 500]}'


def test_family_reads_its_record():
    """InternVL answers in its box tag; a split-out reasoning is joined back with the family's closing tag."""
    resp = {"choices": [{"message": {"content": "[1, 2, 3, 4] <box>[[100, 100, 500, 500]]</box>",
                                     "reasoning_content": "the left one"}}]}
    r = result_from_response(resp, 200, 100, 1.0, family="internvl")
    assert r.box == (20.0, 10.0, 100.0, 50.0) and r.parse_method == "box_tag" and r.reasoning == "the left one"
    with pytest.raises(InputError, match="Unknown model family 'llava'"):
        EndpointPredictor("http://127.0.0.1:9", family="llava")  # refused before any request


def test_family_is_given_only_for_endpoints(tmp_path):
    """`validate --family` reaches an endpoint (nothing else says which prompts it expects); unknown names are refused."""
    from egm_edge.cli import main
    from egm_edge.validate.predictors import open_predictor

    assert open_predictor("http://127.0.0.1:9", model_name="m", family="internvl").family == "internvl"
    assert open_predictor("http://127.0.0.1:9", model_name="m").family == "qwen3_vl"
    data = tmp_path / "d.jsonl"
    data.write_text('{"image": "x.jpg", "sent": "the cat", "bbox": [1, 1, 5, 5], "height": 10, "width": 10}\n')
    assert main(["validate", "--candidate", "http://127.0.0.1:9", "--reference", "http://127.0.0.1:9", "--data", str(data),
                 "--family", "llava", "--out", str(tmp_path / "o")]) == 2
