"""What a TensorRT-bound ONNX graph must look like, checked without TensorRT.

Contract: `op_support(version)` reads the TensorRT ONNX-parser operator table kept
as data (egm_edge/builder/data/onnx_tensorrt_ops.toml, with its source);
`check_ops(model, support)` lists every node TensorRT's parser would refuse
(an operator outside the table, any non-ONNX domain such as com.microsoft's
MatMulNBits, an opset outside the parser's range); `check_qdq(model)` lists every
Q/DQ pattern TensorRT would not fuse into a quantized GEMM:
- a DequantizeLinear of a weight (an initializer) must feed a MatMul/Gemm weight
  input; INT8/FP8 weights are per-tensor or per-output-channel; INT4 weights are
  blocked (2-D, `block_size` > 0 on the input-channel axis, scale of the same
  rank with that axis divided by the block);
- an activation QuantizeLinear must be INT8 or FP8 with a scalar scale and zero
  zero-point and feed exactly DequantizeLinear nodes that share its scale and feed
  a MatMul/Gemm;
- no quantized type TensorRT lacks (UINT8/UINT4 activations, INT16...).
`check_dtypes(model)` counts the element types of the graph's inputs, outputs and
initializers and lists those a TensorRT network has no tensor type for (float64,
int16, string...): float32, float16 and bfloat16 graphs are all accepted, since a
STRONGLY_TYPED network computes each layer in its tensors' types ("Strongly Typed
Networks", TensorRT developer guide), with DequantizeLinear outputting its scale's type.
`check_graph(path, tensorrt_version)` runs the three on a file and returns a
`GraphReport`; `require_tensorrt_graphs(export_dir, target)` raises
`UnsupportedError` with the first problem, including bfloat16 tensors for a target whose
profile lists no bf16 (Jetson Orin). Needs only the `onnx` package.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from egm_edge.errors import UnsupportedError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib

DATA = Path(__file__).resolve().parent / "data"
_GEMMS = ("MatMul", "Gemm")


@dataclass(frozen=True)
class OpSupport:
    version: str
    source: str
    opset_min: int
    opset_max: int
    supported: frozenset[str]
    unsupported: frozenset[str]
    restrictions: dict[str, str] = field(default_factory=dict)


@functools.lru_cache(maxsize=None)
def op_support(version: str | None = None) -> OpSupport:
    """The operator table for TensorRT `version` (the newest table not newer than it; the oldest if none is)."""
    with (DATA / "onnx_tensorrt_ops.toml").open("rb") as f:
        t = tomllib.load(f)["tensorrt"]
    # One table today; the data file names its version so a second one can sit beside it.
    return OpSupport(t["version"], t["source"], int(t["opset_min"]), int(t["opset_max"]), frozenset(t["supported"]),
                     frozenset(t["unsupported"]), dict(t.get("restrictions", {})))


@dataclass(frozen=True)
class GraphReport:
    graph: str
    tensorrt: str
    ops: dict[str, int]  # op_type -> count (domain-qualified when not ai.onnx)
    quantized: dict[str, int]  # pattern -> count: "int4_blocked_weight", "fp8_weight", "int8_activation", ...
    problems: tuple[str, ...]
    dtypes: dict[str, int] = field(default_factory=dict)  # element type -> count over inputs, outputs, initializers

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"graph": self.graph, "tensorrt": self.tensorrt, "ops": dict(self.ops), "quantized": dict(self.quantized),
                "dtypes": dict(self.dtypes), "problems": list(self.problems)}


def _nodes(graph):
    """Every node, subgraphs (If/Loop/Scan bodies) included."""
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.g and a.g.node:
                yield from _nodes(a.g)
            for g in a.graphs:
                yield from _nodes(g)


def check_ops(model, support: OpSupport) -> tuple[dict[str, int], list[str]]:
    """(op counts, problems): nodes TensorRT's ONNX parser would refuse."""
    problems: list[str] = []
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not support.opset_min <= imp.version <= support.opset_max:
            problems.append(f"opset {imp.version} is outside TensorRT {support.version}'s range {support.opset_min}..{support.opset_max}")
    counts: dict[str, int] = {}
    for n in _nodes(model.graph):
        key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
        counts[key] = counts.get(key, 0) + 1
    for key, c in sorted(counts.items()):
        if "::" in key:
            problems.append(f"{key} ({c} nodes) is not an ONNX operator; TensorRT {support.version} cannot parse it "
                            "(export with the TensorRT lowering, not ONNX Runtime's)")
        elif key not in support.supported:
            why = "is marked unsupported" if key in support.unsupported else "is not in the operator table"
            problems.append(f"{key} ({c} nodes) {why} for TensorRT {support.version} ({support.source})")
    return counts, problems


