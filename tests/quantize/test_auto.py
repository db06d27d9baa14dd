"""Recipe auto: the spec, the pieces of the grounding-aware AutoQuantize search, and a real search on a tiny model
that exports, builds and decodes the same tokens as its PyTorch reference."""

from __future__ import annotations

import json

import pytest

from egm_edge.errors import InputError, UnsupportedError
from egm_edge.quantize.recipes import AUTO_EFFECTIVE_BITS, QuantSpec


def test_auto_spec_validates_and_round_trips():
    s = QuantSpec("auto", formats=("int4_awq", "int8_sq"), block_size=64, awq="awq_clip")
    assert s.effective_bits == AUTO_EFFECTIVE_BITS and s.calib_with_reasoning  # the score needs the model's own reasoning
    assert s.weight_block_size == 64 and QuantSpec.from_json(s.to_json()) == s
    assert "effective bits over int4_awq/int8_sq/16-bit" in s.describe()
    assert QuantSpec("auto", formats=("int8_sq",)).weight_block_size is None
    for bad, needle in [
        (dict(recipe="auto"), "pass --target"),
        (dict(recipe="auto", formats=("int4",)), "distinct names"),
        (dict(recipe="auto", formats=("fp8", "fp8")), "distinct names"),
        (dict(recipe="auto", formats=("fp8",), effective_bits=3.5), "from 4"),
        (dict(recipe="auto", formats=("fp8",), effective_bits=True), "from 4"),
        (dict(recipe="auto", formats=("fp8",), kv_cache="fp8"), "drop --kv-cache"),
        (dict(recipe="auto", formats=("int8_sq",), block_size=64), "no INT4 weight blocks"),
        (dict(recipe="fp8", effective_bits=6.0), "choose --recipe auto"),
        (dict(recipe="int8_sq", awq="awq_full"), "has none"),
        (dict(recipe="int4_awq", awq="awq"), "Unknown AWQ variant"),
    ]:
        with pytest.raises(InputError, match=needle):
            QuantSpec(**bad)
    with pytest.raises(InputError, match="formats"):
        QuantSpec.from_dict({"recipe": "auto", "formats": "int4_awq"})


def test_awq_variant_replaces_only_the_algorithm_of_a_deep_copy():
    pytest.importorskip("modelopt")
    import copy

    import modelopt.torch.quantization as mtq

    from egm_edge.quantize.policy import build_modelopt_config

    before = copy.deepcopy(mtq.INT4_AWQ_CFG)
    default = build_modelopt_config(QuantSpec("int4_awq", block_size=64), "qwen3_vl")
    lite = build_modelopt_config(QuantSpec("int4_awq", block_size=64, awq="awq_lite"), "qwen3_vl")
    clip = build_modelopt_config(QuantSpec("int4_awq", block_size=64, awq="awq_clip"), "qwen3_vl")
    assert default["algorithm"] == {"method": "awq_full"}  # the recipe's measured default (recipes.py)
    assert lite["algorithm"] == mtq.INT4_AWQ_CFG["algorithm"] and clip["algorithm"] == {"method": "awq_clip"}
    assert clip["quant_cfg"] == lite["quant_cfg"] == default["quant_cfg"]
    assert build_modelopt_config(QuantSpec("w4a8_awq"), "qwen3_vl")["algorithm"] == mtq.W4A8_AWQ_BETA_CFG["algorithm"]
    assert mtq.INT4_AWQ_CFG == before


def test_effective_bits_for_a_byte_cap():
    from egm_edge.quantize.auto import effective_bits_for_bytes

    # 1000 Linear weights stored 2 bytes each beside 400 fixed bytes: a 1400-byte cap leaves 8 bits a weight.
    assert effective_bits_for_bytes(1400, 2400, 1000, 2.0, None) == 8.0
    assert effective_bits_for_bytes(1400, 2400, 1000, 2.0, 64) == 7.75  # a 16-bit scale per 64 weights
    assert effective_bits_for_bytes(10**6, 2400, 1000, 2.0, None) == 16.0
    with pytest.raises(UnsupportedError, match="raise --max-bytes"):
        effective_bits_for_bytes(800, 2400, 1000, 2.0, 64)


