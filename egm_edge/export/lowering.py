"""Weight lowering: quantized Linear layers of a ModelOpt checkpoint as ONNX Runtime / ONNX quantized ops.

Each quantized Linear of the checkpoint (format read from its tensors, as
`egm_edge.quantize.loader` documents) is swapped, for the duration of the
export, for a `QuantizedLinear` that computes exactly what the dequantizing
reference computes, through three torch custom ops that the exporter
translates to ONNX:
- INT4 AWQ (W4A16, block 128), backend "onnxruntime": `com.microsoft::MatMulNBits`
  (bits 4, zero point 8; accuracy_level 0 = fp32 compute, the default, or 4 = int8
  compute with activations quantized per block: ~2x faster on CPU, not bit-faithful
  to the reference, so validated against a looser threshold); backend "tensorrt":
  a blocked INT4 DequantizeLinear (axis 0 = input channels, block 128) feeding
  MatMul, as TensorRT fuses it. Either way the 4-bit weight is the only copy.
- FP8 (e4m3 weights and per-tensor input scale): QuantizeLinear/DequantizeLinear
  to float8e4m3fn on the input, DequantizeLinear of the e4m3 weight, MatMul.
- INT8 SmoothQuant: the same with int8 (per-output-channel weight scales).
AWQ/SmoothQuant `pre_quant_scale`s left unfolded become a Mul on the input.
W4A8 and NVFP4 have no CPU lowering and are refused with one sentence.
Weights are stored transposed ([in, out]) so no Transpose sits between the
DequantizeLinear and the MatMul.
16-bit graphs (`GRAPH_DTYPES`, TensorRT lowering only): `cast_parameters` casts the model's
parameters and `cast_quantized` the lowered layers' scales, pre-quant scales and biases, so
every DequantizeLinear outputs the graph's dtype (ONNX: its output type is its scale's type)
and feeds a 16-bit MatMul, the form a strongly typed TensorRT network runs as written
("Strongly Typed Networks", TensorRT developer guide: tensor types come from the graph).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from egm_edge.errors import UnsupportedError

INT4_BLOCK = 128  # the default; the block is read from each layer's scales (MatMulNBits takes powers of two >= 16)
INT4_BLOCKS = (16, 32, 64, 128, 256)
LOWERINGS = ("onnxruntime", "tensorrt")
# ONNX Runtime fuses Q/DQ + MatMul into MatMulIntegerToFloat (no float8 kernel) and blocked INT4 DQ +
# MatMul into MatMulNBits with int8 activations: FP8 and TensorRT-bound graphs are run with this
# transformer disabled, so ONNX Runtime computes what the graph says (recorded in the export manifest).
QDQ_FUSION = ("QDQSelectorActionTransformer",)
# The float dtype of an export's graphs (the manifest's graph_dtype); 16-bit ones only for TensorRT.
GRAPH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@torch.library.custom_op("egm_edge::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, k: int, n: int, block: int, bits: int = 4) -> torch.Tensor:
    """x @ W^T for W stored as MatMulNBits does: 4 bits uint8 [n, k/block, block/2], low nibble first, zero
    point 8; 8 bits uint8 [n, k/block, block], zero point 128."""
    return x @ nbits_weight(packed, scales, k, n, block, bits).to(x.dtype).T


def nbits_weight(packed: torch.Tensor, scales: torch.Tensor, k: int, n: int, block: int, bits: int = 4) -> torch.Tensor:
    """The float32 [n, k] weight a MatMulNBits initializer pair holds."""
    if bits == 8:
        u = packed.reshape(n, k).to(torch.float32) - 128
    else:
        u = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(n, k).to(torch.float32) - 8
    return u * scales.reshape(n, -1).to(torch.float32).repeat_interleave(block, dim=1)


@matmul_nbits.register_fake
def _(x, packed, scales, k, n, block, bits=4):
    return x.new_empty(*x.shape[:-1], n)


@torch.library.custom_op("egm_edge::dequantize_blocked", mutates_args=())
def dequantize_blocked(w: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """[in, out] in the scales' dtype from int4 values held in int8 [in, out] and scales [in/block, out] (blocks along inputs)."""
    return w.to(scales.dtype) * scales.repeat_interleave(block, dim=0)