# ---- Q/DQ patterns ----------------------------------------------------------------------------------


def _dtype_name(elem_type: int) -> str:
    import onnx

    return onnx.TensorProto.DataType.Name(elem_type)


class _Graph:
    def __init__(self, model):
        g = model.graph
        self.init = {t.name: t for t in g.initializer}
        for n in g.node:  # Constant nodes are initializers TensorRT folds at build time
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        self.init[n.output[0]] = a.t
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in g.node:
            for i, name in enumerate(n.input):
                self.consumers.setdefault(name, []).append((n, i))

    def shape(self, name: str) -> tuple[int, ...] | None:
        t = self.init.get(name)
        return tuple(t.dims) if t is not None else None

    def is_zero(self, name: str) -> bool | None:
        """True/False for a zero point initializer; None when its data is external (not loaded)."""
        import numpy as np
        from onnx import numpy_helper

        t = self.init.get(name)
        if t is None:
            return False
        if t.data_location == 1:  # EXTERNAL
            return None
        return bool(np.all(numpy_helper.to_array(t).astype(np.float32) == 0))


def _attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return a.i if a.type == 2 else a.f if a.type == 1 else a.s if a.type == 3 else default
    return default


def _scalar(shape) -> bool:
    return shape is not None and (len(shape) == 0 or (len(shape) == 1 and shape[0] == 1))


def _weight_slot(g: _Graph, out: str) -> tuple[object, int, bool] | None:
    """(gemm node, weight axis of the input channels, transposed) if `out` is a MatMul/Gemm weight input."""
    uses = g.consumers.get(out, [])
    if len(uses) != 1:
        return None
    node, idx = uses[0]
    if node.op_type == "Transpose" and len(g.consumers.get(node.output[0], [])) == 1:
        inner, j = g.consumers[node.output[0]][0]
        if inner.op_type in _GEMMS and j == 1:
            return inner, 1, True  # [N, K] transposed to [K, N]: K is axis 1 of the stored tensor
    if node.op_type == "MatMul" and idx == 1:
        return node, 0, False
    if node.op_type == "Gemm" and idx == 1:
        return node, (1 if _attr(node, "transB", 0) else 0), bool(_attr(node, "transB", 0))
    return None


