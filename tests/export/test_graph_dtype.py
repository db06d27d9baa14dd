"""16-bit TensorRT graphs: the dtype per target, what each graph holds, attention in TensorRT's fused form, validation.

The TensorRT lowering exports float16 graphs for Jetson Orin and bfloat16 ones where the target profile lists bf16
(`egm_edge.builder.tensorrt.graph_dtype_for`); the ONNX Runtime (CPU) lowering stays float32. float16 graphs are
validated in ONNX Runtime on CPU against the float32 PyTorch model; bfloat16 ones, which it cannot run, through
their float32 twin, and the manifest says so.
"""

from __future__ import annotations

import json

import numpy as np

import pytest

from egm_edge.errors import UnsupportedError

onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def exported_16(tmp_path_factory, small_checkpoint):
    """{"float16": dir, "bfloat16": dir}: the tiny checkpoint exported for TensorRT with the dtype each target gets."""
    from egm_edge.builder.tensorrt import graph_dtype_for
    from egm_edge.export.pipeline import export
    from egm_edge.targets import load_target

    root = tmp_path_factory.mktemp("export-16")
    out = {}
    for target in ("jetson-orin-nx-16gb", "h100"):
        dtype = graph_dtype_for(load_target(target), "int4_awq")
        out[dtype] = export(small_checkpoint, root / dtype, lowering="tensorrt", graph_dtype=dtype, decode_steps=2)
    return out


def _elem(model, names: set[str]) -> dict[str, str]:
    name = onnx.TensorProto.DataType.Name
    g = model.graph
    typed = {v.name: name(v.type.tensor_type.elem_type) for v in list(g.input) + list(g.output)}
    typed.update({t.name: name(t.data_type) for t in g.initializer})
    return {n: typed[n] for n in names if n in typed}


def _load(d, graph):
    return onnx.load(str(d / f"{graph}.onnx"), load_external_data=False)


def test_graph_dtype_follows_the_target():
    from egm_edge.builder.tensorrt import graph_dtype_for
    from egm_edge.targets import load_target

    assert graph_dtype_for(load_target("cpu"), "int4_awq") == "float32"
    for orin in ("jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb", "jetson-thor"):
        assert graph_dtype_for(load_target(orin), "int4_awq") == "float16"  # no bf16 in these profiles
    for gpu in ("a100", "l40s", "h100", "b200"):
        assert graph_dtype_for(load_target(gpu), "int8_sq") == "bfloat16"
    assert graph_dtype_for(load_target("h100"), "fp16") == "float16"  # a plan that names its 16-bit dtype keeps it


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_vision_embeddings_attention_and_lm_head_are_16_bit(exported_16, dtype):
    want = dtype.upper()
    d = exported_16[dtype]
    m = json.loads((d / "manifest.json").read_text())
    assert m["graph_dtype"] == dtype and m["runtime"]["decoder"]["cache_dtype"] == dtype
    vision = _load(d, "vision")
    io = _elem(vision, {"pixel_patches", "pos_embed_weights", "rotary_cos", "image_features", "deepstack_features"})
    assert set(io.values()) == {want}, io
    weights = {t.name: onnx.TensorProto.DataType.Name(t.data_type) for t in vision.graph.initializer
               if t.name.startswith("model.")}
    assert weights and set(weights.values()) == {want}, weights  # every vision weight, patch embedding to mergers
    decoder = _load(d, "decoder")
    dc = json.loads((d / "manifest.json").read_text())["runtime"]["decoder"]
    # The exporter stores Linear weights transposed under generated names: every 2-D initializer is a weight matrix
    # (q/k/v/o projections, MLP, lm_head [hidden, vocab]) or the embedding table [vocab, hidden].
    mats = {t.name: (tuple(t.dims), onnx.TensorProto.DataType.Name(t.data_type)) for t in decoder.graph.initializer if len(t.dims) == 2}
    shapes = {shape for shape, _ in mats.values()}
    assert (dc["vocab_size"], dc["hidden_size"]) in shapes and (dc["hidden_size"], dc["vocab_size"]) in shapes
    assert {dt for _, dt in mats.values()} == {want}, mats
    io = _elem(decoder, {"image_features", "deepstack_features", "past_key_values.0.key", "present.1.value", "logits"})
    assert io.pop("logits") == "FLOAT"  # the lm_head MatMul is 16-bit; its logits leave as float32 for the host's sampling
    assert set(io.values()) == {want}, io


