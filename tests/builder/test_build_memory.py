"""Build memory: an engine build that would not fit a Jetson is refused in one sentence before any work."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from egm_edge.build_memory import BUILD_FIXED_GIB, GIB, predict_build_memory, require_build_fit
from egm_edge.cli import main
from egm_edge.errors import UnsupportedError
from egm_edge.plan import plan
from egm_edge.targets import load_target


def _config(tmp_path, name):
    from egm_edge.models import get_spec
    from egm_edge.models.hf_config import to_hf_config

    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(to_hf_config(get_spec(name))))
    return d


@pytest.mark.parametrize("recipe", ["int4_awq", "full"])
def test_an_8b_build_on_orin_nano_is_refused_before_any_file_is_written(tmp_path, capsys, recipe):
    model, out = _config(tmp_path, "egm-8b"), tmp_path / "bundle"
    argv = ["build", "--model", str(model), "--recipe", recipe, "--target", "jetson-orin-nano-8gb", "--out", str(out)]
    assert main(argv + (["--calib", "synth"] if recipe != "full" else [])) == 2
    err = capsys.readouterr().err.strip()
    precision = "fp16" if recipe == "full" else recipe
    assert err.count("\n") == 0 and err.startswith(
        f"egm-edge build: error: Building the decoder engine of EGM-Qwen3-VL-8B at {precision} on jetson-orin-nano-8gb does not fit: it needs about")
    assert "the device has 5.2 GiB; instead: EGM-Qwen3-VL-2B (egm-2b)" in err and "Edge-LLM issue #30" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["egm-8b"]  # no bundle, no stage directory
    assert sorted(p.name for p in model.iterdir()) == ["config.json"]


def test_a_2b_on_agx_orin_passes_and_its_prediction_is_recorded(tmp_path):
    from egm_edge.builder.pipeline import preflight

    pf = preflight(_config(tmp_path, "egm-2b"), "full", "jetson-agx-orin-64gb")
    bm = predict_build_memory(pf.plan, pf.target)
    assert bm.fits and bm.engine == "decoder" and bm.available_bytes == int(load_target("jetson-agx-orin-64gb").usable_gib * GIB)
    d = bm.to_dict()
    assert d["label"] == "PREDICTED" and d["fits"] is True and "Edge-LLM issue #30" in d["assumption"]
    assert require_build_fit(plan("egm-2b", "jetson-orin-nano-8gb", "int4_awq", 1024), load_target("jetson-orin-nano-8gb")).fits


def test_discrete_gpus_are_predicted_not_judged_and_cpu_builds_have_no_engine():
    bm = require_build_fit(plan("egm-8b", "h100", "fp16", 1024), load_target("h100"))
    assert bm.available_bytes is None and bm.fits is None and bm.peak_bytes > bm.weight_bytes
    assert predict_build_memory(plan("egm-2b", "cpu", "fp32", 64), load_target("cpu")) is None


def test_the_assumption_reproduces_the_published_observation():
    """Edge-LLM #30: a 32B model's 16-bit build passed 96 GB and then 128 GB (3-4 bytes per parameter)."""
    p = SimpleNamespace(model="32b", precision="fp16", weights={"embeddings": 0, "language_blocks": 64e9, "lm_head": 0,
                                                                 "vision_blocks": 1e9, "mergers": 0}, alternatives=[])
    bm = predict_build_memory(p, load_target("jetson-thor"))
    assert 96e9 <= bm.peak_bytes - BUILD_FIXED_GIB * GIB <= 128e9
    assert bm.available_bytes < bm.peak_bytes
    with pytest.raises(UnsupportedError, match=r"on jetson-thor does not fit: .* choose a smaller model or a lower precision\.$"):
        require_build_fit(p, load_target("jetson-thor"))