@dequantize_blocked.register_fake
def _(w, scales, block):
    return torch.empty(w.shape, dtype=scales.dtype, device=w.device)


@torch.library.custom_op("egm_edge::fake_quant", mutates_args=())
def fake_quant(x: torch.Tensor, scale: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-tensor quantize-dequantize of an activation, saturating, round half to even (fp8 e4m3 or int8)."""
    s = scale.to(x.dtype)
    if kind == "fp8":
        return (x / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(x.dtype) * s
    return torch.round(x / s).clamp(-128, 127) * s


@fake_quant.register_fake
def _(x, scale, kind):
    return torch.empty_like(x)


@torch.library.custom_op("egm_edge::dequantize", mutates_args=())
def dequantize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[in, out] in the scale's dtype from an fp8/int8 weight [in, out] and a per-tensor or per-output-channel scale."""
    return w.to(scale.dtype) * scale


@dequantize.register_fake
def _(w, scale):
    return torch.empty(w.shape, dtype=scale.dtype, device=w.device)


def _register_matmul_nbits_schema() -> None:
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has("MatMulNBits", "com.microsoft"):
        return
    p, a = OpSchema.FormalParameter, OpSchema.Attribute
    onnx.defs.register_schema(OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[p("A", "T1"), p("B", "T2"), p("scales", "T1")], outputs=[p("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], ""), ("T2", ["tensor(uint8)"], "")],
        attributes=[a(n, OpSchema.AttrType.INT, "") for n in ("K", "N", "bits", "block_size", "accuracy_level")],
    ))


INT4_ACCURACY_LEVELS = (0, 4)


def translation_table(int4_accuracy_level: int = 0) -> dict:
    """`custom_translation_table` for torch.onnx.export: the three ops above as ONNX (Runtime) ops."""
    import onnx
    import onnxscript
    from onnxscript import opset21 as op

    _register_matmul_nbits_schema()
    msft = onnxscript.values.Opset("com.microsoft", 1)

    def t_matmul_nbits(x, packed, scales, k: int, n: int, block: int, bits: int = 4):
        return msft.MatMulNBits(x, packed, scales, K=k, N=n, bits=bits, block_size=block, accuracy_level=int4_accuracy_level)

    def t_fake_quant(x, scale, kind: str):
        dtype = onnx.TensorProto.FLOAT8E4M3FN if kind == "fp8" else onnx.TensorProto.INT8
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, output_dtype=dtype), scale)

    def t_dequantize(w, scale):
        return op.DequantizeLinear(w, scale, axis=1)

    def t_dequantize_blocked(w, scales, block: int):
        # int8 here; pack_int4_weights turns the initializer into INT4 once the graph exists.
        return op.DequantizeLinear(w, scales, axis=0, block_size=block)

    return {
        torch.ops.egm_edge.dequantize_blocked.default: t_dequantize_blocked,
        torch.ops.egm_edge.matmul_nbits.default: t_matmul_nbits,
        torch.ops.egm_edge.fake_quant.default: t_fake_quant,
        torch.ops.egm_edge.dequantize.default: t_dequantize,
    }


@dataclass(frozen=True)
class LinearFormat:
    weights: str  # "int4", "fp8", "int8"
    activations: str | None  # "fp8", "int8" or None


class QuantizedLinear(nn.Module):
    """A Linear whose weight stays quantized in the exported graph (see the module docstring)."""

    def __init__(self, fmt: LinearFormat, in_features: int, out_features: int, tensors: dict, bias=None, block: int = INT4_BLOCK):
        super().__init__()
        self.fmt, self.k, self.n, self.block = fmt, in_features, out_features, block
        self.bits = 8 if fmt.weights == "int8" and "packed" in tensors else 4
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def forward(self, x):
        if "pre_quant_scale" in self._buffers:
            x = x * self.pre_quant_scale
        if self.fmt.activations:
            x = torch.ops.egm_edge.fake_quant(x, self.input_scale, self.fmt.activations)
        if "scales_t" in self._buffers:
            y = x @ torch.ops.egm_edge.dequantize_blocked(self.weight_t, self.scales_t, self.block)
        elif "packed" in self._buffers:
            y = torch.ops.egm_edge.matmul_nbits(x, self.packed, self.scales, self.k, self.n, self.block, self.bits)
        else:
            y = x @ torch.ops.egm_edge.dequantize(self.weight_t, self.weight_scale)
        return y if self.bias is None else y + self.bias


