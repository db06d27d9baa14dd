"""A small end-to-end sweep on the tiny checkpoint: build, run, records, predictions, resume, recommendation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from egm_edge.errors import InputError
from egm_edge.sweep import RecordStore, sweep

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "validate"))
from validate_helpers import write_dataset  # noqa: E402

KW = dict(recipes=("full",), budgets=(0, 3), targets=("cpu", "jetson-orin-nano-8gb"), limit=3, max_answer_tokens=8, progress=False)


@pytest.fixture(scope="module")
def swept(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    data, _ = write_dataset(root / "data", n=6)
    out = root / "out"
    return tiny_ckpt, data, out, sweep(tiny_ckpt, data=data, out_dir=out, **KW)


def test_records_plot_and_recommendation(swept):
    _, _, out, res = swept
    assert res.ran == 2 and len(res.records) == 4
    by = {(r["target"], r["think_budget"]): r for r in res.records}
    cpu0, cpu3 = by[("cpu", 0)], by[("cpu", 3)]
    assert cpu0["latency"]["source"] == "measured" and cpu0["accuracy"]["n"] == 3 and cpu0["accuracy"]["errors"] == 0
    assert cpu0["accuracy"]["mean_think_tokens"] == 0 and cpu3["accuracy"]["mean_think_tokens"] == 3
    assert cpu3["latency"]["mean_ms"] > 0 and cpu3["latency"]["ms_per_token"] > 0 and cpu0["precision"] == "full"
    assert cpu0["memory_gib"] > 0 and cpu0["deployable"] is True
    jet = by[("jetson-orin-nano-8gb", 3)]
    assert jet["latency"]["source"] == "predicted" and "predicted" in jet["latency"]["label"] and jet["precision"] == "fp16"
    assert jet["accuracy"] == cpu3["accuracy"]
    assert (out / "bundles" / "full" / "manifest.json").is_file() and not (out / "bundles" / ".work" / "full").exists()
    assert (out / "pareto-cpu.png").is_file() and (out / "pareto-jetson-orin-nano-8gb.png").is_file()
    assert set(res.recommendations) == {"cpu", "jetson-orin-nano-8gb"} and res.recommendations["cpu"]["record"] is not None
    assert "recommendation: On cpu" in res.summary() and (out / "report.md").is_file()
    lines = (out / "records.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(x)["key"] for x in lines)


def test_rerun_resumes_from_records_and_reuses_the_bundle(swept):
    ckpt, data, out, _ = swept
    manifest = out / "bundles" / "full" / "manifest.json"
    before = manifest.stat().st_mtime_ns
    res = sweep(ckpt, data=data, out_dir=out, **{**KW, "budgets": (0, 3)}, latency_budget_ms=1e-3)
    assert res.ran == 0 and manifest.stat().st_mtime_ns == before
    assert res.recommendations["cpu"]["record"] is None and "Nothing fits 0.001 ms" in res.recommendations["cpu"]["why"]
    # Drop one record, as if the sweep had been interrupted before writing it: only that run is redone,
    # and its samples come from runs/ (already predicted), so no bundle is rebuilt either.
    store = RecordStore(out)
    keep = [r for r in store.load() if not (r["target"] == "cpu" and r["think_budget"] == 3)]
    store.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
    res = sweep(ckpt, data=data, out_dir=out, **KW)
    assert res.ran == 1 and len(res.records) == 4 and manifest.stat().st_mtime_ns == before


def test_cli_reads_finished_runs_and_answers_a_new_latency_budget(swept, capsys):
    from egm_edge.cli import main

    ckpt, data, out, first = swept
    slowest = max(r["latency"]["mean_ms"] for r in first.records if r["target"] == "cpu")
    args = ["sweep", "--model", str(ckpt), "--recipes", "full", "--budgets", "0,3", "--target", "cpu,jetson-orin-nano-8gb",
            "--data", str(data), "--out", str(out), "--limit", "3", "--max-answer-tokens", "8", "--no-progress",
            "--latency-budget-ms", str(slowest * 2)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "full: all 2 budgets already recorded" in text and "(0 runs measured now)" in text
    assert f"within {slowest * 2:g} ms" in text and "pareto-cpu.png" in text
    assert main([*args[:6], "0,lots", *args[7:]]) == 2  # a budget that is not a number: one sentence, before any work
    assert "think budget 'lots'" in capsys.readouterr().err


def test_interrupted_run_keeps_finished_samples(swept, monkeypatch):
    ckpt, data, out, _ = swept
    from egm_edge.validate.predictors import BundlePredictor

    calls = {"n": 0}
    real = BundlePredictor.predict

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # warm-up, then one sample, then the interruption
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(BundlePredictor, "predict", flaky)
    with pytest.raises(KeyboardInterrupt):
        sweep(ckpt, data=data, out_dir=out, **{**KW, "budgets": (5,), "targets": ("cpu",)})
    calls["n"] = 100  # no more interruptions
    counted = {"n": 0}

    def counting(self, *a, **k):
        counted["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(BundlePredictor, "predict", counting)
    res = sweep(ckpt, data=data, out_dir=out, **{**KW, "budgets": (5,), "targets": ("cpu",)})
    assert res.ran == 1 and counted["n"] == 1 + 2  # warm-up + the two samples not finished before


def test_bad_input(tiny_ckpt, tmp_path):
    data, _ = write_dataset(tmp_path / "d", n=2)
    for kw, match in (({"recipes": ("full", "fp7")}, "Unknown recipe 'fp7'"), ({"budgets": (0, 0)}, "without repeats"),
                      ({"targets": ("toaster",)}, "Unknown target"), ({"budgets": (-1,)}, "not a whole number")):
        with pytest.raises(InputError, match=match):
            sweep(tiny_ckpt, data=data, out_dir=tmp_path / "o", **{**KW, **kw})
    with pytest.raises(InputError, match="does not exist"):
        sweep(tiny_ckpt, data=tmp_path / "none.jsonl", out_dir=tmp_path / "o", **KW)


def test_recipes_without_a_cpu_bundle_fall_back_to_the_reference(tiny_ckpt, tmp_path, monkeypatch):
    from egm_edge.errors import UnsupportedError
    from egm_edge.sweep import api, bundles
    from egm_edge.targets import load_target

    monkeypatch.setattr(bundles, "checkpoint_for", lambda *a, **k: (tiny_ckpt, True))  # stands in for a quantized checkpoint

    def no_bundle(*a, **k):
        raise UnsupportedError("MatMulNBits needs block 128.")

    monkeypatch.setattr(bundles, "bundle_for", no_bundle)
    cpu = load_target("cpu")
    fp8 = api._runner(tiny_ckpt, "fp8", tmp_path, cpu, None, 8, 4096, lambda m: None, False)
    assert fp8.kind == "checkpoint" and "Unsupported precision 'fp8' for target cpu" in fp8.not_deployable
    int4 = api._runner(tiny_ckpt, "int4_awq", tmp_path, cpu, None, 8, 4096, lambda m: None, False)
    assert int4.kind == "checkpoint" and "no CPU bundle could be built for int4_awq: MatMulNBits needs block 128" in int4.not_deployable
    with pytest.raises(UnsupportedError):
        api._runner(tiny_ckpt, "full", tmp_path, cpu, None, 8, 4096, lambda m: None, False)


def test_reasoning_calibration_is_part_of_what_a_quantized_bundle_is_keyed_by(tiny_ckpt):
    from egm_edge.cli import build_parser
    from egm_edge.sweep.bundles import bundle_key, default_calibration

    calib, caps = default_calibration(), {"max_answer_tokens": 16, "max_seq_len": 1024}
    for recipe in ("int4_awq", "fp8"):
        assert bundle_key(tiny_ckpt, recipe, calib, caps, True) != bundle_key(tiny_ckpt, recipe, calib, caps, False)
    assert bundle_key(tiny_ckpt, "full", calib, caps, True) == bundle_key(tiny_ckpt, "full", calib, caps, False)
    args = build_parser().parse_args(["sweep", "--model", str(tiny_ckpt), "--data", "d.jsonl", "--out", "o", "--calib-with-reasoning"])
    assert args.calib_with_reasoning is True
