"""Weight lowering: quantized Linears as MatMulNBits / FP8 Q/DQ / INT8 Q/DQ agree with the dequantizing loader."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from egm_edge.errors import UnsupportedError

torch = pytest.importorskip("torch")

QUANT_TEXT = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32,
              "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [8, 4, 4], "mrope_interleaved": True}}


def _linear_case(precision: str, k=256, n=64, seed=0):
    """(stored weight, scale dict, torch Linear) for one Linear in the checkpoint's format."""
    from quantized import _int4

    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    lin = torch.nn.Linear(k, n, bias=False)
    if precision == "int4_awq":
        packed, scale = _int4(w, torch)
        return packed, {"weight_scale": scale, "pre_quant_scale": 0.5 + torch.rand(k, generator=gen)}, lin
    if precision == "fp8":
        s = w.abs().max() / 448
        return (w / s).to(torch.float8_e4m3fn), {"weight_scale": s.reshape(()), "input_scale": torch.tensor(0.03)}, lin
    s = w.abs().amax(1) / 127
    q = torch.round(w / s[:, None]).to(torch.int8)
    return q, {"weight_scale": s, "input_scale": torch.tensor(0.03), "pre_quant_scale": 0.5 + torch.rand(k, generator=gen)}, lin


@pytest.mark.parametrize("precision,backend,level,ops", [
    ("int4_awq", "onnxruntime", 0, {"MatMulNBits"}),
    ("int4_awq", "onnxruntime", 4, {"MatMulNBits"}),
    ("int4_awq", "tensorrt", 0, {"DequantizeLinear", "MatMul"}),
    ("fp8", "onnxruntime", 0, {"QuantizeLinear", "DequantizeLinear", "MatMul"}),
    ("int8_sq", "onnxruntime", 0, {"QuantizeLinear", "DequantizeLinear", "MatMul"}),
])
def test_each_lowering_matches_the_loader_numerics(precision, backend, level, ops, tmp_path):
    import onnx
    import onnxruntime as ort

    from egm_edge.export import lowering, onnx_io
    from egm_edge.quantize.loader import _activation_kind, dequantize_weight, fake_quant_input

    weight, ex, lin = _linear_case(precision)
    q = lowering._lowered("layer", weight, ex, lin, backend)
    x = torch.randn(2, 5, 256) * 2

    ref_x = x * ex["pre_quant_scale"] if "pre_quant_scale" in ex else x
    kind = _activation_kind(weight.dtype, ex)
    if kind:
        ref_x = fake_quant_input(ref_x, ex["input_scale"], kind)
    ref = ref_x @ dequantize_weight(weight, ex).T
    torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)

    dyn = torch.export.Dim.DYNAMIC
    onnx_io.export_graph(q, (x,), tmp_path / "m.onnx", ["x"], ["y"], ({0: dyn, 1: dyn},), {}, 0,
                         translations=lowering.translation_table(level), postprocess=lowering.pack_int4_weights)
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert ops <= {n.op_type for n in model.graph.node}
    floats = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) >= 256 * 64]
    assert not floats, "a float copy of the quantized weight was left in the graph"
    if backend == "tensorrt":
        assert [i.data_type for i in model.graph.initializer if len(i.dims) == 2 and np.prod(i.dims) == 256 * 64] == [onnx.TensorProto.INT4]
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(lowering.QDQ_FUSION) if precision == "fp8" or backend == "tensorrt" else [])
    got = sess.run(None, {"x": x.numpy()})[0]
    r = ref.numpy()
    cos = float((got * r).sum() / np.linalg.norm(got) / np.linalg.norm(r))
    if level == 4:  # int8 activations inside MatMulNBits: close, not faithful (the export's looser threshold)
        from egm_edge.export.validate import THRESHOLDS

        assert {a.name: a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute}["accuracy_level"] == 4
        t = THRESHOLDS["int4_awq/int8_compute"]
        assert cos >= t.cosine and np.abs(got - r).max() <= t.rel_max_abs * np.abs(r).max()
        return
    assert cos >= 0.9999 and np.abs(got - r).max() <= 2e-2 * np.abs(r).max()

    from egm_edge.builder.trt_contract import check_graph

    report = check_graph(tmp_path / "m.onnx")
    if backend == "tensorrt" or precision != "int4_awq":
        assert report.ok, report.problems  # what TensorRT's parser and Q/DQ fusion accept
    else:
        assert any("MatMulNBits" in p for p in report.problems)


