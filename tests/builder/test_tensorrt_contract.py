"""TensorRT contract, checked without TensorRT: op coverage, Q/DQ fusion patterns, the GPU/Jetson bundle, engine keys.

The exported tiny graphs (full precision, and one lowered Linear per quantized
format) must use only operators in onnx-tensorrt's table for the pinned version
and only the Q/DQ patterns TensorRT fuses. Tests that need TensorRT are marked
gpu and skip without it.
"""

from __future__ import annotations

import json

import pytest

from egm_edge.errors import CheckpointError, UnsupportedError

onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def tiny_export(tiny_export_trt):
    return tiny_export_trt


def test_op_table_is_data_with_its_source():
    from egm_edge.builder.trt_contract import op_support

    s = op_support("10.16")
    assert "onnx-tensorrt" in s.source and s.version == "10.15" and s.opset_max >= 21
    assert {"MatMul", "DequantizeLinear", "QuantizeLinear", "Softmax", "LayerNormalization"} <= s.supported
    assert not s.supported & s.unsupported and "MatMulInteger" in s.unsupported
    assert "MatMulNBits" not in s.supported


def test_every_op_of_the_tiny_export_is_tensorrt_supported(tiny_export):
    from egm_edge.builder.trt_contract import check_graph, op_support

    table = op_support("10.16").supported
    for graph in ("vision", "decoder"):
        r = check_graph(tiny_export / f"{graph}.onnx", "10.16")
        assert r.ok, r.problems
        assert set(r.ops) <= table and not any("::" in op for op in r.ops)


def test_onnxruntime_fused_graphs_are_refused(tiny_bundle):
    """The cpu bundle's ORT-optimised graphs hold com.microsoft kernels: exactly what must never reach TensorRT."""
    from egm_edge.builder.trt_contract import check_graph

    r = check_graph(tiny_bundle / "decoder.onnx", "10.16")
    assert not r.ok and any("com.microsoft::" in p for p in r.problems)


