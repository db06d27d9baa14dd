"""`egm-edge build`: turn an export (ONNX IR) into a deployable bundle for a target.

The cpu target lands with the export stage: ONNX Runtime graph optimisations
applied and saved, tokenizer, image-processor and generation config, a manifest,
and a smoke grounding before the directory is renamed into place.
"""

from __future__ import annotations

import argparse

NAME = "build"
HELP = "Build a deployable bundle for a target from an export (cpu: ONNX Runtime)."
ORDER = 40

TARGETS = ("cpu",)


def _budget(v: str):
    if v.lower() in ("none", "unlimited"):
        return None
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a think budget is a whole number or 'none', not {v!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"a think budget cannot be negative, got {n}")
    return n


def register(p: argparse.ArgumentParser) -> None:
    from egm_edge.runtime.budget import MODES

    p.add_argument("--target", required=True, choices=TARGETS, help="target device profile")
    p.add_argument("--export", required=True, metavar="DIR", help="output directory of `egm-edge export`")
    p.add_argument("--out", required=True, metavar="DIR", help="bundle directory to write")
    p.add_argument("--think-budget", type=_budget, default=None, metavar="N|none",
                   help="default reasoning budget stored in the bundle (default: none = unlimited)")
    p.add_argument("--budget-mode", choices=MODES, default="hard", help="default way to close a spent budget")
    p.add_argument("--max-answer-tokens", type=int, default=128, metavar="N", help="cap on tokens after </think>")
    p.add_argument("--max-seq-len", type=int, default=4096, metavar="N",
                   help="planned maximum of prompt + image + output tokens (default: 4096)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out")


def run(args: argparse.Namespace) -> int:
    from egm_edge.build import build_cpu

    out = build_cpu(args.export, args.out, think_budget=args.think_budget, budget_mode=args.budget_mode,
                    max_answer_tokens=args.max_answer_tokens, max_seq_len=args.max_seq_len, force=args.force,
                    progress=lambda m: print(f"[build] {m}", flush=True))
    print(f"bundle: {out}")
    return 0
