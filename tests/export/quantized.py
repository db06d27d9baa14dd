"""Write ModelOpt-format quantized copies of a tiny checkpoint (the tensor layout egm_edge.quantize.loader reads).

Round-to-nearest quantization of the language model's Linear layers, no calibration:
what matters here is the checkpoint format and that export lowers it faithfully.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUANT_ALGO = {"int4_awq": "W4A16_AWQ", "fp8": "FP8", "int8_sq": "W8A8_SQ_PER_CHANNEL", "w4a8_awq": "W4A8_AWQ"}


def _int4(w, torch):
    out, k = w.shape
    blocks = w.reshape(out, k // 128, 128)
    scale = blocks.abs().amax(-1).clamp(min=1e-8) / 7
    q = torch.round(blocks / scale[..., None]).clamp(-8, 7).to(torch.int16).reshape(out, k)
    nib = q & 0x0F
    packed = (nib[0::2] | (nib[1::2] << 4)).to(torch.uint8)  # two output rows per byte, low nibble first
    return packed, scale.to(torch.bfloat16)


def write_quantized(src: Path, dst: Path, precision: str, seed: int = 0) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(seed)
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    out = dict(tensors)
    for key, w in tensors.items():
        prefix = key[: -len(".weight")]
        if not (key.endswith(".weight") and "language_model" in key and prefix.rsplit(".", 1)[-1] in LINEARS):
            continue
        w = w.float()
        in_scale = torch.tensor(0.02 + 0.02 * torch.rand((), generator=gen).item())
        if precision in ("int4_awq", "w4a8_awq"):
            out[key], out[f"{prefix}.weight_scale"] = _int4(w, torch)
            if prefix.endswith(("o_proj", "down_proj")):  # AWQ smoothing left unfolded
                out[f"{prefix}.pre_quant_scale"] = (0.5 + torch.rand(w.shape[1], generator=gen)).to(torch.bfloat16)
            if precision == "w4a8_awq":
                out[f"{prefix}.weight_scale_2"] = torch.tensor(0.01)
                out[f"{prefix}.input_scale"] = in_scale
        elif precision == "fp8":
            s = w.abs().max() / 448
            out[key] = (w / s).to(torch.float8_e4m3fn)
            out[f"{prefix}.weight_scale"], out[f"{prefix}.input_scale"] = s.reshape(()), in_scale
        elif precision == "int8_sq":
            s = w.abs().amax(1).clamp(min=1e-8) / 127
            out[key] = torch.round(w / s[:, None]).clamp(-128, 127).to(torch.int8)
            out[f"{prefix}.weight_scale"], out[f"{prefix}.input_scale"] = s, in_scale
            out[f"{prefix}.pre_quant_scale"] = 0.5 + torch.rand(w.shape[1], generator=gen)
        else:
            raise ValueError(precision)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    quant = {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": QUANT_ALGO[precision], "kv_cache_quant_algo": None}}
    if precision in ("int4_awq", "w4a8_awq"):
        quant["quantization"]["group_size"] = 128
    (dst / "hf_quant_config.json").write_text(json.dumps(quant, indent=2))
    return dst
