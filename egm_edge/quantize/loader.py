"""Run a ModelOpt unified HF checkpoint as a PyTorch reference (transformers cannot load it correctly).

Contract: `load_dequantized(model_dir, dtype=torch.float32, activations=True)` builds
the family record's transformers class (`hf_class`; Qwen3VLForConditionalGeneration for
Qwen3-VL, InternVLForConditionalGeneration for InternVL-3) from config.json, for a family the
quantize stage runs, and loads every *.safetensors shard, stored names translated to the
model's by transformers' own save-time renaming (`saved_names`: an InternVL checkpoint stores
`language_model.model.*`, `vision_tower.*`, ... for the model's `model.language_model.*`, ...),
dequantizing quantized Linear weights itself; the format is read from each
tensor (dtype, shape, companion scales), never from file names:
- FP8 e4m3 `weight` * `weight_scale` (per tensor or per output channel);
- INT8 `weight` * per-output-channel `weight_scale` (SmoothQuant);
- INT4 packed uint8 [out/2, in] (two output rows per byte, low nibble first) *
  block scales `weight_scale` [out, in/block]; with `weight_scale_2` (W4A8) the
  dequantized weight is rounded through FP8 at that scale, as ModelOpt's sequential
  weight quantizer does;
- NVFP4 packed uint8 [out, in/2] (e2m1, low nibble first) * FP8 block scales * `weight_scale_2`.
`pre_quant_scale` (AWQ / SmoothQuant smoothing left unfolded) multiplies the
Linear's input; where ModelOpt folded it into the preceding RMSNorm, the norm's
stored weight already carries it. With activations=True, inputs with an
`input_scale` are fake-quantized (FP8 e4m3 or INT8, per tensor) before the
matmul, as the serving engines do, and an FP8 KV cache (`k_proj.k_scale`,
`v_proj.v_scale`) rounds the attention's keys (after RoPE) and values through
FP8 at those scales, as they are stored in the engines' cache. What is NOT
reproduced: NVFP4's dynamic per-block activation quantization (NVFP4 inputs
stay in `dtype`).
"""

from __future__ import annotations

import json
from pathlib import Path

from egm_edge.errors import CheckpointError

FP8_MAX = 448.0
KV_ATTENTION = "egm_fp8_kv"  # attention implementation that rounds K/V through FP8 (registered on first use)
SCALE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale", "k_scale", "v_scale")
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def read_tensors(model_dir: Path) -> dict:
    """Every tensor of every *.safetensors file in `model_dir` (CPU, stored dtype)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"Checkpoint {model_dir} has no *.safetensors weights; re-run egm-edge quantize.")
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def saved_names(model) -> dict[str, str]:
    """Model parameter/buffer name -> the name transformers' `save_pretrained` (and so ModelOpt's export) stores it
    under, from transformers' own save-time renaming; only names that differ. Empty where this transformers
    has no such renaming."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without conversion mappings saves the model's own names
        return {}
    sd = model.state_dict()
    by_id = {id(t): name for name, t in sd.items()}
    out = {}
    for saved, t in revert_weight_conversion(model, dict(sd)).items():
        name = by_id.get(id(t))
        if name is not None and name != saved:
            out[name] = saved
    return out


def to_model_names(tensors: dict, model) -> dict:
    """Stored tensors renamed to `model`'s names (module prefixes as transformers saves them; scales follow their Linear)."""
    modules = {}
    for name, saved in saved_names(model).items():
        modules[saved.rpartition(".")[0]] = name.rpartition(".")[0]
    if not modules:
        return tensors
    out = {}
    for k, v in tensors.items():
        module, _, leaf = k.rpartition(".")
        out[f"{modules[module]}.{leaf}" if module in modules else k] = v
    return out


def fp8_round(x, scale):
    """x rounded through FP8 e4m3 at `scale` (saturating), back in x's dtype."""
    import torch

    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale


def unpack_int4(packed):
    """uint8 [out/2, in] -> int8 [out, in]: byte j of column i holds rows 2j (low nibble) and 2j+1 (high)."""
    import torch

    p = packed.to(torch.int16)
    lo, hi = p & 0x0F, (p >> 4) & 0x0F
    vals = torch.stack([lo, hi], dim=1).reshape(-1, packed.shape[1])
    return torch.where(vals >= 8, vals - 16, vals).to(torch.int8)


def unpack_e2m1(packed):
    """uint8 [out, in/2] -> float32 [out, in]: element 2i in the low nibble, 2i+1 in the high one."""
    import torch

    table = torch.tensor(E2M1 + tuple(-v for v in E2M1), dtype=torch.float32)
    p = packed.to(torch.int64)
    idx = torch.stack([p & 0x0F, (p >> 4) & 0x0F], dim=-1).reshape(packed.shape[0], -1)
    return table[idx]


