"""egm_edge.quantize end to end on the tiny Qwen3-VL: artifact layout, manifest, fidelity, and every refusal."""

from __future__ import annotations

import json

import pytest

from egm_edge.errors import CheckpointError, EgmError, InputError, UnsupportedError


@pytest.fixture(scope="module")
def fp8_artifact(tmp_path_factory, tiny_ckpt, make_calib):
    import egm_edge

    root = tmp_path_factory.mktemp("api")
    out = egm_edge.quantize(tiny_ckpt, "fp8", make_calib(), root / "fp8", kv_cache="fp8", cache_dir=root / "cache",
                            calib_with_reasoning=True, progress=False)
    return out, root


def test_artifact_layout_and_manifest(fp8_artifact, tiny_ckpt):
    from egm_edge.artifacts import sha256_file

    out, _ = fp8_artifact
    names = {p.name for p in out.iterdir()}
    assert {"manifest.json", "hf_quant_config.json", "config.json", "model.safetensors", "fidelity.json", "fidelity.md",
            "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json"} <= names
    m = json.loads((out / "manifest.json").read_text())
    assert m["stage"] == "quantize" and m["recipe"]["name"] == "fp8" and m["recipe"]["kv_cache"] == "fp8"
    census = m["quantizers"]["enabled"]
    assert census == m["quantizers"]["expected"]
    assert census["vision"]["weight"] == census["lm_head"]["weight"] == 0 and census["kv_cache"]["kv"] == 4
    cal = m["calibration"]
    assert cal["sha256"] == sha256_file(cal["file"]) and cal["with_reasoning"]
    assert cal["calibration"]["n"] == 2 and cal["holdout"]["n"] == 2 and cal["calibration"]["generated_tokens_mean"] > 0
    assert m["input"]["sha256"]["model.safetensors"] == sha256_file(tiny_ckpt / "model.safetensors")
    assert m["output"]["hf_quant_config"]["quantization"]["kv_cache_quant_algo"] == "FP8"
    fid = json.loads((out / "fidelity.json").read_text())
    assert fid["weights"]["layers"] == 14 and 25 < fid["weights"]["snr_db_min"] < 40  # FP8 e4m3: ~31 dB
    assert fid["logits"]["positions"] > 0 and fid["logits"]["logit_cosine_mean"] > 0.99


def test_existing_artifact_needs_force_and_calibration_is_reused(fp8_artifact, tiny_ckpt, make_calib):
    import egm_edge

    out, root = fp8_artifact
    before = json.loads((out / "manifest.json").read_text())
    with pytest.raises(EgmError, match="--force"):
        egm_edge.quantize(tiny_ckpt, "fp8", make_calib(), out, kv_cache="fp8", cache_dir=root / "cache", progress=False)
    again = egm_edge.quantize(tiny_ckpt, "fp8", make_calib(), out, kv_cache="fp8", cache_dir=root / "cache",
                              calib_with_reasoning=True, force=True, fidelity=False, progress=False)
    after = json.loads((again / "manifest.json").read_text())
    assert after["calibration"]["reused"] and after["calibration"]["sha256"] == before["calibration"]["sha256"]
    assert not any(p.name.startswith(".fp8.") for p in out.parent.iterdir())  # no staged leftovers


def test_nvfp4_on_cpu_fails_before_any_work(tmp_path, tiny_ckpt, monkeypatch):
    import torch

    import egm_edge

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UnsupportedError, match="CUDA"):
        egm_edge.quantize(tiny_ckpt, "nvfp4", tmp_path / "missing.toml", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_recipe_and_bad_checkpoint(tmp_path, tiny_ckpt, make_calib, limit_family):
    import egm_edge

    with pytest.raises(InputError, match="fp8, int4_awq"):
        egm_edge.quantize(tiny_ckpt, "int3", make_calib(), tmp_path / "out")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    with pytest.raises(CheckpointError, match="Qwen3VLForConditionalGeneration"):
        egm_edge.quantize(tmp_path / "llama", "fp8", make_calib(), tmp_path / "out")
    from egm_edge.models import get_spec, to_hf_config

    (tmp_path / "internvl").mkdir()  # a family the registry knows; here its record does not list quantize
    (tmp_path / "internvl" / "config.json").write_text(json.dumps(to_hf_config(get_spec("egm-internvl3-1b"))))
    limit_family("internvl", "plan")
    with pytest.raises(UnsupportedError, match="InternVL-3 family, which egm-edge's quantize stage does not run yet"):
        egm_edge.quantize(tmp_path / "internvl", "fp8", make_calib(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_calibration_source_without_samples(tmp_path, tiny_ckpt, make_calib):
    import egm_edge

    data = tmp_path / "missing_images.jsonl"  # every record points to an image that is not there
    data.write_text(json.dumps({"image": "nope.jpg", "sent": "the cat", "bbox": [1, 1, 5, 5], "height": 10, "width": 10}) + "\n")
    recipe = make_calib(sources=[{"kind": "egm_jsonl", "path": str(data)}])
    with pytest.raises(InputError, match="no usable samples"):
        egm_edge.quantize(tiny_ckpt, "fp8", recipe, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "out").exists()


def test_memory_estimate_refuses_before_loading(tmp_path, tiny_ckpt, monkeypatch, make_calib):
    import egm_edge
    from egm_edge.quantize import api

    monkeypatch.setattr(api, "available_memory", lambda device: 1024)
    with pytest.raises(UnsupportedError, match="GiB"):
        egm_edge.quantize(tiny_ckpt, "fp8", make_calib(), tmp_path / "out", cache_dir=tmp_path / "cache")


def test_int4_block_size_refusal_names_the_way_out(tmp_path, tiny_ckpt_64, make_calib):
    import egm_edge

    # Without a block quantize picks 64 itself (test_block_choice.py); a block of 128 asked for is refused.
    with pytest.raises(UnsupportedError, match="--block-size 64"):
        egm_edge.quantize(tiny_ckpt_64, "int4_awq", make_calib(), tmp_path / "out", cache_dir=tmp_path / "cache", progress=False,
                          block_size=128)
    assert not (tmp_path / "out").exists()


def test_cli_reports_errors_in_one_sentence(tmp_path, tiny_ckpt, capsys):
    from egm_edge.cli import main

    rc = main(["quantize", "--model", str(tiny_ckpt), "--recipe", "fp4", "--calib", "calibration/synth.toml", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "Choose from: fp8, int4_awq, w4a8_awq, int8_sq, nvfp4" in err and "Traceback" not in err


@pytest.mark.gpu
def test_nvfp4_quantizes_and_round_trips_on_cuda(tmp_path, tiny_ckpt, make_calib):
    import egm_edge
    from egm_edge.quantize.loader import load_dequantized

    out = egm_edge.quantize(tiny_ckpt, "nvfp4", make_calib(), tmp_path / "nvfp4", cache_dir=tmp_path / "cache", progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["output"]["hf_quant_config"]["quantization"]["quant_algo"] == "NVFP4"
    assert m["quantizers"]["enabled"]["language_model"]["weight"] == m["quantizers"]["linear_layers"]["language_model"]
    assert m["fidelity"]["logits"]["logit_cosine_mean"] > 0.9
    load_dequantized(out)
