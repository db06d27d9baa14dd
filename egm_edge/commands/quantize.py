"""`egm-edge quantize`: ModelOpt PTQ of an EGM checkpoint (a family whose record lists the quantize stage) into a unified HF checkpoint with a fidelity report."""

from __future__ import annotations

import argparse
import json

from egm_edge.quantize.recipes import AUTO_EFFECTIVE_BITS, AUTO_FORMATS, AWQ_ALGORITHMS, KV_CACHE, RECIPES, SERVING_NOTE, VISION_MODES

NAME = "quantize"
HELP = ("Quantize an EGM checkpoint with NVIDIA ModelOpt (fp8, int4_awq, w4a8_awq, int8_sq, nvfp4, or auto: per-layer formats by "
        "AutoQuantize) into a unified HF checkpoint.")
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
    p.add_argument("--awq", metavar="A", default=None,
                   help=f"AWQ variant for INT4 weights: {', '.join(AWQ_ALGORITHMS)} (default: the recipe's: awq_full for int4_awq, awq_lite for w4a8_awq)")
    p.add_argument("--target", metavar="T", default=None,
                   help=f"recipe auto: search the per-layer formats this target runs (of {', '.join(AUTO_FORMATS)}; 16-bit always)")
    p.add_argument("--formats", metavar="F,F", default=None,
                   help=f"recipe auto: the per-layer formats to search instead of the target's, comma-separated ({', '.join(AUTO_FORMATS)})")
    p.add_argument("--effective-bits", default=None, metavar="B|fit",
                   help=f"recipe auto: average bits per language-model Linear weight (4-16, default {AUTO_EFFECTIVE_BITS:g}); "
                        "fit: the most that lets the model fit --target's memory at --think-budget (the planner's figures)")
    p.add_argument("--think-budget", type=int, default=None, metavar="N",
                   help="with --effective-bits fit: the reasoning tokens the plan reserves (default 1024, the build's)")
    p.add_argument("--max-bytes", default=None, metavar="N",
                   help="recipe auto: the largest decoder (language model + lm_head) to write, in bytes (suffixes K, M, G: powers of 1024); "
                        "sets the effective bits")
    p.add_argument("--max-acc-drop", type=float, default=None, metavar="P",
                   help="recipe auto: quantize at each of --auto-bits and keep the fewest bits whose checkpoint passes the validate "
                        "gate against the full model on --data (Acc@0.5 and mean IoU drops of at most P points)")
    p.add_argument("--data", metavar="FILE", default=None, help="with --max-acc-drop: grounding samples the gate is measured on")
    p.add_argument("--limit", type=int, default=None, metavar="K", help="with --max-acc-drop: a seeded subset of K samples")
    p.add_argument("--auto-bits", default=None, metavar="B,B", help="with --max-acc-drop: the effective bits tried (default 5,6,7,8)")
    p.add_argument("--gate", choices=["significant", "point"], default="significant",
                   help="with --max-acc-drop: validate's gate rule; significant (default) passes an over-limit drop whose 95%% CI "
                        "reaches no change, point fails every over-limit drop")
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
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip()) if args.formats else None
    if args.recipe != "auto" and (args.target or formats):
        from egm_edge.errors import InputError

        raise InputError(f"--target and --formats choose recipe auto's per-layer formats and recipe {args.recipe} is one format; "
                         "drop them, or choose --recipe auto.")
    if args.awq is None and (args.recipe == "int4_awq" or args.recipe == "auto" and "int4_awq" in (formats or ("int4_awq",))):
        from egm_edge.quantize.recipes import AWQ_COST_NOTE

        print(AWQ_COST_NOTE, flush=True)
    if args.max_acc_drop is not None or args.data or args.auto_bits:
        return _gated(args, formats)
    args.effective_bits = _effective_bits(args)
    out = quantize(
        args.model, args.recipe, args.calib, args.out,
        kv_cache=args.kv_cache, vision=args.vision, calib_with_reasoning=args.calib_with_reasoning,
        block_size=args.block_size, awq=args.awq, target=args.target, formats=formats, effective_bits=args.effective_bits,
        max_bytes=parse_bytes(args.max_bytes) if args.max_bytes is not None else None,
        force=args.force, cache_dir=args.cache_dir, dtype=args.dtype, fidelity=not args.no_fidelity,
    )
    m = json.loads((out / "manifest.json").read_text())
    if args.json:
        print(json.dumps({k: m.get(k) for k in ("recipe", "quantizers", "auto", "decoder_bytes", "calibration", "fidelity", "timings")},
                         indent=2))
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
    auto = m.get("auto")
    if auto:
        counts = ", ".join(f"{f} {n}" for f, n in auto["summary"]["formats"].items())
        print(f"per-layer formats ({auto['effective_bits_target']:g} effective bits): {counts}; decoder "
              f"{m['decoder_bytes']['quantized'] / 2**20:.2f} MiB = {auto['decoder_fraction']:.0%} of the full model's "
              f"(map: {out / auto['picture']})")
    print(f"calibration: {m['calibration']['calibration']['n']} samples, sha256 {m['calibration']['sha256'][:16]}")
    print(f"wrote {out} ({m['recipe']['name']}, {m['timings']['total_s']:.1f} s)")
    return 0


