"""`egm-edge build`: turn an export (ONNX IR) or a checkpoint into a deployable bundle for a target.

Three ways in, exactly one per call:
- `--export DIR --target T`: the build stage alone. cpu: ONNX Runtime graph
  optimisations applied and saved, tokenizer, image-processor and generation
  config, a manifest, and a smoke grounding before the directory is renamed into
  place. gpu/jetson targets: the ONNX IR and a TensorRT build plan (see
  egm_edge.builder.tensorrt), plus a TensorRT-LLM serving config on datacenter GPUs.
- `--model DIR --recipe R --target T [--calib TOML]`: quantize -> export -> build
  in one go (egm_edge.builder.pipeline), stages reused, impossible combinations
  refused before any work.
- `--finalize BUNDLE`: on the device, compile the bundle's TensorRT engines.
With `--cluster ADDRESS`, a gpu/jetson bundle (built here, or given to --finalize) is
finalized as a Ray task on a node offering `target:<its target>` (egm_edge.builder.remote):
the engines stay on that device, this process prints the node and where they lie.
"""

from __future__ import annotations

import argparse

NAME = "build"
HELP = "Build a deployable bundle for a target (from an export, or from a checkpoint in one go); --finalize compiles TensorRT engines on the device."
ORDER = 40


def register(p: argparse.ArgumentParser) -> None:
    from egm_edge.quantize.recipes import KV_CACHE, RECIPES
    from egm_edge.runtime.settings import MODES, add_think_budget_argument
    from egm_edge.targets import list_targets

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--export", metavar="DIR", help="output directory of `egm-edge export` (the build stage alone)")
    src.add_argument("--model", metavar="DIR", help="Hugging Face checkpoint: quantize, export and build in one go")
    src.add_argument("--finalize", metavar="BUNDLE", help="compile a gpu/jetson bundle's TensorRT engines on this device")
    # No argparse choices for names: unknown ones get the project's one-sentence error listing the valid ones.
    p.add_argument("--target", metavar="T", help=f"target profile name or .toml file; shipped: {', '.join(list_targets())}")
    p.add_argument("--out", metavar="DIR", help="bundle directory to write")
    p.add_argument("--recipe", metavar="R", default=None, help=f"with --model: full (no quantization) or {', '.join(RECIPES)}")
    p.add_argument("--calib", metavar="TOML", default=None, help="with --model: calibration recipe, a TOML file or a shipped recipe by name (synth, coco128, refcoco, egm_jsonl)")
    p.add_argument("--kv-cache", metavar="KV", default=None, help=f"with --model: quantize the KV cache too: {', '.join(KV_CACHE)}")
    p.add_argument("--block-size", type=int, default=None, metavar="N",
                   help="with --model and int4_awq or w4a8_awq: INT4 weight block 128 or 64 (default: the largest of 128, 64 "
                        "that divides every layer width)")
    p.add_argument("--effective-bits", type=float, default=None, metavar="B",
                   help="with --model and --recipe auto: AutoQuantize's average bits per language-model Linear weight (default 6) "
                        "over the formats the target runs")
    p.add_argument("--image", default=None, metavar="WxH", help="largest image size the plan budgets for (default 640x480)")
    p.add_argument("--work-dir", metavar="DIR", default=None, help="with --model: where stage outputs go (default: <out>-stages)")
    p.add_argument("--max-batch-size", type=int, default=8, metavar="N", help="TensorRT-LLM serving batch (datacenter targets)")
    add_think_budget_argument(p, "reasoning budget the bundle is planned for and defaults to; none with --model or a "
                                 "gpu/jetson target plans for all the model's context window holds and says how many tokens that is",
                              "none for --export on cpu, else 1024")
    p.add_argument("--budget-mode", choices=MODES, default="hard", help="default way to close a spent budget")
    p.add_argument("--max-answer-tokens", type=int, default=None, metavar="N", help="cap on answer tokens after the reasoning closes (default 128 on cpu)")
    p.add_argument("--max-seq-len", type=int, default=4096, metavar="N",
                   help="--export cpu: planned maximum of prompt + image + output tokens (default: 4096)")
    p.add_argument("--vision-int8", action="store_true",
                   help="cpu target: run the vision tower in ONNX Runtime dynamic int8 (faster image encoding; its "
                        "fidelity against float32 goes into the manifest)")
    p.add_argument("--prefill-int8", action="store_true",
                   help="cpu target: add a prompt graph with dynamic int8 Linear layers (faster prefill; costs an int8 "
                        "copy of the language model; its logit agreement goes into the manifest)")
    from egm_edge.commands.validate import add_cluster_arguments

    add_cluster_arguments(p, "gpu/jetson targets: after the bundle is built here (or for --finalize BUNDLE), compile its "
                             "TensorRT engines as a Ray task on a node started with --resources '{\"target:NAME\": 1}' "
                             "(auto, HOST:PORT or ray://HOST:PORT; needs the cluster extra); the engines stay there",
                          shards=False)
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out (with --finalize: recompile engines)")


def _require(args, *names: str) -> None:
    from egm_edge.errors import InputError

    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is None]
    if missing:
        raise InputError(f"egm-edge build needs {' and '.join(missing)} here; see `egm-edge build --help`.")