def test_grounding_loss_counts_the_continuation_only_and_weights_the_answer():
    torch = pytest.importorskip("torch")
    import numpy as np

    from egm_edge.quantize.auto import BOX_WEIGHT, grounding_loss
    from egm_edge.quantize.calibset import Rendered

    close = 7
    ids = np.array([1, 2, 3, 4, 5, close, 8, 9], dtype=np.int64)  # prompt of 3, reasoning 4 5, close, answer 8 9
    item = Rendered(ids, np.zeros((1, 1), np.float32), np.zeros((0, 3), np.int64), 3)
    logits = torch.zeros(1, 8, 10)
    wrong = {3: 1}  # position 3 predicts token 5 (reasoning); make it confidently wrong
    for pos, tok in wrong.items():
        logits[0, pos, tok] = 20.0
    base = grounding_loss(torch.zeros(1, 8, 10), item, close)
    assert base.item() == pytest.approx(torch.log(torch.tensor(10.0)).item(), rel=1e-5)
    reasoning_miss = grounding_loss(logits, item, close).item()
    answer = torch.zeros(1, 8, 10)
    answer[0, 6, 1] = 20.0  # position 6 predicts token 9 (answer)
    answer_miss = grounding_loss(answer, item, close).item()
    assert answer_miss > reasoning_miss > base.item()
    # The answer's extra weight: its miss costs BOX_WEIGHT times the same miss in the reasoning (over the same total).
    assert (answer_miss - base.item()) == pytest.approx(BOX_WEIGHT * (reasoning_miss - base.item()), rel=1e-4)
    prompt_only = Rendered(ids[:3], item.pixel_values, item.grid_thw, 3)
    with pytest.raises(InputError, match="no generated tokens"):
        grounding_loss(logits[:, :3], prompt_only, close)


def test_targets_run_auto_with_their_own_formats():
    from egm_edge.targets import auto_formats, check_layer_formats, check_precision, load_target

    assert auto_formats(load_target("cpu")) == ("int4_awq", "int8_sq")
    assert auto_formats(load_target("jetson-orin-nano-8gb")) == ("int4_awq", "int8_sq")
    assert "fp8" in auto_formats(load_target("h100"))
    assert check_precision(load_target("jetson-orin-nano-8gb"), "auto").name == "auto"
    check_layer_formats(load_target("cpu"), ["int4_awq", "16-bit", "int8_sq"], "x")
    with pytest.raises(UnsupportedError, match="fp8 layers, which target jetson-orin-nano-8gb cannot run"):
        check_layer_formats(load_target("jetson-orin-nano-8gb"), ["int4_awq", "fp8"], "Export e")


def test_cli_max_bytes_parsing():
    from egm_edge.commands.quantize import parse_bytes

    assert parse_bytes("1500") == 1500 and parse_bytes("1.5M") == int(1.5 * 2**20) and parse_bytes("2GiB") == 2 * 2**30
    for bad in ("", "-3", "lots", "0"):
        with pytest.raises(InputError, match="not a size"):
            parse_bytes(bad)


