"""`egm-edge validate`: candidate vs reference on the same samples, with a gate (see egm_edge.validate).

Exit status: 0 the gate passed (splits under --min-split-n samples are reported,
not gated); 1 a drop exceeded its limit (the split and the size are printed); 2
bad input (missing data file, malformed lines in strict mode, missing images,
different tokenizers, an endpoint that does not answer) or an incomplete run
(samples that failed after retries; rerunning retries only them). `--cluster ADDRESS`
predicts the local sides as Ray tasks (egm_edge.validate.cluster), the same report.
"""

from __future__ import annotations

import argparse
import os

NAME = "validate"
HELP = "Validate a candidate (bundle or endpoint) against a reference (checkpoint, bundle or endpoint): accuracy deltas and a gate."
ORDER = 50


def add_endpoint_kind_argument(p: argparse.ArgumentParser) -> None:
    from egm_edge.validate.endpoint_kinds import KIND_CHOICES

    p.add_argument("--endpoint-kind", choices=KIND_CHOICES, default="auto",
                   help="what serves an http(s) side, and so which field carries the think budget: egm (think_budget, "
                        "budget_mode), trtllm and vllm (thinking_token_budget), sglang (custom_params.thinking_budget, kept "
                        "only under --enable-strict-thinking), openai (none: max_tokens only); auto (default) reads "
                        "/v1/models owned_by and falls back to openai")


def add_cluster_arguments(p: argparse.ArgumentParser, cluster_help: str, shards: bool = True) -> None:
    """--cluster and its options, as sweep, validate and build spell them (egm_edge.sweep.cluster)."""
    p.add_argument("--cluster", metavar="ADDRESS", default=None, help=cluster_help)
    p.add_argument("--cluster-timeout", type=float, default=120.0, metavar="S",
                   help="with --cluster: report units whose target no node offers after S seconds (default 120)")
    p.add_argument("--shared-dir", metavar="DIR", default=None,
                   help="with --cluster: a folder every node sees at the same path; bundles are placed there"
                        + (" and the data's images read where they are (default: both" if shards else " (default:")
                        + " shipped through Ray's object store)")
    if shards:
        p.add_argument("--shard-size", type=int, default=None, metavar="N",
                       help="with --cluster: samples per unit of work (default 16)")


def register(p: argparse.ArgumentParser) -> None:
    from egm_edge.runtime.settings import add_think_budget_argument
    from egm_edge.validate.stats import MIN_GATE_N

    p.add_argument("--candidate", required=True, metavar="BUNDLE|URL", help="bundle directory, checkpoint directory or OpenAI-compatible URL")
    p.add_argument("--reference", required=True, metavar="MODEL_DIR|BUNDLE|URL",
                   help="the full model: checkpoint directory (PyTorch), bundle directory or OpenAI-compatible URL")
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help="grounding samples (EGM eval JSONL or a refer release)")
    p.add_argument("--out", required=True, metavar="DIR", help="report.json, report.md, predictions-*.jsonl, worst-regressions/")
    p.add_argument("--image-root", metavar="DIR", help="folder the data's image paths are relative to")
    p.add_argument("--lenient", action="store_true", help="skip and count malformed records and missing images instead of stopping")
    p.add_argument("--split-by", default="split", metavar="FIELD", help="sample field to group by (default: split)")
    p.add_argument("--max-acc-drop", type=float, default=1.0, metavar="POINTS", help="allowed Acc@0.5 drop in points on any split (default 1.0)")
    p.add_argument("--max-miou-drop", type=float, default=1.0, metavar="POINTS", help="allowed mean-IoU drop in points on any split (default 1.0)")
    p.add_argument("--gate", choices=["significant", "point"], default="significant",
                   help="significant (default): an over-limit drop fails only when its paired bootstrap 95%% CI lies wholly "
                        "below zero, other over-limit drops are reported as held; point: every over-limit drop fails")
    p.add_argument("--min-split-n", type=int, default=MIN_GATE_N, metavar="N",
                   help=f"fewest paired samples a split (or the overall) needs to be gated; smaller ones are reported as too "
                        f"small to gate (default {MIN_GATE_N}: below it the bootstrap calls a split where every sample flipped "
                        "significant though no exact test can; 1 gates every split)")
    add_think_budget_argument(p, "reasoning budget for both sides", "the candidate bundle's, else unlimited")
    p.add_argument("--max-answer-tokens", type=int, default=None, metavar="N", help="cap on answer tokens after the reasoning closes (default: the candidate bundle's, else 128)")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N", help="cap on all output tokens (default 4096, as EGM)")
    p.add_argument("--limit", type=int, default=None, metavar="K", help="validate a seeded subset of K samples")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset and the bootstrap (default 0)")
    p.add_argument("--concurrency", type=int, default=4, metavar="N",
                   help="requests in flight at once: to an endpoint, or rows batched per decode step of a bundle (default 4)")
    p.add_argument("--family", default=None, metavar="NAME",
                   help="model family an endpoint serves (its prompts and answer format; default qwen3_vl); "
                        "bundles and checkpoints say their own")
    p.add_argument("--model-name", metavar="NAME", help="model name to send to endpoints (default: the first of /v1/models)")
    add_endpoint_kind_argument(p)
    add_cluster_arguments(p, "predict the bundle and checkpoint sides as Ray tasks on a running cluster (auto, HOST:PORT "
                             "or ray://HOST:PORT; needs the cluster extra); endpoints are still asked from this process")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S", help="seconds per endpoint request (default 120)")
    p.add_argument("--retries", type=int, default=3, metavar="N", help="retries of a failed endpoint request (default 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--force", action="store_true",
                   help="replace another egm-edge artifact at --out (a validation's own --out is resumed without it)")


def run(args: argparse.Namespace) -> int:
    from egm_edge.runtime.settings import parse_think_budget
    from egm_edge.validate import validate

    budget = parse_think_budget(args.think_budget)  # before any work; None: the candidate's default
    api_key = os.environ.get("EGM_EDGE_API_KEY")
    candidate, reference = (endpoint_side(s, args, api_key) for s in (args.candidate, args.reference))
    report = validate(
        candidate, reference, args.data, out_dir=args.out, split_by=args.split_by, max_acc_drop=args.max_acc_drop,
        max_miou_drop=args.max_miou_drop, think_budget=budget, limit=args.limit, concurrency=args.concurrency,
        seed=args.seed, image_root=args.image_root, strict=not args.lenient, model_name=args.model_name,
        max_answer_tokens=args.max_answer_tokens, max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
        timeout_s=args.timeout, retries=args.retries, api_key=api_key, gate=args.gate,
        min_split_n=args.min_split_n, force=args.force, family=args.family, cluster=args.cluster,
        cluster_timeout=args.cluster_timeout, shared_dir=args.shared_dir, shard_size=args.shard_size,
    )
    print(report.summary())
    return report.exit_code


def endpoint_side(spec: str, args: argparse.Namespace, api_key: str | None):
    """`spec` itself, or, for a URL under an --endpoint-kind other than auto, the endpoint predictor of that kind
    (validate opens auto-detected endpoints itself)."""
    if args.endpoint_kind == "auto" or not str(spec).startswith(("http://", "https://")):
        return spec
    from egm_edge.validate.endpoint import EndpointPredictor

    return EndpointPredictor(spec, model_name=args.model_name, api_key=api_key, timeout_s=args.timeout, retries=args.retries,
                             kind=args.endpoint_kind, **({"family": args.family} if args.family else {}))
