"""The cpu build: optimised graphs, side files, manifest written last, refusal of non-exports, CLI."""

import json

import pytest

from egm_edge.cli import main
from egm_edge.runtime.bundle import BUNDLE_FILES, open_bundle


def test_bundle_layout_and_manifest(tiny_bundle):
    for f in BUNDLE_FILES:
        assert (tiny_bundle / f).is_file(), f
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    assert m["stage"] == "build" and m["target"] == "cpu" and m["precision"] == "full"
    assert m["smoke_test"]["think_tokens"] <= 8
    assert set(m["outputs"]["sha256"]) >= {"vision.onnx", "decoder.onnx", "tokenizer.json"}
    b = open_bundle(tiny_bundle)
    assert b.generation.max_seq_len == 1024 and b.generation.max_answer_tokens == 16
    assert b.decoder.num_layers >= 1 and b.vision.spatial_merge_size == 2
    # The family and its token texts come from the Qwen3-VL record, through the export manifest.
    from egm_edge.models.families import get_family

    tokens = get_family("qwen3_vl").tokens
    assert m["family"] == b.generation.family == "qwen3_vl"
    assert (b.generation.think_open, b.generation.think_close, b.generation.stop_tokens) == (
        tokens.think_open, tokens.think_close, tuple(tokens.stop))


def test_the_family_of_an_export_and_the_runtime_gate(tmp_path):
    from egm_edge.builder.cpu import export_family
    from egm_edge.errors import UnsupportedError

    assert export_family(tmp_path, {"family": "qwen3_vl", "architecture": "x"}).name == "qwen3_vl"
    # Exports written before the manifest named the family: the architecture it records.
    assert export_family(tmp_path, {"architecture": "Qwen3VLForConditionalGeneration"}).name == "qwen3_vl"
    import dataclasses

    from egm_edge.models.families import INTERNVL

    assert export_family(tmp_path, {"family": "internvl"}) is INTERNVL
    with pytest.raises(UnsupportedError, match="runtime stage does not run yet"):
        dataclasses.replace(INTERNVL, stages=frozenset({"plan"})).require("runtime", "Export x")


def test_graphs_are_ort_optimised(tiny_bundle):
    import onnx

    m = onnx.load(str(tiny_bundle / "decoder.onnx"), load_external_data=False)
    domains = {n.domain for n in m.graph.node}
    # ONNX Runtime's CPU fusions (e.g. SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization) were saved.
    assert "com.microsoft" in domains or any("LayerNormalization" in n.op_type for n in m.graph.node)
    # Every RMSNorm (input, post-attention, q, k per layer, and the final one) is one fused kernel, not
    # Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul chains run at every decode step.
    ops = [n.op_type for n in m.graph.node]
    layers = open_bundle(tiny_bundle).decoder.num_layers
    assert sum("SimplifiedLayerNormalization" in o for o in ops) == 4 * layers + 1, ops
    assert "Pow" not in ops and "Reciprocal" not in ops


