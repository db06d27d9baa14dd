"""Fidelity of a quantized checkpoint against the full model: weight SNR per layer, logit cosine and top-1 agreement.

Contract:
- `weight_snr(full_dir, quant_dir)`: for every quantized Linear, the SNR in dB of
  the weight the checkpoint computes with (dequantized, times its input smoothing:
  `pre_quant_scale`, or the ratio of the preceding RMSNorm's stored weight to the
  full model's where ModelOpt folded the smoothing into it) against the full
  model's weight. SNR = 10 log10(|W|^2 / |W - W_q|^2).
- `reference_logits(model, items, ...)` records the full model's logits on
  held-out calibration-style samples (the text positions after the image, at
  most the last `positions`), so the
  full model need not stay in memory; `logit_agreement(model, items, ref)` gives
  cosine (mean, min) and top-1 agreement of another model on the same positions.
- `write_report(out_dir, report)` writes fidelity.json (machines), fidelity.md and,
  where matplotlib is installed, fidelity.png (weight SNR per layer).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

# Which RMSNorm feeds each Linear of a Qwen3-VL text layer (where ModelOpt folds AWQ/SmoothQuant scales).
_NORM_OF = {
    "self_attn.q_proj": "input_layernorm",
    "self_attn.k_proj": "input_layernorm",
    "self_attn.v_proj": "input_layernorm",
    "mlp.gate_proj": "post_attention_layernorm",
    "mlp.up_proj": "post_attention_layernorm",
}


def snr_db(ref, approx) -> float:
    err = float((ref.double() - approx.double()).pow(2).sum())
    sig = float(ref.double().pow(2).sum())
    return math.inf if err == 0 else 10.0 * math.log10(sig / err)


def _folded_norm(prefix: str) -> str | None:
    for tail, norm in _NORM_OF.items():
        if prefix.endswith("." + tail):
            return prefix[: -len(tail)] + norm + ".weight"
    return None


def weight_snr(full_dir: Path, quant_dir: Path) -> dict[str, float]:
    """SNR (dB) per quantized Linear (see module docstring), by module name."""
    import torch

    from egm_edge.quantize.loader import dequantize_weight, read_tensors, split_checkpoint

    full = read_tensors(full_dir)
    plain, extras = split_checkpoint(read_tensors(quant_dir))
    out = {}
    for prefix, ex in sorted(extras.items()):
        wkey = f"{prefix}.weight"
        if "weight_scale" not in ex or wkey not in full:
            continue
        w_eff = dequantize_weight(plain[wkey], ex)
        if "pre_quant_scale" in ex:
            w_eff = w_eff * ex["pre_quant_scale"].float().view(1, -1)
        else:
            norm = _folded_norm(prefix)
            if norm and norm in plain and norm in full:
                ref = full[norm].float()
                ratio = torch.where(ref != 0, plain[norm].float() / ref, torch.ones_like(ref))
                w_eff = w_eff * ratio.view(1, -1)
        out[prefix] = snr_db(full[wkey].float(), w_eff)
    return out


def reference_logits(model, items: Sequence[Any], image_token_id: int, positions: int = 64) -> list:
    """Full-model logits (float32, CPU) at the last `positions` positions of each held-out item."""
    import torch

    from egm_edge.quantize.calibset import model_inputs

    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    out = []
    with torch.inference_mode():
        for it in items:
            out.append(model(**model_inputs(it, image_token_id, dev, dtype), logits_to_keep=text_positions(it, image_token_id, positions))
                       .logits[0].float().cpu())
    return out


def text_positions(item, image_token_id: int, cap: int) -> int:
    """How many final positions to compare: the text after the image (the logits that pick tokens), at most `cap`."""
    import numpy as np

    ids = np.asarray(item.input_ids)
    img = np.flatnonzero(ids == image_token_id)
    after = len(ids) - (int(img[-1]) + 1 if len(img) else 0)
    return max(1, min(cap, after))


def logit_agreement(model, items: Sequence[Any], reference: Sequence[Any], image_token_id: int, positions: int = 64) -> dict[str, Any]:
    """Cosine (mean, min over positions) and top-1 agreement of `model` with the reference logits."""
    import torch

    got = reference_logits(model, items, image_token_id, positions)
    cos, agree, n = [], 0, 0
    for a, b in zip(got, reference):
        cos.append(torch.nn.functional.cosine_similarity(a, b, dim=-1))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += a.shape[0]
    if not n:
        return {"samples": 0}
    allc = torch.cat(cos)
    return {
        "samples": len(got),
        "positions": n,
        "logit_cosine_mean": float(allc.mean()),
        "logit_cosine_min": float(allc.min()),
        "top1_agreement": agree / n,
    }


def summarize_snr(snr: dict[str, float]) -> dict[str, Any]:
    if not snr:
        return {"layers": 0}
    vals = sorted(snr.values())
    finite = [v for v in vals if math.isfinite(v)]
    worst = min(snr, key=snr.get)
    return {
        "layers": len(vals),
        "snr_db_min": vals[0],
        "snr_db_median": vals[len(vals) // 2],
        "snr_db_mean": (sum(finite) / len(finite)) if finite else math.inf,
        "worst_layer": worst,
    }


def write_report(out_dir: Path, report: dict[str, Any], family=None) -> None:
    """fidelity.json, fidelity.md and fidelity.png; `family` (a name or record) shortens the plot's layer names."""
    out_dir = Path(out_dir)
    (out_dir / "fidelity.json").write_text(json.dumps(json_safe(report), indent=2) + "\n")
    lines = [f"# Fidelity of {report.get('recipe', 'the quantized checkpoint')} vs the full model", ""]
    logits = report.get("logits") or {}
    if logits.get("positions"):
        lines += [
            f"- held-out samples: {logits['samples']} ({logits['positions']} positions)",
            f"- logit cosine: mean {logits['logit_cosine_mean']:.5f}, min {logits['logit_cosine_min']:.5f}",
            f"- top-1 token agreement: {100 * logits['top1_agreement']:.1f}%",
        ]
    s = report.get("weights") or {}
    if s.get("layers"):
        lines += [f"- weight SNR over {s['layers']} quantized layers: min {s['snr_db_min']:.1f} dB "
                  f"({s['worst_layer']}), median {s['snr_db_median']:.1f} dB", ""]
        lines += ["| layer | SNR (dB) |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in sorted((report.get("weight_snr_db") or {}).items())]
    (out_dir / "fidelity.md").write_text("\n".join(lines) + "\n")
    plot_snr(out_dir / "fidelity.png", report, family)


def _short_name(name: str, family) -> str:
    """A layer name without its family's language-model prefix; vision layers keep "visual." in front."""
    if family is None:
        return name
    from egm_edge.models.families import get_family

    fam = get_family(family)
    if name.startswith(fam.language_prefix):
        return name[len(fam.language_prefix):]
    for prefix in fam.vision_prefixes:
        if name.startswith(prefix):
            return "visual." + name[len(prefix):]
    return name


def plot_snr(path: Path, report: dict[str, Any], family=None) -> bool:
    """Weight SNR per quantized layer as a bar chart; False (and nothing written) without matplotlib."""
    snr = {k: v for k, v in (report.get("weight_snr_db") or {}).items() if math.isfinite(v)}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not snr:
        return False
    names = list(snr)
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(names)), 3.6))
    ax.bar(range(len(names)), [snr[n] for n in names], color="#4c72b0")
    ax.set_xticks(range(len(names)), [_short_name(n, family) for n in names],
                  rotation=90, fontsize=6)
    ax.set_ylabel("weight SNR (dB)")
    lg = report.get("logits") or {}
    extra = f"; logit cosine {lg['logit_cosine_mean']:.4f}, top-1 {100 * lg['top1_agreement']:.1f}%" if lg.get("positions") else ""
    ax.set_title(f"{report.get('recipe', '')}{extra}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def json_safe(v):
    """Infinite SNRs (bit-exact layers) become the string "inf": JSON has no infinity."""
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else "-inf" if v < 0 else "nan"
    return v
