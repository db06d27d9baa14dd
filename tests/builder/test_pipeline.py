"""One-go build: refusals before any work (one sentence, exit 2, nothing written) and stage reuse."""

from __future__ import annotations

import json
import shutil

import pytest

from egm_edge.cli import main


def _refused(capsys, tmp_path, argv, *needles):
    out = tmp_path / "bundle"
    assert main(["build", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    for n in needles:
        assert n in err, err
    assert not out.exists() and not (tmp_path / "bundle-stages").exists()
    return err


@pytest.mark.parametrize("target", ["jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb"])
def test_fp8_on_any_orin_is_refused(config_dir, tmp_path, capsys, target):
    _refused(capsys, tmp_path, ["--model", str(config_dir), "--recipe", "fp8", "--target", target, "--calib", "calibration/coco128.toml"],
             "Unsupported precision 'fp8'", "SM 8.7 has no FP8", "Choose from: fp16, int8_sq, int4_awq")


@pytest.mark.parametrize("target", ["h100", "h200", "l40s", "a100", "jetson-agx-orin-64gb"])
def test_nvfp4_before_blackwell_is_refused(config_dir, tmp_path, capsys, target):
    _refused(capsys, tmp_path, ["--model", str(config_dir), "--recipe", "nvfp4", "--target", target], "Unsupported precision 'nvfp4'", "NVFP4")


@pytest.mark.parametrize("recipe, target", [("w4a8_awq", "h100"), ("w4a8_awq", "b200"), ("nvfp4", "b200")])
def test_checkpoint_only_recipes_are_refused_before_any_work(config_dir, tmp_path, capsys, recipe, target):
    _refused(capsys, tmp_path, ["--model", str(config_dir), "--recipe", recipe, "--target", target, "--calib", "synth"],
             f"Precision '{recipe}' on target {target} is checkpoint only", f"egm-edge quantize --recipe {recipe}")


def test_a_plan_that_does_not_fit_is_refused_with_the_planners_suggestion(config_dir, tmp_path, capsys):
    err = _refused(capsys, tmp_path, ["--model", str(config_dir), "--recipe", "full", "--target", "jetson-orin-nano-8gb"],
                   "does not fit", "instead:")
    assert "GiB" in err


def test_unknown_recipe_missing_calib_and_missing_config_are_refused(config_dir, tmp_path, capsys):
    _refused(capsys, tmp_path, ["--model", str(config_dir), "--recipe", "int3", "--target", "h100"], "Unknown quantization recipe")
    _refused(capsys, tmp_path, ["--model", str(config_dir), "--recipe", "int8_sq", "--target", "jetson-agx-orin-64gb"], "--calib")
    _refused(capsys, tmp_path, ["--model", str(tmp_path / "nothing"), "--recipe", "full", "--target", "cpu"], "config.json")
    _refused(capsys, tmp_path, ["--model", str(config_dir), "--recipe", "full", "--target", "nowhere"], "Unknown target")
    _refused(capsys, tmp_path, ["--model", str(config_dir), "--recipe", "int4_awq", "--kv-cache", "fp8", "--target", "jetson-agx-orin-64gb",
                                "--calib", "calibration/coco128.toml"], "KV-cache dtype 'fp8'", "Choose from: fp16, bf16")


def test_calibration_recipe_is_checked_before_any_work_and_shipped_names_are_accepted(config_dir, tmp_path, capsys):
    from egm_edge.builder.pipeline import preflight

    _refused(capsys, tmp_path, ["--model", str(config_dir), "--recipe", "int8_sq", "--target", "jetson-agx-orin-64gb",
                                "--calib", "nosuch"], "Calibration recipe nosuch does not exist", "synth")
    bad = tmp_path / "bad.toml"
    bad.write_text("this is = = not toml")
    _refused(capsys, tmp_path, ["--model", str(config_dir), "--recipe", "int8_sq", "--target", "jetson-agx-orin-64gb",
                                "--calib", str(bad)], "not valid TOML")
    assert preflight(config_dir, "int8_sq", "jetson-agx-orin-64gb", calib="synth").precision == "int8_sq"


def test_a_layout_the_gpu_builder_lacks_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """InternVL's tiles build for GPUs now; a layout the GPU builder does not drive is still refused in one sentence."""
    from egm_edge.builder import tensorrt
    from egm_edge.models import get_spec
    from egm_edge.models.families import get_family
    from egm_edge.models.hf_config import to_hf_config

    tensorrt.check_tensorrt_family(get_family("internvl"), "Checkpoint x")  # drives it: no refusal
    monkeypatch.setattr(tensorrt, "TENSORRT_LAYOUTS", (("smart_resize", "mrope"),))
    d = tmp_path / "internvl"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(to_hf_config(get_spec("egm-internvl3-2b"))))
    _refused(capsys, tmp_path, ["--model", str(d), "--recipe", "full", "--target", "h100"],
             "InternVL-3 model (tiling preprocessing, rope1d positions), but the GPU and Jetson bundle builder drives only",
             "build it for the cpu target")


def test_full_precision_follows_the_target():
    from egm_edge.builder.pipeline import full_precision
    from egm_edge.targets import load_target

    assert full_precision(load_target("cpu")) == "fp32"
    for t in ("a100", "h100", "b200", "jetson-orin-nano-8gb", "jetson-thor"):
        target = load_target(t)
        assert full_precision(target) in target.precisions and full_precision(target) in ("fp16", "bf16")


def test_recipe_auto_plans_with_the_formats_of_the_target(tiny_ckpt, capsys, tmp_path):
    from egm_edge.builder.pipeline import preflight
    from egm_edge.cli import main

    pf = preflight(tiny_ckpt, "auto", "jetson-orin-nano-8gb", calib="synth", effective_bits=5.5)
    assert pf.precision == "auto" and pf.quant.formats == ("int4_awq", "int8_sq") and pf.quant.effective_bits == 5.5
    assert preflight(tiny_ckpt, "auto", "h100", calib="synth").quant.formats == ("int4_awq", "int8_sq", "fp8")
    rc = main(["build", "--export", str(tmp_path), "--target", "cpu", "--out", str(tmp_path / "b"), "--effective-bits", "6"])
    assert rc != 0 and "only --model runs" in capsys.readouterr().err


def test_stages_are_reused_when_their_inputs_match(tiny_export_trt, tiny_ckpt, tmp_path, monkeypatch):
    """The export stage runs once; a rebuild reuses it; a changed checkpoint gets a new one."""
    from egm_edge.builder import pipeline

    calls = []

    def fake_export(checkpoint, out_dir, force=False, progress=None, **kw):  # the session's real export of tiny_ckpt
        calls.append(checkpoint)
        shutil.copytree(tiny_export_trt, out_dir)
        return out_dir

    monkeypatch.setattr(pipeline, "_export_fn", lambda: fake_export)
    out = tmp_path / "bundle"
    kw = dict(think_budget=16, work_dir=tmp_path / "work")
    pipeline.build_from_model(tiny_ckpt, "full", "jetson-agx-orin-64gb", out, **kw)
    m = json.loads((out / "manifest.json").read_text())
    assert m["plan"]["fits"] and m["pipeline"]["stages"]["export"]["reused"] is False and len(calls) == 1
    assert m["pipeline"]["stages"]["export"]["lowering"] == "tensorrt"

    pipeline.build_from_model(tiny_ckpt, "full", "jetson-agx-orin-64gb", out, force=True, **kw)
    m = json.loads((out / "manifest.json").read_text())
    assert m["pipeline"]["stages"]["export"]["reused"] is True and len(calls) == 1

    changed = tmp_path / "ckpt2"
    shutil.copytree(tiny_ckpt, changed)
    (changed / "generation_config.json").write_text("{}")
    pipeline.build_from_model(changed, "full", "jetson-agx-orin-64gb", tmp_path / "b2", **kw)
    m2 = json.loads((tmp_path / "b2" / "manifest.json").read_text())
    assert len(calls) == 2 and m2["pipeline"]["stages"]["export"]["dir"] != m["pipeline"]["stages"]["export"]["dir"]


def test_build_cli_keeps_the_cpu_export_path(tiny_export_trt, tmp_path, capsys):
    rc = main(["build", "--target", "jetson-orin-nx-16gb", "--export", str(tiny_export_trt), "--out", str(tmp_path / "b"),
               "--think-budget", "64"])
    assert rc == 0 and (tmp_path / "b" / "build_plan.json").is_file()
    assert json.loads((tmp_path / "b" / "build_plan.json").read_text())["tokens"]["think_budget"] == 64
    assert "--finalize" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").environ.get("EGM_EDGE_SLOW"), reason="a real quantize + export (~3 min); set EGM_EDGE_SLOW=1")
def test_real_int8_pipeline_to_a_jetson_bundle_and_its_reuse(tiny_ckpt, tmp_path, capsys):
    from pathlib import Path

    calib = Path(__file__).parents[2] / "calibration" / "synth.toml"
    argv = ["build", "--model", str(tiny_ckpt), "--recipe", "int8_sq", "--calib", str(calib), "--target", "jetson-orin-nx-16gb",
            "--think-budget", "64", "--out", str(tmp_path / "b")]
    assert main(argv) == 0
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["precision"] == "int8_sq" and m["tensorrt_contract"]["decoder"]["quantized"]["int8_weight"] > 0
    assert main([*argv, "--force"]) == 0
    assert capsys.readouterr().out.count("reusing") == 2
