"""`egm-edge sweep`: recipe x thinking budget (x target) on a data set, a Pareto plot and a recommendation.

Rerunning the same command resumes: finished runs are read from records.jsonl,
so changing only --latency-budget-ms or --memory-budget-gb redraws the plot and
recomputes the recommendation without running a model.
"""

from __future__ import annotations

import argparse

NAME = "sweep"
HELP = "Sweep quantization recipes x thinking budgets on data: records, an accuracy-vs-latency Pareto plot and a recommendation."
ORDER = 51


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="full-precision Qwen3-VL checkpoint directory")
    p.add_argument("--recipes", type=_list, default=["full", "fp8", "int4_awq"], metavar="R,R",
                   help="comma-separated: full (no quantization) and quantize recipes (default full,fp8,int4_awq)")
    # Each budget is parsed by sweep() (runtime.settings.parse_think_budget): a bad one is one sentence, before any work.
    p.add_argument("--budgets", type=_list, default=["0", "16", "32", "64", "128", "none"], metavar="N,N",
                   help="comma-separated thinking budgets, 'none' for unlimited (default 0,16,32,64,128,none)")
    p.add_argument("--target", type=_list, default=["cpu"], metavar="T,T",
                   help="targets: cpu is measured here, others get the planner's predicted latency (default cpu)")
    p.add_argument("--data", required=True, metavar="FILE", help="grounding samples (EGM eval JSONL or a refer release)")
    p.add_argument("--out", required=True, metavar="DIR", help="records.jsonl, report.md, summary.json, pareto-<target>.png, bundles/")
    p.add_argument("--image-root", metavar="DIR", help="folder the data's image paths are relative to")
    p.add_argument("--lenient", action="store_true", help="skip and count malformed records and missing images instead of stopping")
    p.add_argument("--limit", type=int, default=None, metavar="K", help="a seeded subset of K samples")
    p.add_argument("--latency-budget-ms", type=float, default=None, metavar="X", help="recommend only configurations at most this slow")
    p.add_argument("--memory-budget-gb", type=float, default=None, metavar="X", help="recommend only configurations predicted to fit this memory")
    p.add_argument("--calib", metavar="TOML", default=None, help="calibration recipe for quantized recipes (default calibration/synth.toml)")
    p.add_argument("--calib-with-reasoning", action="store_true",
                   help="calibrate quantized recipes on the full model's own reasoning (quantize --calib-with-reasoning)")
    p.add_argument("--max-answer-tokens", type=int, default=128, metavar="N", help="cap on answer tokens after the reasoning closes (default 128)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--force", action="store_true", help="replace another egm-edge artifact at --out (a sweep's own --out is resumed without it)")


def run(args: argparse.Namespace) -> int:
    from egm_edge.sweep import sweep

    result = sweep(
        args.model, recipes=args.recipes, budgets=args.budgets, targets=args.target, data=args.data, out_dir=args.out,
        limit=args.limit, latency_budget_ms=args.latency_budget_ms, memory_budget_gb=args.memory_budget_gb,
        calibration=args.calib, image_root=args.image_root, strict=not args.lenient, max_answer_tokens=args.max_answer_tokens,
        progress=not args.no_progress, say=lambda m: print(m, flush=True), calib_with_reasoning=args.calib_with_reasoning,
        force=args.force,
    )
    print(result.summary())
    return 0
