"""`egm-edge quantize`: ModelOpt PTQ of an EGM checkpoint (a family whose record lists the quantize stage) into a unified HF checkpoint with a fidelity report."""

from __future__ import annotations

import argparse
import json

from egm_edge.quantize.recipes import KV_CACHE, RECIPES, SERVING_NOTE, VISION_MODES

NAME = "quantize"
HELP = "Quantize an EGM checkpoint with NVIDIA ModelOpt (fp8, int4_awq, w4a8_awq, int8_sq, nvfp4) into a unified HF checkpoint."
ORDER = 20


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="full-precision Hugging Face checkpoint directory")
    # No argparse choices: an unknown recipe gets the project's one-sentence error listing the valid ones.
    p.add_argument("--recipe", required=True, metavar="R",
                   help=f"quantization recipe: {', '.join(RECIPES)}. {SERVING_NOTE}.")
    p.add_argument("--calib", required=True, metavar="TOML", help="calibration recipe: a TOML file, or a shipped recipe by name (synth, coco128, refcoco, egm_jsonl)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must be new or empty unless --force)")
    p.add_argument("--kv-cache", metavar="KV", default=None, help=f"quantize the KV cache too: {', '.join(KV_CACHE)}")
    p.add_argument("--vision", metavar="V", default="16bit", help=f"vision tower policy: {', '.join(VISION_MODES)} (default 16bit)")
    p.add_argument("--calib-with-reasoning", action="store_true",
                   help="calibrate on prompt + the full model's own reasoning and answer (slower, closer to decoding)")
    p.add_argument("--block-size", type=int, default=None, metavar="N",
                   help="INT4 weight block (int4_awq, w4a8_awq): 128 or 64 (default: the largest of 128, 64 that divides every layer width)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--cache-dir", metavar="DIR", default=None, help="where calibration sets are materialised (default ~/.cache/egm-edge)")
    p.add_argument("--dtype", default="auto", help="dtype the model is loaded and calibrated in: auto (the checkpoint's), float32, bfloat16, float16")
    p.add_argument("--no-fidelity", action="store_true", help="skip the fidelity report (weight SNR, logit agreement)")
    p.add_argument("--json", action="store_true", help="print the manifest's census, fidelity and timings as JSON")


def run(args: argparse.Namespace) -> int:
    from egm_edge.quantize.api import quantize

    note = _int4_block_note(args)
    if note:
        print(note, flush=True)
    out = quantize(
        args.model, args.recipe, args.calib, args.out,
        kv_cache=args.kv_cache, vision=args.vision, calib_with_reasoning=args.calib_with_reasoning,
        block_size=args.block_size, force=args.force, cache_dir=args.cache_dir, dtype=args.dtype, fidelity=not args.no_fidelity,
    )
    m = json.loads((out / "manifest.json").read_text())
    if args.json:
        print(json.dumps({k: m.get(k) for k in ("recipe", "quantizers", "calibration", "fidelity", "timings")}, indent=2))
        return 0
    census = m["quantizers"]["enabled"]
    groups = ", ".join(f"{g} {sum(census[g].values())}" for g in ("language_model", "vision", "lm_head", "kv_cache"))
    print(f"quantizers enabled: {groups}")
    fid = m.get("fidelity") or {}
    if (fid.get("weights") or {}).get("layers"):
        w = fid["weights"]
        print(f"weight SNR: min {w['snr_db_min']:.1f} dB, median {w['snr_db_median']:.1f} dB over {w['layers']} layers")
    if (fid.get("logits") or {}).get("positions"):
        lg = fid["logits"]
        print(f"held-out logits: cosine {lg['logit_cosine_mean']:.4f} (min {lg['logit_cosine_min']:.4f}), top-1 agreement {lg['top1_agreement']:.1%}")
    print(f"calibration: {m['calibration']['calibration']['n']} samples, sha256 {m['calibration']['sha256'][:16]}")
    print(f"wrote {out} ({m['recipe']['name']}, {m['timings']['total_s']:.1f} s)")
    return 0


def _int4_block_note(args: argparse.Namespace) -> str | None:
    """The sentence saying which INT4 block quantize() picks when --block-size is not given (the same
    `choose_int4_block` it calls); None otherwise, or when config.json is unreadable (quantize says why)."""
    from pathlib import Path

    from egm_edge.quantize.policy import config_widths
    from egm_edge.quantize.recipes import choose_int4_block

    try:
        cfg = json.loads((Path(args.model) / "config.json").read_text())
        return choose_int4_block(args.recipe, config_widths(cfg).values(), args.block_size)[1]
    except (OSError, ValueError, TypeError, AttributeError):
        return None
