"""INT4 block choice (issue 17 item 3): the largest of 128, 64 that divides every layer width, picked by quantize
itself (no --block-size needed on the embedded tiny grounder), said on the CLI, overridable."""

from __future__ import annotations

import json

import pytest

from egm_edge.quantize.recipes import choose_int4_block

NOTE = "int4_awq block size 64 (the largest of 128, 64 that divides every layer width)"


@pytest.mark.parametrize("recipe, widths, given, want", [
    ("int4_awq", [192, 512, 192], None, 64),  # the tiny grounder
    ("int4_awq", [4096, 12288, 4096], None, None),  # EGM-8B takes the recipe's own 128: spec unchanged
    ("w4a8_awq", [64, 256], None, 64),
    ("int4_awq", [96, 256], None, None),  # nothing divides 96: quantize refuses naming the width
    ("int4_awq", [192, 512], 128, 128),  # a given block is kept (and checked by quantize)
    ("fp8", [192], None, None), ("int8_sq", [192], None, None), ("nvfp4", [192], None, None),
])
def test_choose_int4_block(recipe, widths, given, want):
    block, note = choose_int4_block(recipe, widths, given)
    assert block == want
    assert (note is not None) == (given is None and recipe in ("int4_awq", "w4a8_awq") and widths[0] != 96)


def test_the_sweep_picks_the_same_block(tmp_path):
    from egm_edge.assets import default_model_dir
    from egm_edge.sweep.bundles import int4_block_size

    assert int4_block_size(default_model_dir(), "int4_awq") == 64 and int4_block_size(default_model_dir(), "full") is None


def test_quantize_cli_picks_64_for_the_embedded_grounder_without_a_flag(tmp_path, capsys, monkeypatch):
    """It gets past the width check (which refuses blocks of 128 there) to the memory check, stopped here on purpose."""
    from egm_edge.assets import default_model_dir
    from egm_edge.cli import main
    from egm_edge.quantize import api

    monkeypatch.setattr(api, "available_memory", lambda device: 1024)
    argv = ["quantize", "--model", str(default_model_dir()), "--recipe", "int4_awq", "--calib", "synth", "--out", str(tmp_path / "q")]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    from egm_edge.quantize.recipes import AWQ_COST_NOTE

    assert out.splitlines() == [NOTE, AWQ_COST_NOTE] and "GiB" in err and "block" not in err
    assert main([*argv, "--block-size", "128", "--awq", "awq_lite"]) == 2  # an explicit block is kept: refused by the width check
    out, err = capsys.readouterr()
    assert out == "" and "not multiples of 128" in err and "--block-size 64" in err


def test_quantize_api_writes_blocks_of_64_without_being_told(tmp_path, tiny_ckpt_64, make_calib):
    import egm_edge

    out = egm_edge.quantize(tiny_ckpt_64, "int4_awq", make_calib(), tmp_path / "q", cache_dir=tmp_path / "cache",
                            progress=False, fidelity=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["recipe"]["block_size"] == 64
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["group_size"] == 64
