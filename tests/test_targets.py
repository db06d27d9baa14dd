"""Target profiles: every shipped TOML loads, precisions follow DESIGN.md's table, errors name the way out."""

from __future__ import annotations

import re

import pytest

from egm_edge.errors import CheckpointError, InputError, UnsupportedError
from egm_edge.quantize.recipes import RECIPES
from egm_edge.targets import PRECISIONS, TargetProfile, check_kv_dtype, check_precision, list_targets, load_target, targets_dir

REQUIRED = {
    "cpu", "a100", "l40s", "rtx4090", "h100", "h200", "b200",
    "jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb", "jetson-thor",
}
ORIN = ("jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb")


def test_every_required_target_ships_and_loads():
    assert REQUIRED <= set(list_targets())
    for name in list_targets():
        t = load_target(name)
        assert t.name == name and t.usable_gib < t.memory_gib
        assert TargetProfile.from_dict(t.to_dict()) == t


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_precisions_follow_the_design_table(name):
    t = load_target(name)
    if t.kind == "cpu":
        assert t.precisions == ("fp32", "int8_sq", "int4_awq")
        return
    assert ("fp8" in t.precisions) == (t.sm >= (8, 9))  # FP8 from SM 8.9, A100 and Orin without
    # No bundle holds W4A8 or NVFP4 (no ONNX/TensorRT lowering): they are checkpoint only where TensorRT-LLM serves them.
    assert not {"nvfp4", "w4a8_awq"} & set(t.precisions)
    assert ("nvfp4" in t.serving_precisions) == (t.sm >= (10, 0) and t.kind == "gpu")  # NVFP4 from Blackwell
    assert {"fp16", "int8_sq", "int4_awq"} <= set(t.precisions)
    if name in ORIN:
        assert t.precisions == ("fp16", "int8_sq", "int4_awq") and t.shared_memory and t.sm == (8, 7)
    assert ("w4a8_awq" in t.serving_precisions) == (name in ("h100", "h200", "b200"))


def test_every_figure_cites_a_source():
    """memory, bandwidth, compute capability and each peak rate carry a comment on their line."""
    for path in sorted(targets_dir().glob("*.toml")):
        section = ""
        for line in path.read_text().splitlines():
            if line.startswith("["):
                section = line.split("]")[0].strip("[")
                continue
            key = re.match(r"\s*(\w+)\s*=", line)
            if key and (section == "peak_tflops" or key.group(1) in ("memory_gib", "memory_bandwidth_gbs", "compute_capability")):
                assert "#" in line, f"{path.name}: {line.strip()!r} has no source comment"


def test_refusals_name_reason_and_choices():
    with pytest.raises(UnsupportedError) as e:
        check_precision(load_target("jetson-orin-nx-16gb"), "fp8")
    assert str(e.value) == (
        "Unsupported precision 'fp8' for target jetson-orin-nx-16gb (SM 8.7 has no FP8). Choose from: fp16, int8_sq, int4_awq."
    )
    with pytest.raises(UnsupportedError, match=r"SM 9\.0 has no NVFP4\). Choose from: fp16, bf16, fp8, int8_sq, int4_awq\.$"):
        check_precision(load_target("h100"), "nvfp4")
    with pytest.raises(UnsupportedError, match=r"SM 8\.0 has no FP8"):
        check_precision(load_target("a100"), "fp8")
    with pytest.raises(UnsupportedError, match="Choose from: fp32, int8_sq, int4_awq"):
        check_precision(load_target("cpu"), "nvfp4")
    with pytest.raises(InputError, match="Choose from: fp32, fp16"):
        check_precision(load_target("h100"), "int3")
    with pytest.raises(InputError, match="Choose from: a100, b200"):
        load_target("tpu-v5")
    with pytest.raises(UnsupportedError, match="fp16, bf16$|fp16, bf16\\.$"):
        check_kv_dtype(load_target("a100"), "fp8")
    assert check_kv_dtype(load_target("h100"), "fp8") == 1


