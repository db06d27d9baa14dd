"""Planner: answers for every (model, target, precision), refuses what cannot run, stays calibrated."""

from __future__ import annotations

import json

import pytest

from egm_edge.cli import main
from egm_edge.errors import UnsupportedError
from egm_edge.models import get_spec, list_specs, to_hf_config
from egm_edge.plan import PREDICTED, PUBLISHED_DECODE, calibration_for, decode_ms_per_token, image_grid, plan
from egm_edge.targets import PRECISIONS, list_targets, load_target

ORIN = ("jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb")


def test_answers_for_every_model_target_precision():
    answered = refused = 0
    for model in list_specs():
        for target in list_targets():
            t = load_target(target)
            for precision in PRECISIONS:
                try:
                    p = plan(model, t, precision, 512)
                except UnsupportedError as e:
                    refused += 1
                    assert precision not in t.precisions and "Choose from: " in str(e)
                    continue
                answered += 1
                d = json.loads(json.dumps(p.to_dict()))
                assert d["predicted_latency"]["label"] == PREDICTED
                assert 0 < p.latency.vision_ms and 0 < p.latency.prefill_ms and 0 < p.latency.decode_ms_per_token
                assert p.fits == (p.total_bytes <= p.usable_bytes) and p.verdict
    assert answered and refused


@pytest.mark.parametrize("target", ORIN)
def test_fp8_refused_on_every_orin_with_the_alternatives(target):
    for precision in ("fp8", "nvfp4", "w4a8_awq"):
        with pytest.raises(UnsupportedError, match=r"SM 8\.7 has no .*Choose from: fp16, int8_sq, int4_awq\."):
            plan("egm-4b", target, precision, 256)


@pytest.mark.parametrize("target", ["a100", "l40s", "rtx4090", "h100", "h200"])
def test_nvfp4_refused_before_blackwell(target):
    with pytest.raises(UnsupportedError, match=r"has no NVFP4\). Choose from: .*int4_awq"):
        plan("egm-8b", target, "nvfp4", 256)
    assert plan("egm-8b", "b200", "nvfp4", 256).fits


def test_egm_8b_int4_fits_agx_orin_and_nano_gets_an_answer():
    p = plan("egm-8b", "jetson-agx-orin-64gb", "int4_awq", 1024)
    assert p.fits and p.max_think_budget >= 1024 and p.verdict.startswith("fits")
    nano = plan("egm-8b", "jetson-orin-nano-8gb", "int4_awq", 1024)
    assert not nano.fits and nano.max_think_budget is None
    assert nano.alternatives and "egm-2b" in nano.alternatives[0]
    small = get_spec("egm-2b")
    assert plan(small, "jetson-orin-nano-8gb", "int4_awq", 1024).fits


@pytest.mark.parametrize("point", PUBLISHED_DECODE, ids=lambda p: f"{p.model}-{p.target}-{p.tokens_per_s}")
def test_predicted_decode_within_25_percent_of_published(point):
    ms = decode_ms_per_token(point.model, point.target, point.precision, point.context)
    assert abs(1000 / ms / point.tokens_per_s - 1) < 0.25


def test_largest_budget_is_exact():
    p = plan("egm-4b", "jetson-orin-nano-8gb", "int4_awq", 4096)
    assert not p.fits and p.max_think_budget is not None
    assert plan("egm-4b", "jetson-orin-nano-8gb", "int4_awq", p.max_think_budget).fits
    assert not plan("egm-4b", "jetson-orin-nano-8gb", "int4_awq", p.max_think_budget + 1).fits
    assert "largest think budget that fits is" in p.verdict


def test_smaller_precision_suggested_before_smaller_model():
    p = plan("egm-2b", "jetson-orin-nano-8gb", "fp16", 1024)
    assert not p.fits and p.alternatives[0].startswith("int8_sq fits")


def test_budget_drives_kv_and_latency_linearly():
    a, b = plan("egm-2b", "h100", "fp8", 0), plan("egm-2b", "h100", "fp8", 1000)
    kv = get_spec("egm-2b").text.kv_elements_per_token() * 2
    assert b.kv_cache_bytes - a.kv_cache_bytes == 1000 * kv
    assert b.latency.total_ms > a.latency.total_ms + 1000 * a.latency.decode_ms_per_token * 0.99
    assert sum(a.weights.values()) == sum(b.weights.values())


