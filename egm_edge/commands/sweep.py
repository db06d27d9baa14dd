"""`egm-edge sweep`: recipe x thinking budget (x target) on a data set, a Pareto plot and a recommendation.

`--model DIR` builds and measures CPU bundles per recipe (other targets predicted);
`--endpoint URL` or `--bundle DIR` sweeps the budgets of something already deployed,
latency measured there (`egm_edge.sweep.deployed`). Rerunning the same command
resumes: finished runs are read from records.jsonl, so changing only
--latency-budget-ms or --memory-budget-gb redraws the plot and recomputes the
recommendation without running a model. `--cluster ADDRESS` runs a --model sweep's
units on a Ray cluster (`egm_edge.sweep.cluster`), the same records as in-process.
"""

from __future__ import annotations

import argparse

NAME = "sweep"
HELP = "Sweep quantization recipes x thinking budgets on data: records, an accuracy-vs-latency Pareto plot and a recommendation."
ORDER = 51


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def register(p: argparse.ArgumentParser) -> None:
    from egm_edge.commands.validate import add_cluster_arguments, add_endpoint_kind_argument

    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", metavar="DIR", help="full-precision Qwen3-VL checkpoint directory: CPU bundles per recipe")
    what.add_argument("--endpoint", metavar="URL", help="an OpenAI-compatible server already running (egm-edge serve, "
                      "TensorRT-LLM, vLLM, SGLang): budgets swept there, latency measured per request; needs --target")
    what.add_argument("--bundle", metavar="DIR", help="a built bundle, swept on this machine as its target (run it where it "
                      "was built); latency measured here")
    p.add_argument("--recipes", type=_list, default=None, metavar="R,R",
                   help="with --model: full (no quantization) and quantize recipes (default full,fp8,int4_awq); auto: AutoQuantize "
                        "at each of --auto-bits, then the smallest that passes the validate gate (auto/auto.md)")
    p.add_argument("--auto-bits", type=_list, default=None, metavar="B,B",
                   help="with --recipes auto: the effective bits tried, fewest first (default 5,6,7,8)")
    p.add_argument("--max-acc-drop", type=float, default=1.0, metavar="P",
                   help="with --recipes auto: the gate's largest Acc@0.5 drop in points (default 1.0)")
    p.add_argument("--max-miou-drop", type=float, default=1.0, metavar="P",
                   help="with --recipes auto: the gate's largest mean IoU drop in points (default 1.0)")
    p.add_argument("--gate", choices=["significant", "point"], default="significant",
                   help="with --recipes auto: validate's gate rule; significant (default) passes an over-limit drop whose 95%% CI "
                        "reaches no change, point fails every over-limit drop")
    # Each budget is parsed by sweep() (runtime.settings.parse_think_budget): a bad one is one sentence, before any work.
    p.add_argument("--budgets", type=_list, default=["0", "16", "32", "64", "128", "none"], metavar="N,N",
                   help="comma-separated thinking budgets, 'none' for unlimited (default 0,16,32,64,128,none)")
    p.add_argument("--target", type=_list, default=None, metavar="T,T",
                   help="with --model: cpu is measured here, others get the planner's predicted latency (default cpu); "
                        "with --endpoint: one name saying what hardware serves it (a target profile or a label)")
    p.add_argument("--label", metavar="NAME", help="with --endpoint/--bundle: the records' and plot line's name "
                   "(default: the served model's name, or the bundle's precision)")
    add_endpoint_kind_argument(p)
    p.add_argument("--model-name", metavar="NAME", help="with --endpoint: model name to send (default: the first of /v1/models)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S", help="with --endpoint: seconds per request (default 120)")
    p.add_argument("--retries", type=int, default=3, metavar="N", help="with --endpoint: retries of a failed request (default 3)")
    # Checked by sweep_deployed against runtime.executors.EXECUTORS (importing it here would slow every --help).
    p.add_argument("--executor", default="auto", metavar="NAME",
                   help="with --bundle: auto (default: TensorRT for GPU bundles, ONNX Runtime for cpu), onnxruntime or tensorrt")
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
    add_cluster_arguments(p, "with --model: run the sweep's units as Ray tasks on a running cluster (auto, HOST:PORT or "
                             "ray://HOST:PORT; needs the cluster extra); targets other than cpu are measured on nodes started "
                             "with --resources '{\"target:NAME\": 1}' (see runtime/README.md)")
    p.add_argument("--target-engine", choices=("tensorrt", "cpu"), default=None,
                   help="with --cluster: what a gpu/jetson target's node measures: tensorrt (default: that target's own "
                        "bundle, built here, its engines compiled on the node if it has none) or cpu (the recipe's CPU "
                        "bundle through ONNX Runtime on the node's CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--force", action="store_true", help="replace another egm-edge artifact at --out (a sweep's own --out is resumed without it)")