def _lowered_layer_graph(tmp_path, precision: str, backend: str = "onnxruntime"):
    """One quantized Linear exported through the export stage's own lowering (what the real graphs hold)."""
    torch = pytest.importorskip("torch")
    from egm_edge.export import lowering

    gen = torch.Generator().manual_seed(0)
    k, n = 256, 64
    w = torch.randn(n, k, generator=gen) * 0.05
    lin = torch.nn.Linear(k, n, bias=False)
    if precision == "fp8":
        s = w.abs().max() / 448
        weight, ex = (w / s).to(torch.float8_e4m3fn), {"weight_scale": s.reshape(()), "input_scale": torch.tensor(0.03)}
    elif precision == "int8_sq":
        s = w.abs().amax(1) / 127
        weight = torch.round(w / s[:, None]).to(torch.int8)
        ex = {"weight_scale": s, "input_scale": torch.tensor(0.03), "pre_quant_scale": 0.5 + torch.rand(k, generator=gen)}
    else:
        import importlib.util
        from pathlib import Path

        spec = importlib.util.spec_from_file_location("quantized", Path(__file__).parents[1] / "export" / "quantized.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        weight, scale = mod._int4(w, torch)
        ex = {"weight_scale": scale}
    q = lowering._lowered("layer", weight, ex, lin, backend).eval()
    dyn = torch.export.Dim.DYNAMIC
    x = torch.randn(2, 5, k)
    program = torch.onnx.export(q, (x,), dynamo=True, opset_version=21, input_names=["x"], dynamic_shapes=({0: dyn, 1: dyn},),
                                custom_translation_table=lowering.translation_table())
    if backend == "tensorrt":
        lowering.pack_int4_weights(program.model)  # what the export stage does after tracing
    program.save(str(tmp_path / "layer.onnx"))
    return tmp_path / "layer.onnx"


@pytest.mark.parametrize("precision,patterns", [("fp8", {"fp8_weight", "fp8_activation"}), ("int8_sq", {"int8_weight", "int8_activation"}),
                                               ("int4_awq", {"int4_blocked_weight"})])
def test_quantized_lowerings_use_patterns_tensorrt_fuses(tmp_path, precision, patterns):
    from egm_edge.builder.trt_contract import check_graph

    r = check_graph(_lowered_layer_graph(tmp_path, precision, "tensorrt"), "10.16")
    assert r.ok, r.problems
    assert set(r.quantized) == patterns


def test_int4_onnxruntime_lowering_is_refused_for_tensorrt(tmp_path):
    """MatMulNBits (com.microsoft) is ONNX Runtime's: a TensorRT-bound graph must carry int4 as blocked DequantizeLinear."""
    from egm_edge.builder.trt_contract import check_graph

    r = check_graph(_lowered_layer_graph(tmp_path, "int4_awq"), "10.16")
    assert any("com.microsoft::MatMulNBits" in p for p in r.problems), r.problems


# ---- the Q/DQ rules on hand-built graphs --------------------------------------------------------------


@pytest.mark.parametrize("kwargs,ok,match", [
    ({}, True, None),
    ({"axis": 1, "scale_shape": (256, 1)}, False, "blocks run along axis 1"),
    ({"scale_shape": (4, 64)}, False, "scale shape"),
    ({"block": None, "scale_shape": ()}, False, "must be 2-D and blocked"),
    ({"consumer": "Add"}, False, "does not feed a MatMul/Gemm"),
    ({"zero_point": 1}, False, "zero point"),
    ({"weight_dtype": "UINT4"}, False, "UINT4"),
    ({"weight_dtype": "INT8", "block": None, "axis": 1, "scale_shape": (64,)}, True, None),
    ({"weight_dtype": "INT8", "block": None, "axis": 0, "scale_shape": (256,)}, False, "per-output-channel"),
    ({"weight_dtype": "FLOAT8E4M3FN", "block": None, "act": "FLOAT8E4M3FN"}, True, None),
    ({"weight_dtype": "FLOAT8E4M3FN", "block": None, "act": "FLOAT8E4M3FN", "act_scale_shape": (256,)}, False, "scalar"),
    ({"weight_dtype": "INT8", "block": None, "act": "UINT8"}, False, "UINT8"),
])
def test_qdq_rules(kwargs, ok, match):
    from trt_helpers import gemm_graph

    from egm_edge.builder.trt_contract import check_qdq

    _counts, problems = check_qdq(gemm_graph(**kwargs))
    assert (not problems) == ok, problems
    if match:
        assert any(match in p for p in problems), problems


def test_ops_outside_the_table_and_foreign_domains_are_named():
    from onnx import TensorProto, helper

    from egm_edge.builder.trt_contract import check_ops, op_support

    g = helper.make_graph(
        [helper.make_node("Unique", ["x"], ["u"]), helper.make_node("FusedMatMul", ["x", "x"], ["y"], domain="com.microsoft")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 25), helper.make_opsetid("com.microsoft", 1)])
    _ops, problems = check_ops(m, op_support("10.16"))
    text = " | ".join(problems)
    assert "Unique" in text and "com.microsoft::FusedMatMul" in text and "opset 25" in text


# ---- the bundle ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jetson_bundle(tiny_export, tiny_ckpt, tmp_path_factory):
    from trt_helpers import tiny_plan

    from egm_edge.builder.tensorrt import build_tensorrt
    from egm_edge.targets import load_target

    target = load_target("jetson-orin-nano-8gb")
    return build_tensorrt(tiny_export, tmp_path_factory.mktemp("trt") / "bundle", target, tiny_plan(tiny_ckpt, target, "fp16"))