def test_precision_registry_covers_the_quantize_recipes():
    assert set(RECIPES) <= set(PRECISIONS)
    assert PRECISIONS["int4_awq"].bytes_per_weight == pytest.approx(0.5 + 2 / 128)  # INT4 + an FP16 scale per 128
    assert PRECISIONS["nvfp4"].bytes_per_weight == pytest.approx(0.5 + 1 / 16)  # FP4 + an FP8 scale per 16
    assert PRECISIONS["fp8"].bytes_per_weight == 1 and PRECISIONS["fp16"].bytes_per_weight == 2
    assert load_target("cpu").compute_format("int4_awq") == "fp32"  # weight-only: the target's activation format
    assert load_target("jetson-thor").compute_format("nvfp4") == "fp4"


def test_custom_profile_by_path_and_bad_profiles(tmp_path, monkeypatch):
    text = (targets_dir() / "jetson-agx-orin-64gb.toml").read_text()
    custom = tmp_path / "my-orin.toml"
    custom.write_text(text.replace('name = "jetson-agx-orin-64gb"', 'name = "my-orin"'))
    assert load_target(custom).name == "my-orin"
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace('precisions = ["fp16"', 'precisions = ["fp8", "fp16"'))
    with pytest.raises(CheckpointError, match=r"lists fp8 but SM 8\.7"):
        load_target(bad)
    bad.write_text("name = [")
    with pytest.raises(CheckpointError, match="Cannot read target profile"):
        load_target(bad)
    bad.write_text(text.replace("memory_gib = 64.0", "memory_gb = 64.0"))
    with pytest.raises(CheckpointError, match="memory_gb"):
        load_target(bad)
    monkeypatch.setenv("EGM_EDGE_TARGETS", str(tmp_path))
    assert targets_dir() == tmp_path and "my-orin" in list_targets()


def test_checkpoint_only_precisions_are_refused_for_bundles_in_one_sentence():
    with pytest.raises(UnsupportedError) as e:
        check_precision(load_target("h100"), "w4a8_awq")
    assert str(e.value) == (
        "Precision 'w4a8_awq' on target h100 is checkpoint only (TensorRT-LLM serving config), no bundle: the ONNX/TensorRT "
        "lowering has no W4A8 AWQ path, so quantize it with `egm-edge quantize --recipe w4a8_awq` and serve the checkpoint "
        "with TensorRT-LLM, or build a bundle in one of: fp16, bf16, fp8, int8_sq, int4_awq.")
    with pytest.raises(UnsupportedError, match=r"'nvfp4' on target b200 is checkpoint only .*no NVFP4 path"):
        check_precision(load_target("b200"), "nvfp4")
    with pytest.raises(UnsupportedError, match=r"jetson-thor \(egm-edge has no ONNX/TensorRT lowering for NVFP4\)"):
        check_precision(load_target("jetson-thor"), "nvfp4")
    # The planner still predicts them as TensorRT-LLM would serve them, and quantize still makes their checkpoints.
    from egm_edge.plan import plan
    from egm_edge.quantize.recipes import QuantSpec

    assert plan("egm-8b", "b200", "nvfp4", 256).fits and plan("egm-8b", "h100", "w4a8_awq", 256).fits
    assert QuantSpec("w4a8_awq").recipe == "w4a8_awq" and QuantSpec("nvfp4").recipe == "nvfp4"


def test_a_profile_cannot_offer_a_bundle_precision_with_no_lowering():
    d = load_target("h100").to_dict()
    with pytest.raises(CheckpointError, match=r"precisions lists \['w4a8_awq'\], which no bundle can hold"):
        TargetProfile.from_dict({**d, "precisions": [*d["precisions"], "w4a8_awq"], "serving_precisions": []})
    with pytest.raises(CheckpointError, match="need software.tensorrt_llm"):
        TargetProfile.from_dict({**d, "software": {}})


def test_targets_command_never_lists_an_impossible_combination(capsys):
    from egm_edge.cli import main

    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.split() and line.split()[0] in REQUIRED]
    assert len(rows) == len(REQUIRED) and not any("w4a8_awq" in r or "nvfp4" in r for r in rows)
    assert "checkpoint only (TensorRT-LLM serving config), no bundle: w4a8_awq, nvfp4" in out
    assert "int4_awq, w4a8_awq, int8_sq and auto (per-layer mixed) checkpoints are for TensorRT-LLM only" in out
    assert main(["targets", "--json"]) == 0
    h100 = next(t for t in __import__("json").loads(capsys.readouterr().out) if t["name"] == "h100")
    assert h100["serving_precisions"] == ["w4a8_awq"] and "w4a8_awq" not in h100["precisions"]
