"""`sweep --recipes auto`: rungs of effective bits measured like recipes, then the smallest that passes the gate."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from egm_edge.errors import InputError
from egm_edge.sweep import auto_search as A

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "validate"))
from validate_helpers import write_dataset  # noqa: E402


def test_rungs_are_named_parsed_and_quantized_from_their_names():
    from egm_edge.sweep.bundles import check_recipes
    from egm_edge.targets import load_target

    cpu, orin, h100 = load_target("cpu"), load_target("jetson-orin-nano-8gb"), load_target("h100")
    assert A.expand(("full", "auto", "int4_awq"), [cpu, orin], (6, 5)) == ("full", "auto@5", "auto@6", "int4_awq")
    assert A.expand(("full",), [cpu]) == ("full",)
    assert A.expand(("auto",), [cpu, h100], (7,)) == ("auto@7",)  # fp8 is not common to both: the cpu's formats
    assert A.parse("auto@5.5:int4_awq") == (5.5, ("int4_awq",)) and A.parse("auto@6") == (6.0, None)
    assert A.label(5.5, ("int4_awq",)) == "auto@5.5:int4_awq"
    spec = A.quant_spec("auto@6", 64, False)
    assert spec.recipe == "auto" and spec.formats == ("int4_awq", "int8_sq") and spec.effective_bits == 6 and spec.block_size == 64
    assert A.quant_spec("auto@8:int8_sq", 64, False).block_size is None
    assert A.quant_spec("int4_awq", 64, True).calib_with_reasoning
    assert A.rungs(["auto@7", "full", "auto@5:int4_awq"]) == ["auto@5:int4_awq", "auto@7"]
    assert check_recipes(("full", "auto@6")) == ("full", "auto@6")
    for bad, needle in (("auto@x", "not an AutoQuantize rung"), ("auto@3", "from 4"), ("auto@6:int3", "distinct names")):
        with pytest.raises(InputError, match=needle):
            check_recipes((bad,))


def test_cli_passes_the_rungs_and_the_gate(tmp_path, capsys):
    from egm_edge.cli import build_parser, main

    args = build_parser().parse_args(["sweep", "--model", "m", "--data", "d", "--out", "o", "--recipes", "full,auto",
                                      "--auto-bits", "5,6.5", "--max-acc-drop", "1.5"])
    assert args.auto_bits == ["5", "6.5"] and args.max_acc_drop == 1.5
    rc = main(["sweep", "--bundle", str(tmp_path), "--target", "cpu", "--data", "d", "--out", str(tmp_path / "o"),
               "--auto-bits", "5"])
    assert rc != 0 and "--auto-bits applies to --model sweeps only" in capsys.readouterr().err


def test_auto_sweep_measures_each_rung_and_picks_the_smallest_that_passes(tiny_ckpt, tmp_path):
    pytest.importorskip("modelopt")
    pytest.importorskip("onnxruntime")
    from egm_edge.quantize.calibration import CalibrationRecipe
    from egm_edge.sweep import sweep

    data, _ = write_dataset(tmp_path / "data", n=4)
    calib = CalibrationRecipe.from_dict({"samples": 2, "holdout": 1, "seed": 0, "max_pixels": "model", "max_new_tokens": 64,
                                         "sources": [{"kind": "synth", "n": 4, "seed": 11}]}, name="test")
    res = sweep(tiny_ckpt, recipes=("full", "auto"), budgets=(3,), targets=("cpu",), data=data, out_dir=tmp_path / "out",
                limit=4, max_answer_tokens=8, progress=False, calibration=calib, auto_bits=(5, 8), gate="point")
    assert {r["recipe"] for r in res.records} == {"full", "auto@5", "auto@8"}
    rows = res.auto.rows
    assert [r["recipe"] for r in rows] == ["auto@5", "auto@8"][: len(rows)]  # fewest bits first, stopping at a pass
    assert all(r["verdict"] != "pass" for r in rows[:-1])
    assert res.auto.pick == (rows[-1]["recipe"] if rows[-1]["verdict"] == "pass" else None)
    assert rows[0]["effective_bits"] == 5.0 and 0 < rows[0]["decoder_fraction"] < 1 and sum(rows[0]["formats"].values()) > 0
    out = tmp_path / "out"
    md = (out / "auto" / "auto.md").read_text()
    assert "| auto@5 | 5 |" in md and f"![auto@5]({rows[0]['picture']})" in md and (out / "auto" / rows[0]["picture"]).is_file()
    assert json.loads((out / "auto" / "auto.json").read_text())["pick"] == res.auto.pick
    assert "## Recipe auto" in (out / "report.md").read_text() and res.auto.sentence() in res.summary()
    assert "rule point" in md and all(not r["held"] for r in rows)  # the strict rule holds nothing back