def _plan_for_export(args, target, budget):
    """The planner's verdict for an export's checkpoint on `target` (gpu/jetson builds from --export)."""
    from pathlib import Path

    from egm_edge.artifacts import read_manifest
    from egm_edge.builder.pipeline import full_precision, plan_for
    from egm_edge.commands.plan import _image
    from egm_edge.models import spec_from_config

    m = read_manifest(Path(args.export)) or {}
    precision = m.get("precision", "full")
    precision = full_precision(target) if precision == "full" else precision
    p, note = plan_for(spec_from_config(Path(args.export)), target, precision, budget,
                       image_wh=_image(args.image) if args.image else None)
    if note:
        print(f"[build] {note}", flush=True)
    return p


def _cluster(args):
    """The Ray executor --cluster asks for, connected now (an unreachable head is refused before any build), or None."""
    if args.cluster is None:
        if args.shared_dir is not None:
            from egm_edge.errors import InputError

            raise InputError("--shared-dir applies to --cluster builds only; add --cluster ADDRESS or leave it out.")
        return None
    if args.target is not None and not args.finalize:
        from egm_edge.targets import load_target

        if load_target(args.target).kind not in ("gpu", "jetson"):
            from egm_edge.errors import UnsupportedError

            raise UnsupportedError(f"--cluster compiles TensorRT engines on a node of a gpu or jetson target; target "
                                   f"{args.target} has none to compile, so build it here without --cluster.")
    from egm_edge.sweep.units import executor_for

    ex = executor_for(args.cluster, args.cluster_timeout, args.shared_dir)
    ex.connect()
    return ex


def _finalize_remote(bundle, ex, force: bool, say) -> int:
    from egm_edge.builder.remote import finalize_on_cluster

    got = finalize_on_cluster(bundle, ex, force=force, say=say)
    print(f"engines: {got['engines']} on ray node {got['node']} (target {got['target']})")
    return 0


def run(args: argparse.Namespace) -> int:
    say = lambda m: print(f"[build] {m}", flush=True)  # noqa: E731
    ex = _cluster(args)
    if args.finalize:
        if ex is not None:
            return _finalize_remote(args.finalize, ex, args.force, say)
        from egm_edge.builder.tensorrt import finalize

        print(f"engines: {finalize(args.finalize, force=args.force, progress=say)}")
        return 0
    _require(args, "target", "out")
    from egm_edge.runtime.settings import parse_think_budget

    budget = parse_think_budget(args.think_budget)  # parsed once, before any work; None: the path's default
    if args.model:
        from egm_edge.builder.pipeline import build_from_model
        from egm_edge.commands.plan import _image

        _require(args, "recipe")
        out = build_from_model(
            args.model, args.recipe, args.target, args.out, calib=args.calib, think_budget=budget,
            block_size=args.block_size, effective_bits=args.effective_bits, kv_cache=args.kv_cache, image_wh=_image(args.image) if args.image else None, work_dir=args.work_dir,
            force=args.force, budget_mode=args.budget_mode, max_answer_tokens=args.max_answer_tokens,
            max_batch_size=args.max_batch_size, vision_int8=args.vision_int8, prefill_int8=args.prefill_int8, progress=say)
        print(f"bundle: {out}")
        return _finalize_remote(out, ex, args.force, say) if ex is not None else 0
    from egm_edge.targets import load_target

    if args.effective_bits is not None:
        from egm_edge.errors import InputError

        raise InputError("--effective-bits sets recipe auto's search in the quantize stage, which only --model runs; quantize with "
                         "`egm-edge quantize --recipe auto --effective-bits` before exporting.")
    if args.block_size is not None:
        from egm_edge.errors import InputError

        raise InputError("--block-size sets the INT4 blocks of the quantize stage, which only --model runs; quantize with "
                         "`egm-edge quantize --block-size` before exporting.")
    target = load_target(args.target)
    if (args.vision_int8 or args.prefill_int8) and target.kind != "cpu":
        from egm_edge.errors import UnsupportedError

        raise UnsupportedError("--vision-int8 and --prefill-int8 are ONNX Runtime CPU options; TensorRT builds choose precisions at quantize time.")
    if target.kind == "cpu":
        from egm_edge.builder import build_cpu

        out = build_cpu(args.export, args.out, think_budget=budget, budget_mode=args.budget_mode,
                        max_answer_tokens=args.max_answer_tokens or 128, max_seq_len=args.max_seq_len, force=args.force,
                        vision_int8=args.vision_int8, prefill_int8=args.prefill_int8, progress=say)
    else:
        from egm_edge.builder.tensorrt import build_tensorrt

        out = build_tensorrt(args.export, args.out, target, _plan_for_export(args, target, budget), budget_mode=args.budget_mode,
                             max_answer_tokens=args.max_answer_tokens, force=args.force, kv_cache=args.kv_cache,
                             max_batch_size=args.max_batch_size, progress=say)
    print(f"bundle: {out}")
    return _finalize_remote(out, ex, args.force, say) if ex is not None else 0