def test_formats_without_cpu_lowering_are_refused():
    from egm_edge.export import lowering

    weight, ex, lin = _linear_case("int4_awq")
    with pytest.raises(UnsupportedError, match="W4A8"):
        lowering._lowered("layer", weight, {**ex, "weight_scale_2": torch.tensor(0.1), "input_scale": torch.tensor(0.1)}, lin)
    with pytest.raises(UnsupportedError, match="NVFP4"):
        lowering._lowered("layer", weight, {"weight_scale": ex["weight_scale"].to(torch.float8_e4m3fn)}, lin)


@pytest.fixture(scope="module")
def quant_base(tmp_path_factory, small_tokenizer):
    from egm_edge.reference.checkpoint import write_tiny_checkpoint

    tok = small_tokenizer
    # int4 blocks of 128 need every Linear's input width to be a multiple of 128.
    return write_tiny_checkpoint(tmp_path_factory.mktemp("qbase") / "tiny", tok, seed=0, text=QUANT_TEXT, vision={"out_hidden_size": 128})


def _export_quantized(base, tmp_path, precision):
    from quantized import write_quantized

    from egm_edge.export import export

    return export(write_quantized(base, tmp_path / f"ckpt-{precision}", precision), tmp_path / f"ir-{precision}", decode_steps=3)


def test_int4_awq_export_holds_only_packed_weights_and_validates(quant_base, tmp_path, monkeypatch):
    import onnx

    from egm_edge.export import onnx_io

    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 0)  # exercise the big-model path: weights in side files
    out = _export_quantized(quant_base, tmp_path, "int4_awq")
    m = json.loads((out / "manifest.json").read_text())
    assert m["graphs"]["decoder"]["external_data"] == "decoder.onnx.data" and (out / "decoder.onnx.data").is_file()
    assert not any(p.is_symlink() for p in out.iterdir())
    assert m["precision"] == "int4_awq" and m["validation"]["passed"]
    assert m["lowered_layers"] == {"int4/MatMulNBits weight-only": 14}  # 7 Linears x 2 layers
    assert all(c["greedy_agreement"] == 1.0 for c in m["validation"]["cases"].values())
    graph = onnx.load(str(out / "decoder.onnx")).graph
    # q/k/v and gate/up read the same input: one MatMulNBits each (4 per layer), their rows stacked.
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 8
    widths = sorted({next(a.i for a in n.attribute if a.name == "N") for n in nbits})
    d = m["runtime"]["decoder"]
    cfg = json.loads((quant_base / "config.json").read_text())["text_config"]
    qkv = (cfg["num_attention_heads"] + 2 * d["num_kv_heads"]) * d["head_dim"]
    assert widths == sorted({qkv, d["hidden_size"], 2 * cfg["intermediate_size"]}), widths
    vocab = m["runtime"]["decoder"]["vocab_size"]  # embeddings and lm_head stay unquantized by design
    big_floats = [i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2 and vocab not in i.dims
                  and i.name not in ("rope_cos", "rope_sin")]  # M-RoPE tables (egm_edge.export.fused)
    assert not big_floats, big_floats