def dequantize_weight(w, scales: dict):
    """The float32 weight a quantized Linear computes with (see module docstring for formats)."""
    import torch

    ws = scales.get("weight_scale")
    ws2 = scales.get("weight_scale_2")
    if ws is None:
        return w.float()
    if w.dtype == torch.float8_e4m3fn:
        s = ws.float()
        return w.float() * (s.view(-1, 1) if s.dim() == 1 else s)
    if w.dtype == torch.int8:
        return w.float() * ws.float().view(-1, 1)
    if w.dtype == torch.uint8 and ws.dtype == torch.float8_e4m3fn:  # NVFP4
        vals = unpack_e2m1(w)
        block = vals.shape[1] // ws.shape[1]
        return vals * ws.float().repeat_interleave(block, dim=1) * (ws2.float() if ws2 is not None else 1.0)
    if w.dtype == torch.uint8:  # INT4 AWQ
        q = unpack_int4(w).float()
        block = q.shape[1] // ws.shape[1]
        deq = q * ws.float().repeat_interleave(block, dim=1)
        return fp8_round(deq, ws2.float()) if ws2 is not None else deq
    raise CheckpointError(f"Quantized weight of dtype {w.dtype} with scale {tuple(ws.shape)} is not a format this loader knows.")


def fake_quant_input(x, scale, kind: str):
    import torch

    s = scale.to(x.dtype)
    if kind == "fp8":
        return fp8_round(x, s)
    return torch.round(x / s).clamp(-128, 127) * s


def split_checkpoint(tensors: dict) -> tuple[dict, dict]:
    """(plain tensors by key, {linear prefix: {suffix: tensor}} for quantized linears' extras)."""
    plain, extras = {}, {}
    for k, v in tensors.items():
        prefix, _, leaf = k.rpartition(".")
        if leaf in SCALE_SUFFIXES:
            extras.setdefault(prefix, {})[leaf] = v
        else:
            plain[k] = v
    return plain, extras


def _activation_kind(stored_dtype, extras: dict) -> str | None:
    """How this Linear's input is quantized in the serving engine: 'fp8', 'int8', or None."""
    import torch

    if "input_scale" not in extras:
        return None
    if stored_dtype == torch.int8:
        return "int8"
    ws = extras.get("weight_scale")
    if stored_dtype == torch.uint8 and ws is not None and ws.dtype == torch.float8_e4m3fn:
        return None  # NVFP4: dynamic per-block input quantization, not reproduced
    return "fp8"


def load_dequantized(model_dir, dtype=None, *, activations: bool = True):
    """The family's model with dequantized weights (and input fake-quant hooks); eval mode."""
    import torch
    import transformers
    from transformers.initialization import no_init_weights

    from egm_edge.models.families import family_of_config

    dtype = dtype or torch.float32
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path} is missing or not JSON ({e}); pass a quantized checkpoint directory.") from None
    family = family_of_config(raw, str(cfg_path))
    family.require("quantize", f"Checkpoint {model_dir}")
    model_class = getattr(transformers, family.hf_class)
    raw.pop("quantization_config", None)  # built as a plain model; this loader applies the numerics
    config = model_class.config_class.from_dict(raw)
    with no_init_weights():
        model = model_class(config)
    model = model.to(dtype).eval()

    plain, extras = split_checkpoint(to_model_names(read_tensors(model_dir), model))
    state, stored = {}, {}
    for prefix, ex in extras.items():
        wkey = f"{prefix}.weight"
        if wkey in plain and "weight_scale" in ex:
            stored[prefix] = plain[wkey].dtype
            plain[wkey] = dequantize_weight(plain[wkey], ex)
    for k, v in plain.items():
        state[k] = v.to(dtype) if v.is_floating_point() or v.dtype in (torch.uint8, torch.int8) else v
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise CheckpointError(
            f"Checkpoint {model_dir} does not match its config.json (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "re-run egm-edge quantize."
        )
    if config.tie_word_embeddings:
        model.tie_weights()

    modules = dict(model.named_modules())
    if activations:
        _apply_kv_scales(model, modules, extras, dtype)
    for prefix, ex in extras.items():
        mod = modules.get(prefix)
        if not isinstance(mod, torch.nn.Linear):
            continue
        pqs = ex.get("pre_quant_scale")
        kind = _activation_kind(stored.get(prefix), ex) if activations else None
        if pqs is None and kind is None:
            continue
        mod.register_forward_pre_hook(_input_hook(pqs.to(dtype) if pqs is not None else None,
                                                  ex.get("input_scale"), kind))
    return model


def _apply_kv_scales(model, modules: dict, extras: dict, dtype) -> None:
    """Give each text attention with `k_scale`/`v_scale` those scales and the FP8-KV attention function."""
    found = False
    for prefix, ex in extras.items():
        for proj, key in (("k_proj", "k_scale"), ("v_proj", "v_scale")):
            if key in ex and prefix.endswith("." + proj):
                attn = modules[prefix[: -len(proj) - 1]]
                setattr(attn, f"_egm_{key}", ex[key].to(dtype).reshape(()))
                found = True
    if not found:
        return
    from transformers import AttentionInterface

    if KV_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(KV_ATTENTION, _fp8_kv_attention)
    model.config.text_config._attn_implementation = KV_ATTENTION


def _fp8_kv_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    ks, vs = getattr(module, "_egm_k_scale", None), getattr(module, "_egm_v_scale", None)
    if ks is not None:
        key = fp8_round(key, ks.to(key.dtype))
    if vs is not None:
        value = fp8_round(value, vs.to(value.dtype))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _input_hook(pqs, input_scale, kind):
    def hook(module, args):
        x = args[0]
        if pqs is not None:
            x = x * pqs
        if kind is not None:
            x = fake_quant_input(x, input_scale, kind)
        return (x, *args[1:])

    return hook
