"""Sweeps of something already deployed: an endpoint (a local fake TensorRT-LLM server) and a bundle, latency measured there.

The fake answers like trtllm-serve: it lists its model as owned_by "tensorrt_llm", refuses any request field its
ChatCompletionRequest does not have (extra="forbid"), reasons min(budget, 40) tokens (reported in
usage.completion_tokens_details.reasoning_tokens), answers 10 more tokens, takes 20 ms + 1 ms per reasoning token,
and finds the box only when it reasons at least 16 tokens.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from egm_edge.errors import InputError
from egm_edge.grounding import to_norm1000
from egm_edge.sweep import RecordStore, analyze, sweep_deployed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "validate"))
from validate_helpers import FakeChat, write_dataset  # noqa: E402

TRTLLM_FIELDS = {"model", "messages", "temperature", "top_p", "max_tokens", "stream", "thinking_token_budget"}
KW = dict(budgets=(0, 16, "none"), target="h100", progress=False, max_answer_tokens=16)


def reasoning(body) -> int:
    b = body.get("thinking_token_budget")
    return 40 if b is None else min(int(b), 40)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployed")
    data, recs = write_dataset(root / "data", n=6)
    boxes = {r["sent"]: r["bbox"] for r in recs}

    def answer(body):
        text = body["messages"][0]["content"][1]["text"]
        box = list(boxes[re.match(r"Locate (.+), output", text).group(1)])
        if reasoning(body) < 16:
            box = [box[0] + 60, box[1], box[2] + 60, box[3]]  # a wrong box: no overlap
        content = json.dumps([{"bbox_2d": list(to_norm1000(box, 160, 120)), "label": "x"}])
        return ({"content": content, "reasoning_content": "look " * reasoning(body)},
                {"completion_tokens": reasoning(body) + 10, "completion_tokens_details": {"reasoning_tokens": reasoning(body)}})

    def check(body):
        extra = set(body) - TRTLLM_FIELDS
        return f"extra fields not permitted: {sorted(extra)}" if extra else None

    srv = FakeChat(answer, "tensorrt_llm", check, delay=lambda body: 0.02 + 0.001 * reasoning(body))
    out = root / "out"
    res = sweep_deployed(srv.url, data=data, out_dir=out, **KW)
    yield srv, data, out, res
    srv.close()


def test_records_are_measured_at_the_endpoint_with_the_kinds_budget(served):
    srv, _, out, res = served
    assert res.ran == 3 and len(res.records) == 3 and not srv.rejected
    by = {r["think_budget"]: r for r in res.records}
    for budget, think in ((0, 0), (16, 16), (None, 40)):
        r = by[budget]
        assert r["target"] == "h100" and r["measured_with"] == "endpoint" and r["recipe"] == "served" and r["precision"] is None
        assert r["latency"]["source"] == "measured" and r["latency"]["measured_on"].startswith(f"the endpoint {srv.url}/v1")
        assert r["accuracy"]["n"] == 6 and r["accuracy"]["mean_think_tokens"] == think
        assert r["latency"]["mean_output_tokens"] == think + 10  # the server's usage tokens
        assert r["latency"]["mean_ms"] >= 20 + think and r["latency"]["p90_ms"] >= r["latency"]["p50_ms"] >= 20 + think
        assert r["latency"]["ms_per_token"] == r["latency"]["wall_ms_per_output_token"] > 0
        assert r["memory_gib"] is None and r["deployment"]["endpoint_kind"] == "trtllm"
    assert by[0]["accuracy"]["acc"] == 0 and by[16]["accuracy"]["acc"] == by[None]["accuracy"]["acc"] == 100
    assert by[16]["budget_mechanism"].startswith("thinking_token_budget=16 (the server's own close")
    assert by[0]["budget_mechanism"].startswith("thinking_token_budget=0")
    assert by[None]["budget_mechanism"].startswith("no thinking budget asked (unlimited)")
    sent = [b.get("thinking_token_budget", "absent") for b in srv.bodies]
    assert sent == [0] + [0] * 6 + [16] * 6 + ["absent"] * 6  # one warm-up request, then one per sample and budget


def test_plot_and_recommendation_use_the_measured_latency(served):
    _, _, out, res = served
    rec = res.recommendations["h100"]
    assert rec["record"]["think_budget"] == 16 and "(measured)" in rec["why"]  # as accurate as unlimited, and faster
    assert (out / "pareto-h100.png").is_file() and res.plots["h100"].name == "pareto-h100.png"
    report = (out / "report.md").read_text()
    assert "On h100, accuracy and latency are measured at the endpoint" in report and "| h100 | served | - | 16 |" in report


def test_a_rerun_resumes_without_requests_and_an_interrupted_budget_reuses_its_samples(served):
    srv, data, out, res = served
    posts = len(srv.bodies)
    again = sweep_deployed(srv.url, data=data, out_dir=out, **KW, latency_budget_ms=30)
    assert again.ran == 0 and len(srv.bodies) == posts
    assert again.recommendations["h100"]["record"]["think_budget"] == 0 and "within 30 ms" in again.recommendations["h100"]["why"]
    store = RecordStore(out)  # drop the budget-16 record, as if the sweep had stopped before writing it
    store.path.write_text("".join(json.dumps(r) + "\n" for r in store.load() if r["think_budget"] != 16))
    again = sweep_deployed(srv.url, data=data, out_dir=out, **KW)
    assert again.ran == 1 and len(again.records) == 3 and len(srv.bodies) == posts + 1  # the warm-up only


def test_two_deployments_in_one_folder_are_compared(served):
    srv, data, out, _ = served
    res = sweep_deployed(srv.url, data=data, out_dir=out, **{**KW, "budgets": (16,)}, label="second")
    assert res.ran == 1 and {r["recipe"] for r in res.records} == {"served", "second"} and len(res.records) == 4


def test_cli(served, tmp_path, capsys):
    from egm_edge.cli import main

    srv, data, _, _ = served
    base = ["sweep", "--endpoint", srv.url, "--data", str(data), "--budgets", "0,16", "--limit", "2", "--no-progress"]
    assert main([*base, "--target", "h100", "--out", str(tmp_path / "o"), "--endpoint-kind", "trtllm"]) == 0
    out = capsys.readouterr().out
    assert "recommendation: On h100" in out and "(2 runs measured now)" in out
    assert main([*base, "--out", str(tmp_path / "p")]) == 2
    assert "needs --target NAME saying what hardware serves it" in capsys.readouterr().err
    assert main([*base, "--target", "h100", "--recipes", "fp8", "--out", str(tmp_path / "p")]) == 2
    assert "--recipes applies to --model sweeps only" in capsys.readouterr().err
    assert main([*base, "--target", "my rack", "--out", str(tmp_path / "p")]) == 2
    assert "The target 'my rack' must be" in capsys.readouterr().err
    assert main(["sweep", "--model", str(tmp_path), "--label", "x", "--data", str(data), "--out", str(tmp_path / "p")]) == 2
    assert "--label applies to --endpoint or --bundle sweeps" in capsys.readouterr().err


def test_a_bundle_is_measured_as_its_manifests_target(tiny_bundle, tmp_path):
    """A CPU bundle stands in for a GPU bundle swept on the machine it was built for: the target comes from the
    manifest, the latency is measured here, the decode loop's close is the mechanism."""
    data, _ = write_dataset(tmp_path / "d", n=3)
    res = sweep_deployed(tiny_bundle, data=data, out_dir=tmp_path / "o", budgets=(0, 2), progress=False, max_answer_tokens=8)
    assert res.ran == 2 and {r["target"] for r in res.records} == {"cpu"}
    r = next(r for r in res.records if r["think_budget"] == 2)
    assert r["measured_with"] == "bundle" and r["latency"]["source"] == "measured" and r["precision"] == r["recipe"] == "full"
    assert r["latency"]["measured_on"].startswith("this machine with the bundle's auto executor")
    assert r["budget_mechanism"] == "egm-edge's decode loop closes the reasoning at 2 tokens (hard close)"
    assert r["accuracy"]["mean_think_tokens"] == 2 and r["latency"]["mean_ms"] > 0 and res.recommendations["cpu"]["record"]
    with pytest.raises(InputError, match="was built for target cpu, not h100"):
        sweep_deployed(tiny_bundle, data=data, out_dir=tmp_path / "o", budgets=(0,), target="h100", progress=False)
    with pytest.raises(InputError, match="Unknown executor 'cuda'"):
        sweep_deployed(tiny_bundle, data=data, out_dir=tmp_path / "o", budgets=(0,), executor="cuda", progress=False)


def test_old_records_still_read_next_to_deployed_ones(served, tmp_path):
    """A record written before deployed sweeps (no measured_on, data_key, output tokens) is analysed as before."""
    _, _, _, res = served
    old = {"key": "full|0|cpu|k", "recipe": "full", "precision": "fp32", "think_budget": 0, "target": "cpu", "supported": True,
           "accuracy": {"acc": 50.0, "miou": 45.0, "parse_failure_rate": 0.0, "errors": 0, "mean_think_tokens": 0},
           "latency": {"source": "measured", "mean_ms": 80.0, "p50_ms": 80.0, "p90_ms": 90.0, "ms_per_token": 2.0},
           "memory_gib": 1.0}
    recs, _, tab, _ = analyze([old, *res.records], tmp_path, plot=False)
    assert recs["cpu"]["record"] is old and recs["h100"]["record"]["think_budget"] == 16
    report = (tmp_path / "report.md").read_text()
    assert "latency is measured for target cpu and predicted by the planner" in report and "On h100, accuracy" in report
    assert "| cpu | full | fp32 | 0 | 50.0 |" in tab