def test_cpu_lowering_stays_float32_and_refuses_16_bit(exported, small_checkpoint, tmp_path):
    from egm_edge.export.pipeline import export

    m = json.loads((exported / "manifest.json").read_text())
    assert m["graph_dtype"] == "float32" and m["validation"]["validated_graph_dtype"] == "float32"
    floats = {onnx.TensorProto.DataType.Name(t.data_type) for t in _load(exported, "vision").graph.initializer if len(t.dims) >= 2}
    assert floats == {"FLOAT"}
    with pytest.raises(UnsupportedError, match="float32 graphs.*--lowering tensorrt"):
        export(small_checkpoint, tmp_path / "x", graph_dtype="float16")
    with pytest.raises(UnsupportedError, match="Unknown graph dtype 'half'"):
        export(small_checkpoint, tmp_path / "x", lowering="tensorrt", graph_dtype="half")
    assert not (tmp_path / "x").exists()


def test_float16_is_validated_in_onnxruntime_and_bfloat16_through_its_float32_twin(exported_16):
    from dataclasses import asdict

    from egm_edge.export.validate import THRESHOLDS

    v16 = json.loads((exported_16["float16"] / "manifest.json").read_text())["validation"]
    assert v16["passed"] and v16["validated_graph_dtype"] == "float16" and "graphs" not in v16
    assert v16["precision"] == "full/float16" and v16["threshold"] == asdict(THRESHOLDS["full/float16"])
    for case in v16["cases"].values():  # measured against the float32 model, well inside the stated bound
        assert all(o["cosine"] >= 0.9999 for o in case["outputs"].values()) and case["greedy_agreement"] == 1.0
    vbf = json.loads((exported_16["bfloat16"] / "manifest.json").read_text())["validation"]
    assert vbf["graphs"].startswith("not run on CPU: ") and vbf["validated_graph_dtype"] == "float32"
    assert vbf["passed"] and vbf["precision"] == "full" and vbf["threshold"] == asdict(THRESHOLDS["full"])  # fp32's own bound


def _producer_chain(producers, name, skip=("Reshape", "Transpose")):
    node = producers.get(name)
    while node is not None and node.op_type in skip:
        node = producers.get(node.input[0])
    return node


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_attention_has_the_form_tensorrt_fuses(exported_16, dtype):
    """softmax(Q*scale @ K^T + mask) @ V with no Cast between the MatMuls (egm_edge.export.graphs.ATTENTION_FORM)."""
    for graph in ("vision", "decoder"):
        model = onnx.shape_inference.infer_shapes(_load(exported_16[dtype], graph))
        g = model.graph
        producers = {o: n for n in g.node for o in n.output}
        consumers: dict[str, list] = {}
        for n in g.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input)}
        softmaxes = [n for n in g.node if n.op_type == "Softmax"]
        assert softmaxes
        for sm in softmaxes:
            assert onnx.TensorProto.DataType.Name(types[sm.input[0]]) == dtype.upper()
            add = _producer_chain(producers, sm.input[0])
            assert add.op_type == "Add", add.op_type  # the additive mask
            bmm1 = next(p for p in (_producer_chain(producers, i) for i in add.input) if p is not None and p.op_type == "MatMul")
            assert _producer_chain(producers, bmm1.input[0]).op_type == "Mul"  # Q scaled before the first MatMul
            nxt = consumers[sm.output[0]][0]
            while nxt.op_type in ("Reshape", "Transpose"):
                nxt = consumers[nxt.output[0]][0]
            assert nxt.op_type == "MatMul"


def test_contract_accepts_16_bit_graphs_and_bf16_only_where_the_target_has_it(exported_16):
    from egm_edge.builder.trt_contract import check_graph, require_tensorrt_graphs
    from egm_edge.targets import load_target

    for dtype, d in exported_16.items():
        for graph in ("vision", "decoder"):
            r = check_graph(d / f"{graph}.onnx", "10.16")
            assert r.ok, r.problems
            assert r.dtypes[dtype.upper()] > r.dtypes.get("FLOAT", 0)  # float32 left: rope angles, RMSNorm statistics, logits
    assert require_tensorrt_graphs(exported_16["float16"], load_target("jetson-orin-nx-16gb"))["decoder"]["dtypes"]["FLOAT16"]
    assert require_tensorrt_graphs(exported_16["bfloat16"], load_target("h100"))["vision"]["dtypes"]["BFLOAT16"]
    with pytest.raises(UnsupportedError, match="bfloat16 tensors but jetson-orin-nx-16gb.*--graph-dtype float16"):
        require_tensorrt_graphs(exported_16["bfloat16"], load_target("jetson-orin-nx-16gb"))


