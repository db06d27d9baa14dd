"""`egm-edge demo` end to end on the embedded tiny grounder (small: 4 samples, two budgets, no fp8)."""

import json

import pytest

from egm_edge.assets import default_model_dir

pytestmark = pytest.mark.skipif(not (default_model_dir() / "config.json").is_file(), reason="the embedded model is not committed")


def test_demo_runs_the_whole_story(tmp_path):
    from egm_edge.demo import run_demo

    lines = []
    res = run_demo(tmp_path / "demo", n=4, include_fp8=False, budgets=(0, None), n_images=2, say=lines.append)
    out = res.out_dir
    assert (out / "data").is_dir() and (out / "sweep" / "records.jsonl").is_file()
    records = [json.loads(x) for x in (out / "sweep" / "records.jsonl").read_text().splitlines()]
    cpu = [r for r in records if r.get("target") == "cpu"]
    assert {(r["recipe"], r.get("think_budget")) for r in cpu} >= {("full", 0), ("full", None), ("int4_awq", 0), ("int4_awq", None)}
    assert list((out / "sweep").glob("pareto-*.png"))
    assert res.validations["int4_awq"]["verdict"] in ("pass", "fail")
    assert (out / "validate" / "int4_awq" / "report.md").is_file()
    assert res.validations["auto@6"]["verdict"] in ("pass", "fail") and (out / "sweep" / "auto" / "auto.md").is_file()
    assert ("auto@6", None) in {(r["recipe"], r.get("think_budget")) for r in cpu}
    assert len(res.images) == 2 and all(p.is_file() for p in res.images)
    assert any(line.startswith("[4/4]") for line in lines)
    # A second run reuses every bundle and record.
    again = run_demo(tmp_path / "demo", n=4, include_fp8=False, budgets=(0, None), n_images=1, say=lines.append)
    assert "0 runs measured now" in again.sweep_summary