def _format(prefix: str, weight: torch.Tensor, ex: dict) -> LinearFormat:
    ws = ex["weight_scale"]
    if weight.dtype == torch.uint8 and ws.dtype == torch.float8_e4m3fn:
        raise UnsupportedError(f"{prefix} is NVFP4; ONNX export has no NVFP4 lowering (it runs only in TensorRT-LLM on Blackwell); export an fp8, int8_sq or int4_awq checkpoint.")
    if weight.dtype == torch.uint8:
        if "weight_scale_2" in ex or "input_scale" in ex:
            raise UnsupportedError(f"{prefix} is W4A8 AWQ; the CPU export lowers only W4A16 (int4_awq); quantize with int4_awq.")
        return LinearFormat("int4", None)
    if weight.dtype == torch.float8_e4m3fn:
        return LinearFormat("fp8", "fp8" if "input_scale" in ex else None)
    if weight.dtype == torch.int8:
        return LinearFormat("int8", "int8" if "input_scale" in ex else None)
    raise UnsupportedError(f"{prefix} has a quantized weight of dtype {weight.dtype}, which export cannot lower.")


def _lowered(prefix: str, weight: torch.Tensor, ex: dict, linear: nn.Linear, backend: str = "onnxruntime") -> QuantizedLinear:
    from egm_edge.quantize.loader import unpack_int4

    fmt = _format(prefix, weight, ex)
    k, n = linear.in_features, linear.out_features
    t: dict[str, torch.Tensor] = {}
    block = INT4_BLOCK
    if fmt.weights == "int4":
        ws = ex["weight_scale"]
        block = k // ws.shape[-1] if ws.ndim == 2 and ws.shape[-1] else 0
        if block not in INT4_BLOCKS or k % block or tuple(ws.shape) != (n, k // block):
            raise UnsupportedError(
                f"{prefix}: int4 weight scales {tuple(ws.shape)} are not equal blocks over {k} inputs of a size "
                f"MatMulNBits takes ({', '.join(map(str, INT4_BLOCKS))}); quantize with --block-size 128 or 64."
            )
        if backend == "tensorrt":
            t["weight_t"] = unpack_int4(weight).T.contiguous()
            t["scales_t"] = ex["weight_scale"].float().T.contiguous()
        else:
            u = (unpack_int4(weight).to(torch.int16) + 8).to(torch.uint8).reshape(n, k // block, block)
            t["packed"] = (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()
            t["scales"] = ex["weight_scale"].float().reshape(-1).contiguous()
    else:
        t["weight_t"] = weight.T.contiguous()
        ws = ex["weight_scale"].float().reshape(-1)
        t["weight_scale"] = ws[0].reshape(()) if ws.numel() == 1 else ws.contiguous()
    if fmt.activations:
        t["input_scale"] = ex["input_scale"].float().reshape(())
    if ex.get("pre_quant_scale") is not None:
        t["pre_quant_scale"] = ex["pre_quant_scale"].float().reshape(-1)
    return QuantizedLinear(fmt, k, n, t, linear.bias, block).eval()


# Weight-only round-to-nearest for the lm_head (export option; the checkpoint keeps it float): at EGM-2B the
# float32 lm_head (151936 x 2048, tied to the embedding) is 1.24 GB read per decoded token, more than the
# whole int4 body. The embedding Gather keeps the float table (one row read per token).
# mode -> (bits, default block); "MODE:BLOCK" picks another block (a power of two, 16..256): larger blocks
# read fewer scale bytes per token (int4 block 32 -> 128: 39 -> 10 MB at EGM-2B) at some rounding error.
LM_HEAD_MODES = {"float": None, "int8": (8, 128), "int4": (4, 32)}


def parse_lm_head(spec: str) -> tuple[str, int, int] | None:
    """"int4", "int8:64", ... -> (mode, bits, block); "float" -> None; anything else: UnsupportedError."""
    mode, _, block = str(spec).partition(":")
    if mode not in LM_HEAD_MODES:
        raise UnsupportedError(f"Unknown lm_head mode {spec!r}. Choose from: {', '.join(LM_HEAD_MODES)} (int4/int8 may add :BLOCK).")
    if LM_HEAD_MODES[mode] is None:
        if block:
            raise UnsupportedError(f"lm_head mode {spec!r}: a float lm_head has no block size.")
        return None
    bits, default = LM_HEAD_MODES[mode]
    if not block:
        return mode, bits, default
    if not block.isdigit() or int(block) not in INT4_BLOCKS:
        raise UnsupportedError(f"lm_head block {block!r} in {spec!r} is not one MatMulNBits takes; choose from {', '.join(map(str, INT4_BLOCKS))}.")
    return mode, bits, int(block)


def rtn_linear(linear: nn.Linear, mode: str) -> QuantizedLinear:
    """`linear` quantized weight-only, symmetric round-to-nearest per block of inputs, as MatMulNBits stores it
    (`mode` as `parse_lm_head` reads it)."""
    parsed = parse_lm_head(mode)
    if parsed is None:
        raise UnsupportedError(f"lm_head mode {mode!r} is not a quantized one; choose int4 or int8.")
    _, bits, block = parsed
    n, k = linear.out_features, linear.in_features
    if k % block:
        raise UnsupportedError(f"lm_head {mode} needs the hidden size ({k}) to divide by its block of {block}.")
    w = linear.weight.detach().float().reshape(n, k // block, block)
    top = 2 ** (bits - 1) - 1
    scales = (w.abs().amax(-1, keepdim=True) / top).clamp_min(1e-12)
    q = torch.round(w / scales).clamp(-top - 1, top).to(torch.int16) + (top + 1)
    u = q.to(torch.uint8)
    packed = u if bits == 8 else (u[..., 0::2] | (u[..., 1::2] << 4))
    fmt = LinearFormat("int8" if bits == 8 else "int4", None)
    t = {"packed": packed.contiguous(), "scales": scales.reshape(-1).contiguous()}
    return QuantizedLinear(fmt, k, n, t, linear.bias, block).eval()


def dequantized_linear(q: QuantizedLinear) -> nn.Linear:
    """A plain float Linear computing what `q` computes (the reference for a lowered lm_head)."""
    w = nbits_weight(q.packed, q.scales, q.k, q.n, q.block, q.bits)
    out = nn.Linear(q.k, q.n, bias=q.bias is not None)
    with torch.no_grad():
        out.weight.copy_(w)
        if q.bias is not None:
            out.bias.copy_(q.bias)
    return out.eval()


def fused_linear(linears: list[nn.Module]) -> QuantizedLinear | None:
    """One MatMulNBits for Linears that read the same input (q/k/v, gate/up): their output rows stacked, so a
    decode step makes one larger GEMV instead of several small ones (each row's result is unchanged, also
    with int8 compute, whose activation blocks run along the shared input). None when they cannot be:
    not all MatMulNBits of one width, block and bit count, or different AWQ pre_quant_scales."""
    if not linears or not all(isinstance(m, QuantizedLinear) and "packed" in m._buffers for m in linears):
        return None
    a = linears[0]
    if any(m.k != a.k or m.block != a.block or m.bits != a.bits or m.fmt != a.fmt for m in linears):
        return None
    pqs = [m._buffers.get("pre_quant_scale") for m in linears]
    if any((p is None) != (pqs[0] is None) or (p is not None and not torch.equal(p, pqs[0])) for p in pqs):
        return None
    if any((m.bias is None) != (a.bias is None) for m in linears):
        return None
    t = {"packed": torch.cat([m.packed for m in linears]), "scales": torch.cat([m.scales for m in linears])}
    if pqs[0] is not None:
        t["pre_quant_scale"] = pqs[0]
    bias = None if a.bias is None else torch.cat([m.bias.detach() for m in linears])
    return QuantizedLinear(a.fmt, a.k, sum(m.n for m in linears), t, bias, a.block).eval()


def quantized_linears(checkpoint_dir, model: nn.Module, backend: str = "onnxruntime") -> dict[str, QuantizedLinear]:
    """{module path: QuantizedLinear} for every quantized Linear of the checkpoint (empty for a full one)."""
    if backend not in LOWERINGS:
        raise UnsupportedError(f"Unknown export lowering {backend!r}. Choose from: {', '.join(LOWERINGS)}.")
    from egm_edge.quantize.loader import read_tensors, split_checkpoint, to_model_names

    # Names as the model has them: transformers saves some families under other prefixes (InternVL).
    plain, extras = split_checkpoint(to_model_names(read_tensors(checkpoint_dir), model))
    modules = dict(model.named_modules())
    out = {}
    for prefix, ex in sorted(extras.items()):
        mod = modules.get(prefix)
        if "weight_scale" not in ex or not isinstance(mod, nn.Linear) or f"{prefix}.weight" not in plain:
            continue  # k_scale/v_scale describe the KV cache, which stays float32 here
        out[prefix] = _lowered(prefix, plain[f"{prefix}.weight"], ex, mod, backend)
    return out


def pack_int4_weights(model) -> int:
    """Store the int8 weights of blocked DequantizeLinear nodes as INT4 initializers (onnx_ir model); returns how many."""
    import ml_dtypes
    import onnx_ir as ir

    count = 0
    for node in model.graph.all_nodes():
        block = node.attributes.get("block_size")
        if node.op_type != "DequantizeLinear" or block is None or not block.as_int():
            continue
        w = node.inputs[0]
        if w is None or w.const_value is None or w.const_value.dtype != ir.DataType.INT8:
            continue
        w.const_value = ir.Tensor(w.const_value.numpy().astype(ml_dtypes.int4), name=w.name)
        w.dtype = ir.DataType.INT4
        count += 1
    return count


_FLOAT_BUFFERS = ("scales_t", "weight_scale", "input_scale", "pre_quant_scale")


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Every parameter of `model` to `dtype`, in place; buffers keep theirs (the rotary inv_freq stays float32,
    so positions past 2048 keep exact angles, which fp16 could not hold)."""
    for p in model.parameters():
        p.data = p.data.to(dtype)


def cast_quantized(replacements: dict[str, QuantizedLinear], dtype: torch.dtype) -> None:
    """The float tensors of lowered layers to `dtype` (scales, pre-quant scales, bias); the quantized weights keep
    theirs. The DQ scale then rounds to the graph's dtype: in a 16-bit network TensorRT dequantizes to that dtype too."""
    for q in replacements.values():
        for name in _FLOAT_BUFFERS:
            if name in q._buffers:
                q._buffers[name] = q._buffers[name].to(dtype)
        if q.bias is not None:
            q.bias.data = q.bias.data.to(dtype)


@contextlib.contextmanager
def swapped(model: nn.Module, replacements: dict[str, nn.Module]):
    """Temporarily replace submodules by path; the originals (with their hooks) come back afterwards."""
    saved = []
    try:
        for path, new in replacements.items():
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            saved.append((parent, name, getattr(parent, name)))
            setattr(parent, name, new)
        yield model
    finally:
        for parent, name, old in reversed(saved):
            setattr(parent, name, old)


def summary(replacements: dict[str, QuantizedLinear]) -> dict[str, int]:
    """How many Linear layers each lowering got: {"int4/MatMulNBits": n, "fp8/QDQ": n, ...}."""
    names = {"int4": "int4/MatMulNBits", "fp8": "fp8/QDQ", "int8": "int8/QDQ"}
    out: dict[str, int] = {}
    for q in replacements.values():
        name = "int4/blocked-DQ" if "scales_t" in q._buffers else names[q.fmt.weights]
        if q.fmt.weights == "int8" and "packed" in q._buffers:
            name = "int8/MatMulNBits"
        key = name + ("" if q.fmt.activations else " weight-only")
        out[key] = out.get(key, 0) + 1
    return out
