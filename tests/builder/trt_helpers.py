"""Helpers shared by the TensorRT / TensorRT-LLM / pipeline tests: hand-built ONNX graphs and a tiny plan."""

from __future__ import annotations

import json
from pathlib import Path


def export_of(bundle: Path) -> Path:
    """The export directory a cpu bundle was built from (the session's tiny export, reused, not redone)."""
    return Path(json.loads((Path(bundle) / "manifest.json").read_text())["inputs"]["export"])


def gemm_graph(weight_dtype: str = "INT4", shape=(256, 64), block: int | None = 128, axis: int = 0, scale_shape=None,
               consumer: str = "MatMul", act: str | None = None, act_scale_shape=(), zero_point: int = 0):
    """x[?, K] @ DequantizeLinear(W[K, N]) with optional activation Q/DQ, as an in-memory ONNX model (opset 21)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    k, n = shape
    dt = getattr(TensorProto, weight_dtype)
    if scale_shape is None:
        scale_shape = (k // block, n) if block else ()
    inits = [
        helper.make_tensor("W", dt, list(shape), np.zeros(k * n, np.int8).tolist() if weight_dtype != "FLOAT8E4M3FN" else [0.0] * (k * n)),
        helper.make_tensor("W_scale", TensorProto.FLOAT, list(scale_shape), np.full(int(np.prod(scale_shape)), 0.01, np.float32).tolist()),
    ]
    dq_inputs = ["W", "W_scale"]
    if zero_point:
        inits.append(helper.make_tensor("W_zp", dt, list(scale_shape), [zero_point] * int(np.prod(scale_shape))))
        dq_inputs.append("W_zp")
    attrs = {"axis": axis}
    if block:
        attrs["block_size"] = block
    nodes = [helper.make_node("DequantizeLinear", dq_inputs, ["W_dq"], name="dq_w", **attrs)]
    x = "x"
    if act:
        adt = getattr(TensorProto, act)
        inits.append(helper.make_tensor("x_scale", TensorProto.FLOAT, list(act_scale_shape), [0.02] * int(np.prod(act_scale_shape))))
        nodes += [helper.make_node("QuantizeLinear", ["x", "x_scale"], ["x_q"], name="q_x", output_dtype=adt),
                  helper.make_node("DequantizeLinear", ["x_q", "x_scale"], ["x_dq"], name="dq_x")]
        x = "x_dq"
    if consumer == "MatMul":
        nodes.append(helper.make_node("MatMul", [x, "W_dq"], ["y"]))
    else:
        nodes.append(helper.make_node(consumer, [x, "W_dq"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def tiny_plan(ckpt: Path, target: str, precision: str, budget: int = 32):
    from egm_edge.models import spec_from_config
    from egm_edge.plan import plan

    return plan(spec_from_config(ckpt), target, precision, budget)