def test_a_16_bit_export_drops_the_float32_note_from_the_build_plan(exported_16, small_checkpoint, tmp_path):
    from egm_edge.builder.tensorrt import build_tensorrt
    from egm_edge.models import spec_from_config
    from egm_edge.plan import plan
    from egm_edge.targets import load_target

    target = load_target("jetson-orin-nx-16gb")
    out = build_tensorrt(exported_16["float16"], tmp_path / "b", target, plan(spec_from_config(small_checkpoint), target, "fp16", 32))
    bp = json.loads((out / "build_plan.json").read_text())
    assert bp["graph_dtype"] == "float16" and bp["notes"] == []


@pytest.fixture(scope="module")
def int4_fp16(tmp_path_factory, small_tokenizer):
    from quantized import write_quantized

    from egm_edge.export.pipeline import export
    from egm_edge.reference.checkpoint import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("int4-16")
    text = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [8, 4, 4], "mrope_interleaved": True}}
    base = write_tiny_checkpoint(root / "ck", small_tokenizer, seed=0, text=text, vision={"out_hidden_size": 128})
    return export(write_quantized(base, root / "ck-int4", "int4_awq"), root / "ir", lowering="tensorrt", graph_dtype="float16",
                  decode_steps=2)


def test_int4_weights_are_blocked_dequantize_to_float16_before_matmul(int4_fp16):
    from egm_edge.builder.trt_contract import check_graph

    m = _load(int4_fp16, "decoder")
    inits = {t.name: t for t in m.graph.initializer}
    consumers = {i: n for n in m.graph.node for i in n.input}
    dqs = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(dqs) == 14  # 7 Linears x 2 layers
    name = onnx.TensorProto.DataType.Name
    for dq in dqs:
        assert name(inits[dq.input[0]].data_type) == "INT4" and name(inits[dq.input[1]].data_type) == "FLOAT16"
        assert consumers[dq.output[0]].op_type == "MatMul"
    assert check_graph(int4_fp16 / "decoder.onnx", "10.16").quantized == {"int4_blocked_weight": 14}
    v = json.loads((int4_fp16 / "manifest.json").read_text())["validation"]
    assert v["passed"] and v["precision"] == "int4_awq/float16" and v["validated_graph_dtype"] == "float16"


def test_a_16_bit_gpu_bundle_runs_on_the_cpu_executor_alone_and_batched(exported_16, small_checkpoint, tmp_path):
    """`--executor onnxruntime` on a GPU bundle runs its ONNX IR: float16 feeds and KV cache, one request alone or
    in the in-flight batch with the same greedy tokens; bfloat16 graphs are refused in one sentence."""
    from PIL import Image

    from egm_edge.builder.tensorrt import build_tensorrt
    from egm_edge.errors import UnsupportedError
    from egm_edge.models import spec_from_config
    from egm_edge.plan import plan
    from egm_edge.runtime.grounder import Grounder
    from egm_edge.runtime.scheduler import Scheduler
    from egm_edge.targets import load_target

    target = load_target("jetson-orin-nx-16gb")
    bundle = build_tensorrt(exported_16["float16"], tmp_path / "b16", target, plan(spec_from_config(small_checkpoint), target, "fp16", 32))
    g = Grounder.open(bundle, executor="onnxruntime", image_cache_size=0)
    assert g.executor.cache_dtype == np.float16
    images = [Image.new("RGB", (64 + 32 * i, 96), (40 * i, 200, 90)) for i in range(3)]
    kw = dict(think_budget=3, max_answer_tokens=6, max_new_tokens=14)
    alone = [g.generate(im, "Locate the red circle", **kw) for im in images]
    sched = Scheduler(g, max_batch=3)
    jobs = [sched.submit(g.start(im, "Locate the red circle", **kw)) for im in images]
    sched.run_until_idle()
    assert [j.wait(deadline=0).text for j in jobs] == [r.text for r in alone] and sched.stats["peak_batch"] == 3
    assert sched.cache.arrays[0].dtype == np.float16

    h100 = load_target("h100")
    b16 = build_tensorrt(exported_16["bfloat16"], tmp_path / "bbf", h100, plan(spec_from_config(small_checkpoint), h100, "bf16", 32))
    with pytest.raises(UnsupportedError, match="bfloat16 graphs, which ONNX Runtime cannot run on a CPU"):
        Grounder.open(b16, executor="onnxruntime")