def _check_weight_dq(g: _Graph, dq, problems: list[str], counts: dict[str, int]) -> None:
    x, scale = dq.input[0], dq.input[1]
    t = g.init[x]
    dtype = _dtype_name(t.data_type)
    where = f"DequantizeLinear {dq.name or dq.output[0]!r}"
    slot = _weight_slot(g, dq.output[0])
    if slot is None:
        problems.append(f"{where} dequantizes weight {x!r} but does not feed a MatMul/Gemm weight input, so TensorRT will not fuse it")
        return
    _gemm, k_axis, _tr = slot
    shape, sshape = tuple(t.dims), g.shape(scale)
    if len(dq.input) > 2 and dq.input[2] and g.is_zero(dq.input[2]) is False:
        problems.append(f"{where}: zero point {dq.input[2]!r} is not zero (TensorRT is symmetric only)")
    block = _attr(dq, "block_size", 0) or 0
    axis = _attr(dq, "axis", 1)
    axis = axis + len(shape) if axis < 0 else axis
    if dtype == "INT4":
        if len(shape) != 2 or block <= 0:
            problems.append(f"{where}: INT4 weight {x!r} {list(shape)} must be 2-D and blocked (block_size > 0); got block_size={block}")
            return
        if axis != k_axis:
            problems.append(f"{where}: INT4 blocks run along axis {axis} but the input channels of the GEMM are axis {k_axis}")
            return
        want = tuple(d // block if i == axis else d for i, d in enumerate(shape))
        if shape[axis] % block or sshape != want:
            problems.append(f"{where}: INT4 scale shape {list(sshape or ())} should be {list(want)} for block_size {block} on {list(shape)}")
            return
        counts["int4_blocked_weight"] = counts.get("int4_blocked_weight", 0) + 1
    elif dtype in ("INT8", "FLOAT8E4M3FN"):
        n_axis = 1 - k_axis if len(shape) == 2 else None
        if block:
            problems.append(f"{where}: {dtype} weight {x!r} is blocked (block_size={block}); TensorRT blocks INT4/FP4 weights, use per-channel scales")
        elif not _scalar(sshape) and not (sshape is not None and len(sshape) == 1 and n_axis is not None and axis == n_axis
                                         and sshape[0] == shape[n_axis]):
            problems.append(f"{where}: {dtype} weight scale {list(sshape or ())} on axis {axis} is neither per-tensor nor per-output-channel")
        else:
            counts[("fp8" if dtype.startswith("FLOAT8") else "int8") + "_weight"] = counts.get(("fp8" if dtype.startswith("FLOAT8") else "int8") + "_weight", 0) + 1
    else:
        problems.append(f"{where}: weight {x!r} is {dtype}; TensorRT quantized weights are INT8, INT4, FP8 (e4m3) or FP4")


def _check_activation_q(g: _Graph, q, problems: list[str], counts: dict[str, int]) -> None:
    where = f"QuantizeLinear {q.name or q.output[0]!r}"
    scale = q.input[1]
    out_dtype = _attr(q, "output_dtype", 0)
    if not out_dtype and len(q.input) > 2 and q.input[2] in g.init:
        out_dtype = g.init[q.input[2]].data_type
    name = _dtype_name(out_dtype) if out_dtype else "UINT8"
    if name not in ("INT8", "FLOAT8E4M3FN"):
        problems.append(f"{where} quantizes an activation to {name}; TensorRT activations quantize to INT8 or FP8 e4m3")
        return
    if not _scalar(g.shape(scale)):
        problems.append(f"{where}: activation scale {scale!r} {list(g.shape(scale) or ['dynamic'])} must be a scalar initializer (per-tensor)")
    if len(q.input) > 2 and q.input[2] and g.is_zero(q.input[2]) is False:
        problems.append(f"{where}: zero point is not zero (TensorRT is symmetric only)")
    uses = g.consumers.get(q.output[0], [])
    if not uses or any(n.op_type != "DequantizeLinear" for n, _ in uses):
        problems.append(f"{where} must feed only DequantizeLinear nodes (explicit Q/DQ pairs); it feeds {sorted({n.op_type for n, _ in uses})}")
        return
    for dq, _ in uses:
        if dq.input[1] != scale and not (_scalar(g.shape(dq.input[1])) and _same_value(g, scale, dq.input[1])):
            problems.append(f"{where}: its DequantizeLinear {dq.name or dq.output[0]!r} uses another scale ({dq.input[1]!r})")
        if not any(n.op_type in _GEMMS for n, _ in g.consumers.get(dq.output[0], [])):
            problems.append(f"{where}: the dequantized activation feeds no MatMul/Gemm, so TensorRT runs the pair as a plain cast")
    counts[("fp8" if name.startswith("FLOAT8") else "int8") + "_activation"] = counts.get(("fp8" if name.startswith("FLOAT8") else "int8") + "_activation", 0) + 1


def _same_value(g: _Graph, a: str, b: str) -> bool:
    import numpy as np
    from onnx import numpy_helper

    ta, tb = g.init.get(a), g.init.get(b)
    if ta is None or tb is None or 1 in (ta.data_location, tb.data_location):
        return False
    return bool(np.array_equal(numpy_helper.to_array(ta), numpy_helper.to_array(tb)))


def check_qdq(model) -> tuple[dict[str, int], list[str]]:
    """(pattern counts, problems) for every QuantizeLinear/DequantizeLinear of the main graph."""
    g = _Graph(model)
    problems: list[str] = []
    counts: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx"):
            if n.input[0] in g.init:
                _check_weight_dq(g, n, problems, counts)
            elif g.producer.get(n.input[0]) is None or g.producer[n.input[0]].op_type != "QuantizeLinear":
                problems.append(f"DequantizeLinear {n.name or n.output[0]!r} dequantizes {n.input[0]!r}, which is neither a weight nor a QuantizeLinear output")
        elif n.op_type == "QuantizeLinear" and n.domain in ("", "ai.onnx"):
            _check_activation_q(g, n, problems, counts)
    return counts, problems


# Element types a TensorRT 10 tensor can have (nvinfer1::DataType; INT64 since 10.0, INT4 weights since 10.0,
# BF16 from SM 8.0, FP8 from SM 8.9): what the ONNX parser can map a graph tensor to.
TENSOR_TYPES = frozenset({"FLOAT", "FLOAT16", "BFLOAT16", "INT64", "INT32", "INT8", "UINT8", "BOOL", "INT4", "FLOAT8E4M3FN",
                          "FLOAT4E2M1"})


def check_dtypes(model) -> tuple[dict[str, int], list[str]]:
    """(element type counts over the graph's inputs, outputs and initializers, problems for types TensorRT lacks)."""
    counts: dict[str, int] = {}
    names: dict[str, str] = {}
    g = model.graph
    typed = [(v.name, v.type.tensor_type.elem_type) for v in list(g.input) + list(g.output)] + [(t.name, t.data_type) for t in g.initializer]
    for name, elem in typed:
        key = _dtype_name(elem)
        counts[key] = counts.get(key, 0) + 1
        names.setdefault(key, name)
    problems = [f"{names[k]} ({counts[k]} tensors of type {k}) has a type TensorRT tensors cannot take" for k in sorted(counts)
                if k not in TENSOR_TYPES]
    return dict(sorted(counts.items())), problems


def check_graph(path, tensorrt_version: str | None = None) -> GraphReport:
    """Both checks on one .onnx file (external weights are not loaded)."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    support = op_support(tensorrt_version)
    ops, p1 = check_ops(model, support)
    quantized, p2 = check_qdq(model)
    dtypes, p3 = check_dtypes(model)
    return GraphReport(path.name, support.version, ops, quantized, tuple(p1 + p2 + p3), dtypes)


def require_tensorrt_graphs(export_dir, target) -> dict[str, dict]:
    """Reports for vision.onnx and decoder.onnx, or `UnsupportedError` naming the first problem."""
    version = (target.software or {}).get("tensorrt")
    reports = {}
    for name in ("vision", "decoder"):
        r = check_graph(Path(export_dir) / f"{name}.onnx", version)
        if r.dtypes.get("BFLOAT16") and "bf16" not in target.precisions:
            raise UnsupportedError(f"{name}.onnx of {export_dir} holds bfloat16 tensors but {target.name} (SM {target.sm_text}) lists no bf16 "
                                   "precision; re-export with --graph-dtype float16.")
        if not r.ok:
            more = f" (and {len(r.problems) - 1} more)" if len(r.problems) > 1 else ""
            raise UnsupportedError(f"{name}.onnx of {export_dir} cannot be built for TensorRT on {target.name}: {r.problems[0]}{more}.")
        reports[name] = r.to_dict()
    return reports