def test_parts_and_dtypes():
    p = plan("egm-8b", "cpu", "int4_awq", 64)
    spec = get_spec("egm-8b").params()
    assert p.weights["lm_head"] == spec["lm_head"].total * 4  # unquantized, fp32 on CPU
    assert p.weights["vision_blocks"] == spec["vision_blocks"].total * 4
    assert p.weights["language_blocks"] < spec["language_blocks"].total * 0.6  # INT4 + scales + fp32 norms
    assert p.kv_dtype == "fp32"
    tied = plan("egm-2b", "h100", "bf16", 64)
    assert tied.weights["lm_head"] == 0 and tied.unquantized_dtype == "bf16" and tied.kv_dtype == "bf16"


def test_image_tokens():
    qwen = get_spec("egm-2b")
    assert image_grid(qwen, 640, 480).image_tokens == 300  # 640x480 is already a multiple of 32
    assert image_grid(qwen, 100, 100).image_tokens == 64  # min_pixels 65536 lifts it to 256x256
    internvl = get_spec("egm-internvl3-2b")
    assert image_grid(internvl, 448, 448).image_tokens == 256  # one tile, no thumbnail
    assert image_grid(internvl, 1920, 1080).tiles == 9  # 4x2 grid + thumbnail


def test_calibration_is_stated_and_overridable():
    assert "Edge-LLM" in calibration_for(load_target("jetson-agx-orin-64gb")).source
    thor = calibration_for(load_target("jetson-thor"))
    assert thor.decode_efficiency == 0.93 and "jetson-thor.toml" in thor.source


def test_cpu_predictions_match_the_cpu_bundles_measured_decode():
    from dataclasses import replace

    from egm_edge.plan import CPU_BENCH_CONTEXT, CPU_BENCH_TEXT, CPU_MEASURED_DECODE

    tiny = get_spec("tiny")
    spec = replace(tiny, name="cpu-bench", text=replace(tiny.text, **CPU_BENCH_TEXT),
                   vision=replace(tiny.vision, out_hidden=CPU_BENCH_TEXT["hidden"]))
    cpu = load_target("cpu")
    for precision, measured in CPU_MEASURED_DECODE.items():
        predicted = decode_ms_per_token(spec, cpu, precision, CPU_BENCH_CONTEXT)
        assert abs(predicted / measured - 1) <= 0.25, (precision, predicted, measured)
    # Low-bit decode on CPU is bound by the dequantising kernels, and the plan says so.
    p = plan(spec, cpu, "int4_awq", 64)
    assert "kernel" in json.dumps(p.to_dict())


def test_cli_plan_table_json_and_errors(capsys, tmp_path):
    assert main(["plan", "--model", "egm-8b", "--target", "jetson-agx-orin-64gb", "--precision", "int4_awq",
                 "--think-budget", "1024"]) == 0
    out = capsys.readouterr().out
    assert "verdict: fits" in out and "predicted" in out and "language blocks (int4_awq)" in out
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(get_spec("tiny"))))
    assert main(["plan", "--model", str(tmp_path), "--target", "cpu", "--precision", "fp32", "--think-budget", "64",
                 "--image", "320x240", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model"] == "tiny" and d["image"]["image_tokens"] == 80 and d["predicted_latency"]["label"] == PREDICTED
    assert main(["plan", "--model", "egm-4b", "--target", "jetson-orin-nx-16gb", "--precision", "fp8", "--think-budget", "8"]) == 2
    assert "SM 8.7 has no FP8" in capsys.readouterr().err
    assert main(["plan", "--model", "egm-4b", "--target", "h100", "--precision", "fp8", "--think-budget", "8", "--image", "big"]) == 2
    assert "WIDTHxHEIGHT" in capsys.readouterr().err
    assert main(["targets"]) == 0
    assert "jetson-thor" in capsys.readouterr().out


def test_budget_beyond_the_models_context_is_refused(capsys):
    from egm_edge.errors import InputError

    ctx = get_spec("egm-4b").text.max_positions
    p = plan("egm-4b", "h200", "fp8", 1024)
    fixed = p.context_tokens - p.think_budget
    assert plan("egm-4b", "h200", "fp8", ctx - fixed).context_tokens == ctx  # the whole window is allowed
    with pytest.raises(InputError, match=f"maximum context of {ctx:,} tokens.*at most {ctx - fixed:,}"):
        plan("egm-4b", "h200", "fp8", ctx - fixed + 1)
    rc = main(["plan", "--model", "egm-4b", "--target", "jetson-agx-orin-64gb", "--precision", "int4_awq",
               "--think-budget", "500000"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("egm-edge plan: error: ") and f"{ctx:,}" in lines[0]
    # A smaller model with a shorter context is skipped as an alternative, not an error.
    nano = plan("egm-8b", "jetson-orin-nano-8gb", "int4_awq", 1024)
    assert nano.alternatives