def run(args: argparse.Namespace) -> int:
    import os

    from egm_edge.errors import InputError
    from egm_edge.sweep import sweep, sweep_deployed
    from egm_edge.sweep.auto_search import parse_ladder

    if args.endpoint or args.bundle:
        model_only = [o for o, v in (("--recipes", args.recipes), ("--calib", args.calib),
                                     ("--calib-with-reasoning", args.calib_with_reasoning), ("--cluster", args.cluster),
                                     ("--shared-dir", args.shared_dir), ("--shard-size", args.shard_size),
                                     ("--target-engine", args.target_engine), ("--auto-bits", args.auto_bits), ("--gate", args.gate != "significant")) if v]
        if model_only:
            raise InputError(f"{model_only[0]} applies to --model sweeps only; an endpoint or a bundle serves one "
                             "configuration, named with --label.")
        if args.target and len(args.target) != 1:
            raise InputError(f"--target names the one machine that serves {args.endpoint or args.bundle}, got "
                             f"{', '.join(args.target)}; sweep each deployment on its own.")
        result = sweep_deployed(
            args.endpoint or args.bundle, budgets=args.budgets, data=args.data, out_dir=args.out,
            target=(args.target or [None])[0], label=args.label, endpoint_kind=args.endpoint_kind, executor=args.executor,
            model_name=args.model_name, api_key=os.environ.get("EGM_EDGE_API_KEY"), timeout_s=args.timeout,
            retries=args.retries, limit=args.limit, image_root=args.image_root, strict=not args.lenient,
            latency_budget_ms=args.latency_budget_ms, memory_budget_gb=args.memory_budget_gb,
            max_answer_tokens=args.max_answer_tokens, progress=not args.no_progress, say=lambda m: print(m, flush=True),
            force=args.force)
        print(result.summary())
        return 0
    deployed_only = [o for o, v in (("--label", args.label), ("--model-name", args.model_name),
                                    ("--endpoint-kind", args.endpoint_kind != "auto"), ("--executor", args.executor != "auto")) if v]
    if deployed_only:
        raise InputError(f"{deployed_only[0]} applies to --endpoint or --bundle sweeps; a --model sweep names its runs by recipe.")
    if args.target_engine and not args.cluster:
        raise InputError("--target-engine applies to --cluster sweeps only (in this process every target but cpu is "
                         "predicted); add --cluster ADDRESS or leave it out.")
    result = sweep(
        args.model, recipes=args.recipes or ["full", "fp8", "int4_awq"], budgets=args.budgets, targets=args.target or ["cpu"],
        data=args.data, out_dir=args.out,
        limit=args.limit, latency_budget_ms=args.latency_budget_ms, memory_budget_gb=args.memory_budget_gb,
        calibration=args.calib, image_root=args.image_root, strict=not args.lenient, max_answer_tokens=args.max_answer_tokens,
        progress=not args.no_progress, say=lambda m: print(m, flush=True), calib_with_reasoning=args.calib_with_reasoning,
        force=args.force, cluster=args.cluster, cluster_timeout=args.cluster_timeout, shared_dir=args.shared_dir,
        shard_size=args.shard_size, target_engine=args.target_engine or "tensorrt",
        auto_bits=parse_ladder(args.auto_bits) if args.auto_bits is not None else None, max_acc_drop=args.max_acc_drop, max_miou_drop=args.max_miou_drop, gate=args.gate,
    )
    print(result.summary())
    return 0
