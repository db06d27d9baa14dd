"""`build --model`'s decode and quantize options, decided before any work: --think-budget none (issue 17 item 4)
and the INT4 block (item 3). Preflight and the CLI stopped right after it: no export, no weights loaded."""

from __future__ import annotations

import json

import pytest

from egm_edge.cli import main
from egm_edge.errors import EgmError
from egm_edge.runtime.settings import UNLIMITED

NOTE = "Think budget unlimited: planning for"


@pytest.fixture(scope="module")
def grounder_dir():
    from egm_edge.assets import default_model_dir

    return default_model_dir()


def test_unlimited_is_planned_at_the_context_window_not_1024(grounder_dir):
    from egm_edge.builder.pipeline import DEFAULT_THINK_BUDGET, preflight
    from egm_edge.models import spec_from_config

    ctx = spec_from_config(grounder_dir).text.max_positions
    for typed in ("none", "unlimited", UNLIMITED):
        pf = preflight(grounder_dir, "full", "cpu", think_budget=typed)
        assert pf.think_budget == UNLIMITED  # the bundle defaults to unlimited thinking ...
        assert pf.plan.context_tokens == ctx and pf.plan.think_budget > DEFAULT_THINK_BUDGET  # ... planned at the whole window
        assert len(pf.notes) == 1 and pf.notes[0].startswith(NOTE) and f"{pf.plan.think_budget} reasoning tokens" in pf.notes[0]
    given, default = preflight(grounder_dir, "full", "cpu", think_budget="64"), preflight(grounder_dir, "full", "cpu")
    assert (given.think_budget, given.plan.think_budget, given.notes) == (64, 64, ())
    assert (default.think_budget, default.plan.think_budget, default.notes) == (DEFAULT_THINK_BUDGET, DEFAULT_THINK_BUDGET, ())


def test_cli_says_what_unlimited_plans_before_any_stage(grounder_dir, tmp_path, capsys, monkeypatch):
    from egm_edge.builder import pipeline

    def stop(*a, **kw):
        raise EgmError("stopped where the export stage would start.")

    monkeypatch.setattr(pipeline, "_export_fn", lambda: stop)
    rc = main(["build", "--model", str(grounder_dir), "--recipe", "full", "--target", "cpu", "--think-budget", "none",
               "--out", str(tmp_path / "b")])
    out, err = capsys.readouterr()
    assert rc == 2 and "stopped where the export stage" in err
    assert f"[build] {NOTE}" in out and "[build] plan: fits" in out and "1024" not in out


def test_unlimited_that_does_not_fit_names_the_number_to_pass(config_dir, tmp_path, capsys):
    rc = main(["build", "--model", str(config_dir), "--recipe", "int4_awq", "--calib", "synth", "--target", "jetson-orin-nx-16gb",
               "--think-budget", "none", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0, err
    assert "with an unlimited think budget (planned at the" in err and "pass --think-budget" in err
    assert not (tmp_path / "b").exists() and not (tmp_path / "b-stages").exists()


@pytest.mark.parametrize("budget", ["lots", "-3", "1.5"])
def test_a_bad_budget_is_one_sentence_before_any_work(grounder_dir, tmp_path, capsys, budget):
    rc = main(["build", "--model", str(grounder_dir), "--recipe", "full", "--target", "cpu", "--think-budget", budget,
               "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and f"think budget {budget!r}" in err, err


def test_plan_cli_plans_unlimited_at_the_context_window(capsys):
    from egm_edge.models import get_spec

    ctx = get_spec("egm-4b").text.max_positions
    assert main(["plan", "--model", "egm-4b", "--target", "h200", "--precision", "fp8", "--think-budget", "none"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(NOTE) and f"{ctx}-token context window" in out
    assert main(["plan", "--model", "egm-4b", "--target", "h200", "--precision", "fp8", "--think-budget", "none", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["tokens"]["context"] == ctx and d["think_budget_note"].startswith(NOTE)
    assert main(["plan", "--model", "egm-4b", "--target", "h200", "--precision", "fp8", "--think-budget", "x"]) == 2
    assert "think budget 'x'" in capsys.readouterr().err


def test_int4_block_is_picked_from_the_layer_widths(grounder_dir, config_dir):
    from egm_edge.builder.pipeline import preflight

    pf = preflight(grounder_dir, "int4_awq", "cpu", calib="synth")  # hidden 192: blocks of 128 do not divide it
    assert pf.quant.block_size == 64 and pf.quant.weight_block_size == 64
    assert "int4_awq block size 64 (the largest of 128, 64 that divides every layer width)" in pf.notes
    real = preflight(config_dir, "int4_awq", "jetson-agx-orin-64gb", calib="synth")
    assert real.quant.block_size is None and real.quant.weight_block_size == 128  # the recipe's own: stage keys unchanged
    assert preflight(config_dir, "int4_awq", "jetson-agx-orin-64gb", calib="synth", block_size=64).quant.block_size == 64


@pytest.mark.parametrize("argv, needle", [
    (["--recipe", "int4_awq", "--block-size", "128"], "not multiples of 128"),  # the tiny grounder's 192 wide layers
    (["--recipe", "int4_awq", "--block-size", "32"], "INT4 block size 32 is not supported"),
    (["--recipe", "int8_sq", "--block-size", "64"], "no INT4 weight blocks"),
    (["--recipe", "full", "--block-size", "64"], "recipe full quantizes nothing"),
])
def test_build_accepts_block_size_and_refuses_bad_ones_before_any_work(grounder_dir, tmp_path, capsys, argv, needle):
    rc = main(["build", "--model", str(grounder_dir), "--target", "cpu", "--calib", "synth", *argv, "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and needle in err, err
    assert not (tmp_path / "b").exists() and not (tmp_path / "b-stages").exists()


def test_build_cli_passes_block_size_to_the_quantize_stage(grounder_dir, tmp_path, capsys, monkeypatch):
    from egm_edge.quantize import api

    seen = {}

    def fake_quantize(model_dir, spec, calib, out, **kw):
        seen["spec"] = spec
        raise EgmError("stopped where quantize would load the model.")

    monkeypatch.setattr(api, "quantize", fake_quantize)
    for extra, block in (([], 64), (["--block-size", "64"], 64)):
        rc = main(["build", "--model", str(grounder_dir), "--recipe", "int4_awq", "--calib", "synth", "--target", "cpu", *extra,
                   "--out", str(tmp_path / "b"), "--work-dir", str(tmp_path / "w")])
        out = capsys.readouterr().out
        assert rc == 2 and seen.pop("spec").block_size == block
        assert ("int4_awq block size 64" in out) == (not extra)  # the choice is said when it was not given