def test_bundle_carries_ir_plan_and_verdict(jetson_bundle):
    from egm_edge.runtime.bundle import BUNDLE_FILES, open_bundle

    for f in (*BUNDLE_FILES, "build_plan.json"):
        assert (jetson_bundle / f).is_file() and not (jetson_bundle / f).is_symlink(), f
    m = json.loads((jetson_bundle / "manifest.json").read_text())
    assert m["target"] == "jetson-orin-nano-8gb" and m["executor"] == "tensorrt" and "trtllm" in m and m["trtllm"] is None
    assert m["plan"]["fits"] and m["plan"]["verdict"].startswith("fits")
    assert m["build_plan"]["plan_hash"] == json.loads((jetson_bundle / "build_plan.json").read_text())["plan_hash"]
    b = open_bundle(jetson_bundle)
    bp = json.loads((jetson_bundle / "build_plan.json").read_text())
    assert b.generation.max_seq_len == bp["tokens"]["kv_max"]
    # The processor never lets through more image tokens than the engines' profiles admit.
    assert b.image_processor.max_pixels <= bp["tokens"]["image_max"] * (b.image_processor.patch_size * b.image_processor.merge_size) ** 2


def test_build_plan_profiles_are_ordered_and_cover_every_input(jetson_bundle):
    import onnx

    bp = json.loads((jetson_bundle / "build_plan.json").read_text())
    assert bp["strongly_typed"] and bp["tensorrt_assumed"] == "10.16" and bp["compute_capability"] == "8.7"
    assert bp["graph_dtype"] == "float32" and any("float32" in n for n in bp["notes"])  # said, not hidden
    t = bp["tokens"]
    assert t["kv_max"] == t["prefill_max"] + t["think_budget"] + t["budget_close"] + t["answer"]
    for graph, names in (("vision", ["prefill"]), ("decoder", ["prefill", "decode"])):
        spec = bp["engines"][graph]
        inputs = {i.name for i in onnx.load(str(jetson_bundle / spec["onnx"]), load_external_data=False).graph.input}
        for prof in spec["profiles"]:
            assert set(prof["shapes"]) == inputs
            for s in prof["shapes"].values():
                assert all(a <= b <= c for a, b, c in zip(s["min"], s["opt"], s["max"])), s
        if graph == "decoder":
            assert [p["name"] for p in spec["profiles"]] == names
            pre, dec = (p["shapes"] for p in spec["profiles"])
            assert pre["past_key_values.0.key"]["max"][2] == 0 and pre["input_ids"]["max"][1] == t["prefill_max"]
            assert dec["input_ids"]["max"] == [1, 1] and dec["attention_mask"]["max"][1] == t["kv_max"]


def test_bundle_ir_grounds_with_onnxruntime_and_auto_needs_tensorrt(jetson_bundle, scene):
    from egm_edge.runtime.grounder import Grounder

    if importlib_util_find("tensorrt") is None:
        with pytest.raises(UnsupportedError, match="needs TensorRT"):
            Grounder.open(jetson_bundle)
    r = Grounder.open(jetson_bundle, executor="onnxruntime").ground(str(scene), "the red square", think_budget=3, max_answer_tokens=8)
    assert r.think_tokens == 3


def importlib_util_find(name):
    import importlib.util

    return importlib.util.find_spec(name)


def test_cpu_graphs_targets_and_foreign_precisions_are_refused(tiny_bundle, tiny_export_trt, tiny_ckpt, tmp_path):
    from trt_helpers import export_of, tiny_plan

    from egm_edge.builder.tensorrt import build_tensorrt
    from egm_edge.targets import load_target

    t = load_target("h100")
    with pytest.raises(CheckpointError):  # a cpu bundle is not an export
        build_tensorrt(tiny_bundle, tmp_path / "b", t, tiny_plan(tiny_ckpt, t, "fp16"))
    with pytest.raises(UnsupportedError, match="holds full weights but the plan is for int8_sq"):
        build_tensorrt(tiny_export_trt, tmp_path / "b", t, tiny_plan(tiny_ckpt, t, "int8_sq"))
    with pytest.raises(UnsupportedError, match="GroupQueryAttention.*TensorRT lowering"):  # the CPU bundle's own export
        build_tensorrt(export_of(tiny_bundle), tmp_path / "b", t, tiny_plan(tiny_ckpt, t, "fp16"))
    with pytest.raises(UnsupportedError, match="cpu target"):
        build_tensorrt(tiny_bundle, tmp_path / "b", load_target("cpu"), tiny_plan(tiny_ckpt, "cpu", "fp32"))
    assert not (tmp_path / "b").exists()


