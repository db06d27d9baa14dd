"""`egm-edge demo`: quantize, export, build, ground, validate and sweep the embedded tiny grounder (see egm_edge.demo)."""

from __future__ import annotations

import argparse

NAME = "demo"
HELP = "Run the whole pipeline on the embedded tiny grounder: quantize, export, build (cpu), ground, validate, sweep."
ORDER = 0


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory; a rerun into the demo's own resumes it (default: ~/.cache/egm-edge/demo, "
                        "or $XDG_CACHE_HOME/egm-edge/demo, or $EGM_EDGE_CACHE/demo when set)")
    p.add_argument("--model", metavar="DIR", default=None, help="Qwen3-VL checkpoint (default: the embedded tiny grounder)")
    p.add_argument("--n", type=int, default=24, help="synthetic samples to evaluate on (default: 24)")
    p.add_argument("--no-fp8", action="store_true", help="skip the fp8 recipe (measured through PyTorch on a CPU)")
    p.add_argument("--latency-budget-ms", type=float, default=None, help="recommend the most accurate config under this latency")
    p.add_argument("--force", action="store_true", help="replace another egm-edge artifact at --out (never other files)")


def run(args: argparse.Namespace) -> int:
    from egm_edge.demo import default_out_dir, run_demo
    from egm_edge.errors import InputError

    if args.n < 1:
        raise InputError(f"--n must be at least 1, got {args.n}.")
    out = args.out or default_out_dir()
    res = run_demo(out, model=args.model, n=args.n, include_fp8=not args.no_fp8, latency_budget_ms=args.latency_budget_ms,
                   force=args.force)
    print()
    print(res.sweep_summary)
    print()
    for recipe, v in res.validations.items():
        print(f"validation {recipe}: {v['verdict']} -> {v['report']}")
    print(f"grounded images: {res.out_dir / 'grounded'}")
    print(f"demo finished in {res.seconds:.0f} s; everything is under {res.out_dir}")
    return 0