def test_build_refuses_a_directory_that_is_not_an_export(tmp_path, tiny_ckpt, capsys):
    assert main(["build", "--target", "cpu", "--export", str(tiny_ckpt), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "not a finished export" in err or "artifact" in err
    assert not (tmp_path / "b").exists()


def test_build_refuses_to_overwrite_without_force(tiny_bundle, capsys):
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    rc = main(["build", "--target", "cpu", "--export", m["inputs"]["export"], "--out", str(tiny_bundle)])
    assert rc == 2 and "--force" in capsys.readouterr().err


def test_bad_budget_argument_exits_2(tmp_path, capsys):
    rc = main(["build", "--target", "cpu", "--export", str(tmp_path), "--out", str(tmp_path / "o"), "--think-budget", "lots"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "think budget 'lots'" in err, err


def test_ground_cli_on_a_bundle_draws_the_box(tiny_bundle, scene, tmp_path, capsys):
    out = tmp_path / "drawn.png"
    rc = main(["ground", "--bundle", str(tiny_bundle), "--image", str(scene), "--expr", "the red square",
               "--think-budget", "3", "--json", "--draw", str(out)])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    assert r["think_tokens"] == 3 and out.is_file()


def test_vision_int8_build_runs_dynamic_int8_matmuls_and_records_its_fidelity(tiny_bundle, tmp_path):
    import onnx

    from egm_edge.builder import build_cpu
    from egm_edge.runtime.grounder import Grounder
    from egm_edge.synth import draw, render

    export_dir = json.loads((tiny_bundle / "manifest.json").read_text())["inputs"]["export"]
    out = build_cpu(export_dir, tmp_path / "b8", max_answer_tokens=16, max_seq_len=1024, vision_int8=True)
    m = json.loads((out / "manifest.json").read_text())
    assert m["vision"]["precision"] == "int8-dynamic"
    assert m["vision"]["fidelity_vs_float32"]["image_features_cosine"] > 0.99
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no scratch left behind
    ops = {n.op_type for n in onnx.load(str(out / "vision.onnx")).graph.node}
    assert "DynamicQuantizeMatMul" in ops and "MatMul" not in ops, ops
    s = draw(3, 0)
    r = Grounder.open(out).ground(render(s.scene), s.expr.sent, think_budget=4)
    assert r.timings["vision"] > 0 and r.think_tokens <= 4  # the bundle grounds end to end


def test_vision_int8_is_refused_for_gpu_targets(tmp_path, capsys):
    assert main(["build", "--target", "jetson-orin-nano-8gb", "--export", str(tmp_path), "--out", str(tmp_path / "b"),
                 "--vision-int8"]) == 2
    assert "CPU options" in capsys.readouterr().err


def test_prefill_int8_bundle_prefills_through_int8_and_decodes_through_the_decoder(tiny_bundle, tmp_path):
    import numpy as np
    import onnx

    from egm_edge.builder import build_cpu
    from egm_edge.runtime.grounder import Grounder
    from egm_edge.synth import draw, render

    export_dir = json.loads((tiny_bundle / "manifest.json").read_text())["inputs"]["export"]
    out = build_cpu(export_dir, tmp_path / "bp", max_answer_tokens=16, max_seq_len=1024, prefill_int8=True)
    m = json.loads((out / "manifest.json").read_text())
    layers = open_bundle(out).decoder.num_layers
    assert m["prefill"]["int8_layers"] == 7 * layers  # q, k, v, o, gate, up, down; the tied lm_head stays float
    assert m["prefill"]["fidelity_vs_decoder"]["logits_cosine_min"] > 0.99
    assert not any(p.name.startswith(".") for p in out.iterdir())
    assert "DynamicQuantizeMatMul" in {n.op_type for n in onnx.load(str(out / "prefill.onnx")).graph.node}
    g = Grounder.open(out)
    calls = []
    for name in ("prefill", "decoder"):
        sess = getattr(g.executor, name)
        calls_for = calls

        class Spy:
            def __init__(self, s, tag):
                self.s, self.tag = s, tag

            def run(self, names, feeds):
                calls_for.append((self.tag, feeds["input_ids"].shape[1]))
                return self.s.run(names, feeds)

            def io_binding(self):  # the in-place KV cache path binds its inputs instead of passing feeds
                calls_for.append((self.tag, None))
                return self.s.io_binding()

            def run_with_iobinding(self, io):
                return self.s.run_with_iobinding(io)

        setattr(g.executor, name, Spy(sess, name))
    s = draw(3, 0)
    r = g.ground(render(s.scene), s.expr.sent, think_budget=4)
    assert g.executor.in_place  # the bundle's graphs update the KV cache in place; prefill.onnx shares the buffers
    assert calls[0][0] == "prefill"
    assert all(tag == "decoder" for tag, _n in calls[1:]) and len(calls) > 1
    assert np.isfinite(r.timings["prefill"])