def test_refusals_before_export(quant_base, tmp_path):
    from quantized import write_quantized

    from egm_edge.export import export

    with pytest.raises(UnsupportedError, match="w4a8_awq"):
        export(write_quantized(quant_base, tmp_path / "w4a8", "w4a8_awq"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp8", "int8_sq"])
def test_activation_quantized_exports_validate(quant_base, tmp_path, precision):
    out = _export_quantized(quant_base, tmp_path, precision)
    m = json.loads((out / "manifest.json").read_text())
    assert m["validation"]["passed"] and m["lowered_layers"] == {f"{precision[:4].rstrip('_')}/QDQ": 14}
    if precision == "int8_sq":  # a CPU precision: it also builds (the build smoke-tests the bundle) and grounds
        from egm_edge.builder import build_cpu
        from egm_edge.runtime.grounder import Grounder
        from egm_edge.synth import draw, render

        bundle = build_cpu(out, tmp_path / "bundle-int8", max_answer_tokens=8)
        s = draw(11, 0)
        r = Grounder.open(bundle).ground(render(s.scene), s.expr.sent, think_budget=4, max_answer_tokens=8, max_new_tokens=16)
        assert r.think_tokens <= 4 and r.answer_tokens <= 8
    shutil.rmtree(out)


def test_int4_cpu_bundle_runs_like_the_dequantized_reference(quant_base, tmp_path, grounds_like_reference):
    """int4_awq checkpoint -> export (MatMulNBits) -> cpu bundle: the runtime's greedy tokens equal the PyTorch
    reference on the same quantized checkpoint, and the decoder is a fraction of the fp32 weights."""
    from quantized import write_quantized

    from egm_edge.builder import build_cpu
    from egm_edge.export import export

    ckpt = write_quantized(quant_base, tmp_path / "ckpt-int4", "int4_awq")
    bundle = build_cpu(export(ckpt, tmp_path / "ir", decode_steps=2), tmp_path / "bundle", max_answer_tokens=8)
    fp32_bytes = (quant_base / "model.safetensors").stat().st_size
    int4_bytes = sum(p.stat().st_size for p in bundle.iterdir() if p.name.startswith("decoder.onnx"))
    assert int4_bytes < 0.5 * fp32_bytes, (int4_bytes, fp32_bytes)
    grounds_like_reference(bundle, ckpt)


@pytest.mark.parametrize("mode,bits,block", [("int4", 4, 32), ("int8", 8, 128)])
def test_rtn_lm_head_is_within_half_a_step_of_the_float_weight(mode, bits, block):
    from egm_edge.export import lowering

    gen = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(256, 96, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 256, generator=gen) * 0.05)
    q = lowering.rtn_linear(lin, mode)
    assert q.bits == bits and q.block == block
    w = lowering.nbits_weight(q.packed, q.scales, 256, 96, block, bits)
    step = q.scales.reshape(96, -1).repeat_interleave(block, dim=1)
    assert ((w - lin.weight).abs() <= step / 2 + 1e-7).all()
    x = torch.randn(3, 256, generator=gen)
    torch.testing.assert_close(q(x), lowering.dequantized_linear(q)(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(UnsupportedError, match="lm_head mode"):
        lowering.rtn_linear(lin, "int2")


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_quantized_lm_head_export_drops_the_float_head_and_validates(quant_base, tmp_path, mode):
    """A full-precision checkpoint with --lm-head int4/int8: the decoder's vocabulary-sized float matrix is read
    by a Gather only (the embedding), the head is one MatMulNBits, and ONNX Runtime matches the rounded reference."""
    import onnx

    from egm_edge.export import export

    out = export(quant_base, tmp_path / f"ir-{mode}", lm_head=mode, int4_accuracy_level=4, decode_steps=3)
    m = json.loads((out / "manifest.json").read_text())
    assert m["validation"]["passed"] and m["lm_head"] == mode
    assert m["lowered_layers"] == {f"lm_head {mode}/MatMulNBits weight-only": 1}
    graph = onnx.load(str(out / "decoder.onnx")).graph
    heads = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(heads) == 1 and {a.name: a.i for a in heads[0].attribute}["bits"] == (4 if mode == "int4" else 8)
    vocab = m["runtime"]["decoder"]["vocab_size"]
    tables = {i.name for i in graph.initializer if vocab in i.dims and len(i.dims) == 2}
    users = {n.op_type for n in graph.node for name in n.input if name in tables}
    assert users == {"Gather"}, users
    with pytest.raises(UnsupportedError, match="TensorRT"):
        export(quant_base, tmp_path / "trt", lm_head=mode, lowering="tensorrt")


def test_lm_head_mode_and_block_are_parsed_with_one_sentence_for_bad_ones():
    from egm_edge.export.lowering import parse_lm_head

    assert parse_lm_head("float") is None
    assert parse_lm_head("int4") == ("int4", 4, 32) and parse_lm_head("int8") == ("int8", 8, 128)
    assert parse_lm_head("int4:128") == ("int4", 4, 128) and parse_lm_head("int8:64") == ("int8", 8, 64)
    for bad, words in (("int3", "Unknown lm_head mode"), ("int4:100", "not one MatMulNBits takes"),
                       ("int4:x", "not one MatMulNBits takes"), ("float:32", "no block size")):
        with pytest.raises(UnsupportedError, match=words):
            parse_lm_head(bad)


def test_lm_head_block_changes_the_rounding_not_the_layout():
    import torch

    from egm_edge.export.lowering import nbits_weight, rtn_linear

    lin = torch.nn.Linear(256, 48, bias=False)
    errs = {}
    for spec in ("int4:32", "int4:128"):
        q = rtn_linear(lin, spec)
        assert q.block == int(spec.split(":")[1]) and q.scales.numel() == 48 * 256 // q.block
        errs[spec] = (nbits_weight(q.packed, q.scales, q.k, q.n, q.block, q.bits) - lin.weight).abs().mean().item()
    assert errs["int4:32"] < errs["int4:128"]  # smaller blocks round closer