def test_engines_of_another_device_or_version_are_refused(jetson_bundle, tmp_path):
    import shutil

    from egm_edge.runtime.trt_executor import Device, engine_key, find_engines

    bundle = tmp_path / "b"
    shutil.copytree(jetson_bundle, bundle)
    plan_hash = json.loads((bundle / "build_plan.json").read_text())["plan_hash"]
    here = engine_key(Device("NVIDIA Jetson Orin Nano", "8.7"), "10.16.0", plan_hash)
    with pytest.raises(CheckpointError, match="no TensorRT engines yet"):
        find_engines(bundle, here)
    other = bundle / "engines" / engine_key(Device("NVIDIA H100 80GB HBM3", "9.0"), "10.16.0", plan_hash)
    other.mkdir(parents=True)
    for f in ("vision.engine", "decoder.engine", "engine.json"):
        (other / f).write_text("{}")
    with pytest.raises(CheckpointError, match="nvidia-h100-80gb-hbm3-sm90-trt10.16.0.*--finalize"):
        find_engines(bundle, here)
    assert find_engines(bundle, other.name) == other
    assert engine_key(Device("X", "8.7"), "10.16.0", plan_hash) != engine_key(Device("X", "8.7"), "10.3.0", plan_hash)


def test_finalize_without_tensorrt_says_where_to_run_it(jetson_bundle, capsys):
    if importlib_util_find("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    from egm_edge.cli import main

    assert main(["build", "--finalize", str(jetson_bundle)]) == 2
    err = capsys.readouterr().err
    assert "on the target device" in err and err.count("\n") == 1


@pytest.mark.gpu
def test_finalize_builds_engines_that_ground(jetson_bundle, tmp_path, scene):
    pytest.importorskip("tensorrt")
    pytest.importorskip("cuda")
    import shutil

    from egm_edge.builder import tensorrt as trt_build
    from egm_edge.runtime.grounder import Grounder

    bundle = tmp_path / "b"
    shutil.copytree(jetson_bundle, bundle)
    bp = json.loads((bundle / "build_plan.json").read_text())
    from egm_edge.runtime.trt_executor import current_device

    bp["compute_capability"] = current_device().compute_capability  # this test runs on whatever GPU is at hand
    (bundle / "build_plan.json").write_text(json.dumps(bp))
    d = trt_build.finalize(bundle)
    assert trt_build.finalize(bundle) == d  # cached
    ref = Grounder.open(bundle, executor="onnxruntime").ground(str(scene), "the red square", think_budget=4, max_answer_tokens=8)
    got = Grounder.open(bundle).ground(str(scene), "the red square", think_budget=4, max_answer_tokens=8)
    assert got.text == ref.text


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp8", "int8_sq", "int4_awq"])
def test_full_quantized_exports_are_tensorrt_ready(tmp_path, precision):
    import importlib.util
    from pathlib import Path

    from egm_edge.builder.trt_contract import check_graph
    from egm_edge.export import export
    from egm_edge.reference.checkpoint import write_tiny_checkpoint

    here = Path(__file__).parents[1] / "export"
    mods = {}
    for name in ("quantized", "conftest"):
        spec = importlib.util.spec_from_file_location(f"_x_{name}", here / f"{name}.py")
        mods[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mods[name])
    tok = mods["conftest"].write_small_tokenizer(tmp_path / "tok")
    text = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [8, 4, 4], "mrope_interleaved": True}}
    base = write_tiny_checkpoint(tmp_path / "ck", tok, seed=0, text=text, vision={"out_hidden_size": 128})
    out = export(mods["quantized"].write_quantized(base, tmp_path / f"ck-{precision}", precision), tmp_path / "ir", decode_steps=2, lowering="tensorrt")
    for graph in ("vision", "decoder"):
        r = check_graph(out / f"{graph}.onnx", "10.16")
        assert r.ok, r.problems
    per_linear = 1 if precision == "int4_awq" else 2  # weight (+ activation)
    assert sum(check_graph(out / "decoder.onnx", "10.16").quantized.values()) == 14 * per_linear  # 7 Linears x 2 layers