def test_auto_without_a_target_is_one_sentence(tmp_path, tiny_ckpt, capsys):
    from egm_edge.cli import main

    rc = main(["quantize", "--model", str(tiny_ckpt), "--recipe", "auto", "--calib", "synth", "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert rc != 0 and "pass --target" in err and "Traceback" not in err and not (tmp_path / "q").exists()


def test_auto_quantize_exports_builds_and_decodes_like_its_pytorch_reference(tiny_ckpt, tmp_path, make_calib, grounds_like_reference):
    """A real AutoQuantize search (gradient scores on the model's own reasoning) at 6 effective bits over INT4/INT8:
    a MIXED_PRECISION checkpoint whose layer map, picture and byte count the manifest carries; export lowers it per
    layer into one graph that validates; the CPU bundle's greedy tokens equal the dequantizing PyTorch reference."""
    pytest.importorskip("onnxruntime")
    from egm_edge.builder import build_cpu
    from egm_edge.export.pipeline import export
    from egm_edge.quantize.api import quantize

    q = quantize(tiny_ckpt, "auto", make_calib(samples=3, holdout=1), tmp_path / "q", target="cpu", effective_bits=6.0,
                 cache_dir=tmp_path / "cache", progress=False)
    m = json.loads((q / "manifest.json").read_text())
    hf = json.loads((q / "hf_quant_config.json").read_text())["quantization"]
    assert m["precision"] == "auto" and hf["quant_algo"] == "MIXED_PRECISION"
    layers = m["auto"]["layers"]
    assert len(layers) == m["quantizers"]["linear_layers"]["language_model"]
    # 6 bits cannot be one format (INT4 is ~4.1, INT8 8): INT4 layers and at least one wider kind.
    assert "int4_awq" in layers.values() and len(set(layers.values())) >= 2
    assert m["quantizers"]["enabled"]["vision"]["weight"] == 0 and m["quantizers"]["enabled"]["lm_head"]["weight"] == 0
    assert sum(1 for f in layers.values() if f != "16-bit") == m["quantizers"]["enabled"]["language_model"]["weight"]
    assert m["decoder_bytes"]["quantized"] < m["decoder_bytes"]["full"] and (q / "layer_map.png").stat().st_size > 1000

    ex = export(q, tmp_path / "x", decode_steps=2)
    em = json.loads((ex / "manifest.json").read_text())
    assert em["precision"] == "auto" and em["validation"]["passed"]
    assert set(em["layer_formats"].values()) == {f for f in layers.values() if f != "16-bit"}
    grounds_like_reference(build_cpu(ex, tmp_path / "bundle", max_answer_tokens=8), q)


def test_max_acc_drop_keeps_the_fewest_bits_that_pass_the_gate(tiny_ckpt, tmp_path, make_calib, capsys):
    """quantize --recipe auto --max-acc-drop P --data D: rungs quantized fewest bits first, each validated against the
    full model, the first that passes becomes --out (here a gate wide enough that the first rung passes, so the
    second is never quantized); a bad combination of flags is one sentence."""
    import sys
    from pathlib import Path

    from egm_edge.cli import main
    from egm_edge.sweep.auto_search import smallest_checkpoint

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "validate"))
    from validate_helpers import write_dataset

    data, _ = write_dataset(tmp_path / "data", n=3)
    out, result = smallest_checkpoint(tiny_ckpt, make_calib(samples=2, holdout=1), tmp_path / "q", data, target="cpu",
                                      ladder=(8, 5), max_acc_drop=100, max_miou_drop=100, max_new_tokens=200,
                                      cache_dir=tmp_path / "cache", progress=False, say=lambda m: None)
    assert result.pick == "auto@5" and [r["recipe"] for r in result.rows] == ["auto@5"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["precision"] == "auto" and m["auto"]["effective_bits_target"] == 5.0
    search = tmp_path / "q.auto-search"
    assert "auto@5 is the smallest configuration" in (search / "auto.md").read_text() and not (search / "checkpoints" / "auto@8").exists()
    assert (search / "auto-search.json").is_file()  # the marker that lets a rerun resume there
    for argv, needle in ((["--recipe", "int4_awq", "--max-acc-drop", "1"], "give --recipe auto"),
                         (["--recipe", "auto", "--max-acc-drop", "1", "--data", str(data), "--effective-bits", "6"], "drop --effective-bits")):
        rc = main(["quantize", "--model", str(tiny_ckpt), "--calib", "synth", "--out", str(tmp_path / "q2"), *argv])
        assert rc != 0 and needle in capsys.readouterr().err


def test_effective_bits_fit_asks_the_planner():
    from egm_edge.errors import UnsupportedError
    from egm_edge.plan import GIB, auto_effective_bits

    bits, room = auto_effective_bits("egm-8b", "jetson-orin-nx-16gb", 1024)
    assert 4 < bits < 16 and room["other_bytes"] < room["usable_bytes"]
    # The bits spend exactly the room left: the language model's Linear weights at (bits + block scales) / 8 bytes.
    from egm_edge.models import get_spec

    matmul = get_spec("egm-8b").params()["language_blocks"].matmul
    used = room["other_bytes"] + matmul * (bits + 16 / 128) / 8
    assert used <= room["usable_bytes"] < used + matmul * 0.01 / 8 + 1
    longer, _ = auto_effective_bits("egm-8b", "jetson-orin-nx-16gb", 16000)
    assert longer < bits  # a longer reasoning budget needs more KV cache, leaving fewer bits
    with pytest.raises(UnsupportedError, match="even with every language-model Linear in INT4"):
        auto_effective_bits("egm-8b", "jetson-orin-nano-8gb", 1024)
    assert GIB == 2**30


def test_effective_bits_fit_on_the_cli(tmp_path, tiny_ckpt, capsys):
    from egm_edge.cli import main

    base = ["quantize", "--model", str(tiny_ckpt), "--calib", "synth", "--out", str(tmp_path / "q")]
    for argv, needle in ((["--recipe", "auto", "--effective-bits", "fit"], "give --recipe auto and --target T"),
                         (["--recipe", "auto", "--target", "cpu", "--effective-bits", "fit"], "fits cpu unquantized"),
                         (["--recipe", "auto", "--target", "cpu", "--think-budget", "64"], "give both, or neither"),
                         (["--recipe", "auto", "--target", "cpu", "--effective-bits", "six"], "must be a number"),
                         (["--recipe", "int4_awq", "--target", "cpu"], "is one format")):
        assert main(base + argv) != 0 and needle in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_max_bytes_caps_the_written_decoder(tiny_ckpt, tmp_path, make_calib):
    from egm_edge.quantize.api import quantize
    from egm_edge.quantize.layer_map import decoder_bytes

    full = decoder_bytes(tiny_ckpt, "qwen3_vl")
    cap = int(0.55 * full)
    q = quantize(tiny_ckpt, "auto", make_calib(samples=2, holdout=0), tmp_path / "q", formats=("int4_awq", "int8_sq"),
                 max_bytes=cap, cache_dir=tmp_path / "cache", progress=False, fidelity=False)
    m = json.loads((q / "manifest.json").read_text())
    assert m["decoder_bytes"]["full"] == full and m["decoder_bytes"]["quantized"] <= cap == m["auto"]["max_bytes"]
    assert 4 < m["recipe"]["effective_bits"] < 16
    with pytest.raises(InputError, match="--max-bytes sets recipe auto's constraint"):
        quantize(tiny_ckpt, "int4_awq", make_calib(), tmp_path / "q2", max_bytes=cap)
