"""Sweep analysis from synthetic records: Pareto frontier, table, recommendation, plot (pure and fast)."""

from __future__ import annotations

import json

import pytest

from egm_edge.sweep import RecordStore, analyze
from egm_edge.sweep.analysis import pareto, recommend, table, usable


def rec(recipe, budget, acc, ms, target="cpu", mem=1.0, supported=True):
    r = {"key": f"{recipe}|{budget}|{target}|k", "recipe": recipe, "precision": recipe, "think_budget": budget, "target": target,
         "supported": supported, "accuracy": {"acc": acc, "miou": acc - 5, "parse_failure_rate": 0.0, "errors": 0,
                                               "mean_think_tokens": budget or 40},
         "latency": {"source": "measured" if target == "cpu" else "predicted", "mean_ms": ms, "p50_ms": ms, "p90_ms": ms,
                     "ms_per_token": 2.0}, "memory_gib": mem}
    if not supported:
        r.update(reason="no FP8 here", latency={"source": "predicted", "mean_ms": None}, memory_gib=None)
    return r


# Accuracy rises with the budget; int4 is faster and a little less accurate.
RECORDS = [
    rec("full", 0, 60.0, 100), rec("full", 16, 70.0, 180), rec("full", 64, 80.0, 420), rec("full", None, 82.0, 900, mem=2.0),
    rec("int4_awq", 0, 58.0, 60), rec("int4_awq", 16, 69.0, 110), rec("int4_awq", 64, 79.0, 260), rec("int4_awq", None, 79.5, 500, mem=0.5),
    rec("full", 16, 71.0, 5000, target="jetson-orin-nano-8gb"), rec("fp8", 16, 70.0, None, target="jetson-orin-nano-8gb", supported=False),
]


def test_pareto_frontier():
    front = pareto(usable(RECORDS, "cpu"))
    names = [(r["recipe"], r["think_budget"]) for r in front]
    # full@0 (60 at 100 ms) is dominated by int4@16 (69 at 110 ms)? No: 110 > 100, so both stay.
    assert names == [("int4_awq", 0), ("full", 0), ("int4_awq", 16), ("full", 16), ("int4_awq", 64), ("full", 64), ("full", None)]
    assert ("int4_awq", None) not in names  # 79.5 at 500 ms loses to full@64: 80 at 420 ms


def test_recommendation_follows_the_latency_budget():
    assert recommend(RECORDS, "cpu")["record"]["think_budget"] is None  # no budget: the most accurate
    r = recommend(RECORDS, "cpu", latency_budget_ms=300)
    assert (r["record"]["recipe"], r["record"]["think_budget"]) == ("int4_awq", 64)
    assert "the most accurate of the 5 of 8 configurations within 300 ms" in r["why"] and "next more accurate, full @ 64" in r["why"]
    r = recommend(RECORDS, "cpu", latency_budget_ms=150)
    assert (r["record"]["recipe"], r["record"]["think_budget"]) == ("int4_awq", 16)
    r = recommend(RECORDS, "cpu", latency_budget_ms=50)
    assert r["record"] is None and "Nothing fits 50 ms on cpu" in r["why"] and "int4_awq @ 0" in r["why"]


def test_recommendation_follows_the_memory_budget():
    r = recommend(RECORDS, "cpu", memory_budget_gb=1.5)
    assert (r["record"]["recipe"], r["record"]["think_budget"]) == ("full", 64) and "1.5 GB" in r["why"]
    r = recommend(RECORDS, "cpu", latency_budget_ms=1000, memory_budget_gb=0.75)
    assert (r["record"]["recipe"], r["record"]["think_budget"]) == ("int4_awq", None)


def test_unsupported_records_are_listed_not_recommended():
    r = recommend(RECORDS, "jetson-orin-nano-8gb")
    assert r["record"]["recipe"] == "full" and "(predicted)" in r["why"]
    t = table(RECORDS)
    assert "| unsupported [1] |" in t and t.endswith("\n\n[1] no FP8 here") and t.count("\n") == len(RECORDS) + 3
    assert recommend(RECORDS, "h100")["record"] is None


def test_analyze_writes_report_summary_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    store = RecordStore(tmp_path)
    for r in RECORDS:
        store.append(r)
    recs, plots, tab, notes = analyze(store.load(), tmp_path, latency_budget_ms=300)
    assert set(plots) == {"cpu", "jetson-orin-nano-8gb"} and all(p.stat().st_size > 10_000 for p in plots.values())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["recommendations"]["cpu"]["key"] == "int4_awq|64|cpu|k"
    md = (tmp_path / "report.md").read_text()
    assert "![cpu](pareto-cpu.png)" in md and "within 300 ms" in md and notes == []
    from PIL import Image

    assert Image.open(plots["cpu"]).size == (960, 660)


def test_record_store_keeps_the_last_and_skips_torn_lines(tmp_path):
    store = RecordStore(tmp_path)
    store.append({"key": "a", "v": 1})
    store.append({"key": "a", "v": 2})
    with open(store.path, "a") as f:
        f.write('{"key": "b", "v"')
    store.append({"key": "c", "v": 3})
    assert sorted((r["key"], r["v"]) for r in store.load()) == [("a", 2), ("c", 3)]