def _effective_bits(args: argparse.Namespace) -> float | None:
    """--effective-bits as a number; "fit" asks the planner for the most bits that fit --target (said in one line)."""
    from egm_edge.errors import InputError

    if args.think_budget is not None and args.effective_bits != "fit":
        raise InputError("--think-budget sizes the plan of --effective-bits fit; give both, or neither.")
    if args.effective_bits is None:
        return None
    if args.effective_bits != "fit":
        try:
            return float(args.effective_bits)
        except ValueError:
            raise InputError(f"--effective-bits {args.effective_bits!r} must be a number of bits (4-16) or fit.") from None
    if args.recipe != "auto" or not args.target:
        raise InputError("--effective-bits fit sizes recipe auto for a target's memory; give --recipe auto and --target T.")
    from pathlib import Path

    from egm_edge.builder.pipeline import DEFAULT_THINK_BUDGET
    from egm_edge.models import spec_from_config
    from egm_edge.plan import GIB, auto_effective_bits
    from egm_edge.quantize.policy import config_widths
    from egm_edge.quantize.recipes import choose_int4_block
    from egm_edge.targets import load_target

    budget = DEFAULT_THINK_BUDGET if args.think_budget is None else args.think_budget
    spec, target = spec_from_config(Path(args.model)), load_target(args.target)
    block = args.block_size or choose_int4_block("int4_awq", config_widths(json.loads((Path(args.model) / "config.json").read_text())).values())[0]
    bits, room = auto_effective_bits(spec, target, budget, block=block or 128)
    if bits >= 16:
        from egm_edge.errors import UnsupportedError

        raise UnsupportedError(f"{spec.name} fits {target.name} unquantized with a {budget}-token think budget, so --effective-bits fit "
                               "leaves recipe auto nothing to save; build recipe full, or give --effective-bits B for a smaller model.")
    print(f"recipe auto: {bits:g} effective bits is the most that fits {target.name} with a {budget}-token think budget "
          f"({room['other_bytes'] / GIB:.2f} GiB beside the language model's Linear weights, {room['usable_bytes'] / GIB:.2f} GiB "
          "usable; planner's figures)", flush=True)
    return bits


def _gated(args: argparse.Namespace, formats) -> int:
    """--recipe auto --max-acc-drop P --data D: the smallest AutoQuantize checkpoint that passes the gate."""
    from egm_edge.errors import InputError
    from egm_edge.sweep.auto_search import LADDER, parse_ladder, smallest_checkpoint

    if args.recipe != "auto" or args.max_acc_drop is None or not args.data:
        raise InputError("--max-acc-drop, --data and --auto-bits search recipe auto's effective bits against the validate gate; "
                         "give --recipe auto with both --max-acc-drop P and --data FILE.")
    if args.effective_bits is not None or args.max_bytes is not None:
        raise InputError("--max-acc-drop searches the effective bits itself; drop --effective-bits and --max-bytes.")
    ladder = parse_ladder(args.auto_bits) if args.auto_bits else list(LADDER)
    out, result = smallest_checkpoint(args.model, args.calib, args.out, args.data, target=args.target, formats=formats, ladder=ladder,
                                      max_acc_drop=args.max_acc_drop, limit=args.limit, gate=args.gate,
                                      force=args.force, cache_dir=args.cache_dir, dtype=args.dtype, say=lambda m: print(m, flush=True))
    print(result.sentence())
    print(f"wrote {out}")
    return 0


def parse_bytes(text: str) -> int:
    """'1500000', '1.5M', '2G' -> bytes (K, M, G are powers of 1024); one sentence for anything else."""
    from egm_edge.errors import InputError

    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(t[-1:], 1)
    try:
        n = float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        n = -1
    if not n > 0:
        raise InputError(f"--max-bytes {text!r} is not a size; give bytes, or a number with K, M or G (e.g. 1.5M).")
    return int(n)


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
