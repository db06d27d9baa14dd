"""One-go build: a Hugging Face checkpoint to a target's bundle (quantize -> export -> build), stages reused.

Contract: `build_from_model(model_dir, recipe, target, out_dir, calib=..., ...)`
first refuses every impossible combination, before any stage runs and before
anything is written (an output or work directory that is, holds or lies inside
the checkpoint or the calibration recipe, an output and a work directory that
overlap, an output directory holding an artifact without force or anyone's
files even with force; then an unknown recipe or target, a precision the target
lacks (`targets.check_precision`: FP8 on Orin, NVFP4 before Blackwell), a
KV-cache dtype it lacks, a recipe the export cannot lower, a checkpoint whose family
record does not run every stage the build needs (plan, quantize unless "full",
export, runtime), a recipe that needs
CUDA on a machine without it, a missing calibration recipe, an engine build whose
predicted peak memory exceeds a Jetson's (`egm_edge.build_memory`), a plan that does
not fit: the planner's verdict and its first alternative). Then each stage writes into the work directory
(default: `<out>-stages/` beside the bundle) under a name derived from the hash
of its inputs (checkpoint files, recipe spec, calibration recipe, lowering);
a stage directory is reused when its manifest exists, is of that stage and
records the same input hashes. Recipe "full" skips quantize. The planner's
whole plan (verdict, memory, predicted latency) goes into the bundle manifest,
with where each stage came from.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from egm_edge.errors import CheckpointError, InputError, UnsupportedError

DEFAULT_THINK_BUDGET = 1024


@dataclass(frozen=True)
class Preflight:
    """Everything decided before any work: the target, the precision the planner sees, the plan."""

    target: object
    precision: str
    plan: object
    lowering: str  # "onnxruntime" or "tensorrt"
    think_budget: int | str = DEFAULT_THINK_BUDGET  # the bundle's default: tokens, or runtime.settings.UNLIMITED
    quant: object = None  # the QuantSpec the quantize stage gets; None for recipe "full"
    notes: tuple[str, ...] = ()  # decisions the user did not spell out: an unlimited budget's plan, the INT4 block


def full_precision(target) -> str:
    """What an unquantized checkpoint runs as on `target`: fp32 on CPU, else the 16-bit float it offers."""
    if target.kind == "cpu":
        return "fp32"
    return next(p for p in ("fp16", "bf16") if p in target.precisions)


def preflight(model_dir, recipe: str, target, *, calib=None, think_budget: int | str | None = None, kv_cache: str | None = None,
              image_wh: tuple[int, int] | None = None, out_dir=None, force: bool = False, work_dir=None,
              block_size: int | None = None, effective_bits: float | None = None) -> Preflight:
    """All refusals of the module docstring, in order; returns the decided plan.

    think_budget: tokens, UNLIMITED ('none': planned at all the context window holds, see `plan_for`) or None
    (DEFAULT_THINK_BUDGET). block_size: the INT4 weight block; None picks the largest of 128, 64 that divides
    every layer width (`quantize.recipes.choose_int4_block`)."""
    from egm_edge.artifacts import check_apart, check_output_dir, overlap
    from egm_edge.models import spec_from_config
    from egm_edge.quantize.calibration import recipe_file
    from egm_edge.quantize.recipes import RECIPES, get_recipe
    from egm_edge.runtime.settings import parse_think_budget
    from egm_edge.targets import check_kv_dtype, check_precision, load_target

    budget = parse_think_budget(think_budget)
    budget = DEFAULT_THINK_BUDGET if budget is None else budget
    model_dir = Path(model_dir)
    inputs = [model_dir, recipe_file(calib) if isinstance(calib, (str, Path)) else None]
    if work_dir is not None:
        check_apart(work_dir, inputs, "Stage directory", "--work-dir")
    if out_dir is not None:
        if work_dir is not None and overlap(out_dir, work_dir):
            raise InputError(f"Output directory {out_dir} and the stage directory {work_dir} overlap (replacing the bundle would "
                             "delete the stages it was built from); choose an --out and a --work-dir apart.")
        check_output_dir(Path(out_dir), force, inputs=inputs)
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"Model directory {model_dir} has no config.json; pass a Hugging Face checkpoint directory to --model.")
    if recipe != "full":
        get_recipe(recipe)
    target = load_target(target) if isinstance(target, (str, Path)) else target
    precision = full_precision(target) if recipe == "full" else recipe
    check_precision(target, precision)
    if kv_cache is not None:
        check_kv_dtype(target, kv_cache)
    from egm_edge.export.validate import THRESHOLDS

    if recipe not in THRESHOLDS and recipe != "auto":  # auto lowers as its layers' formats (CheckpointInfo.lowered_as)
        raise UnsupportedError(f"Recipe {recipe} cannot be exported to ONNX yet (export lowers {', '.join(THRESHOLDS)}); "
                               f"choose one of those for {target.name}.")
    lowering = "onnxruntime" if target.kind == "cpu" else "tensorrt"  # egm_edge.export.lowering.LOWERINGS
    if recipe != "full" and RECIPES[recipe].needs_cuda:
        import torch

        if not torch.cuda.is_available():
            raise UnsupportedError(f"Recipe {recipe} needs a CUDA GPU to quantize and this machine has none; run the build on a GPU machine.")
    if recipe != "full":
        if calib is None:
            raise InputError(f"Recipe {recipe} needs a calibration recipe; pass --calib, e.g. synth or calibration/coco128.toml.")
        from egm_edge.quantize.calibration import CalibrationRecipe

        CalibrationRecipe.from_toml(calib)  # a shipped name or a file, checked (and parsed) before any work
    spec = spec_from_config(model_dir)
    from egm_edge.models.families import get_family

    family = get_family(spec.family)
    for stage in ("plan", *(("quantize",) if recipe != "full" else ()), "export", "runtime"):
        family.require(stage, f"Checkpoint {model_dir}")
    if target.kind != "cpu":
        from egm_edge.builder.tensorrt import check_tensorrt_family

        check_tensorrt_family(family, f"Checkpoint {model_dir}")
    quant, notes = None, []
    if recipe != "full":
        from egm_edge.quantize.policy import check_block_sizes, config_widths
        from egm_edge.quantize.recipes import QuantSpec, choose_int4_block

        widths = config_widths(json.loads((model_dir / "config.json").read_text()))
        from egm_edge.targets import auto_formats

        block, note = choose_int4_block(recipe, widths.values(), block_size)
        quant = QuantSpec(recipe, kv_cache, block_size=block, formats=auto_formats(target) if recipe == "auto" else (),
                          effective_bits=effective_bits if recipe == "auto" else None)
        check_block_sizes(widths, quant)
        notes += [note] if note else []
    elif block_size is not None:
        raise InputError(f"--block-size {block_size} sets INT4 weight blocks and recipe full quantizes nothing; "
                         "drop it, or choose int4_awq or w4a8_awq.")
    kv = "fp8" if kv_cache == "fp8" else None
    p, note = plan_for(spec, target, precision, budget, image_wh=image_wh, kv_dtype=kv)
    notes += [note] if note else []
    return Preflight(target, precision, p, lowering, budget, quant, tuple(notes))


def plan_for(spec, target, precision: str, think_budget, *, image_wh: tuple[int, int] | None = None, kv_dtype: str | None = None):
    """(plan, sentence or None): the planner's plan at a parsed think budget, refused unless it fits.

    None plans DEFAULT_THINK_BUDGET. UNLIMITED has no number, so it is planned at all the model's context window
    holds (`plan.planned_think_budget`) and the sentence says so: the bundle then thinks without a budget up to
    that sequence, or, where that does not fit, the refusal names the largest budget that does.
    """
    from egm_edge.plan import DEFAULT_IMAGE_WH, plan, planned_think_budget

    image_wh = image_wh or DEFAULT_IMAGE_WH
    from egm_edge.build_memory import require_build_fit

    tokens, note = planned_think_budget(spec, DEFAULT_THINK_BUDGET if think_budget is None else think_budget, image_wh)
    p = plan(spec, target, precision, tokens, image_wh=image_wh, kv_dtype=kv_dtype)
    require_build_fit(p, target)  # the engine build comes first on the device, and needs more than running it
    require_fit(p, unlimited=note is not None)
    return p, note


def require_fit(p, unlimited: bool = False) -> None:
    """`UnsupportedError` with the planner's verdict and first alternative when plan `p` does not fit."""
    if not p.fits:
        instead = f"; instead: {p.alternatives[0]}" if p.alternatives else ""
        if unlimited:
            number = f"; pass --think-budget {p.max_think_budget} or less" if p.max_think_budget is not None else ""
            raise UnsupportedError(f"{p.model} at {p.precision} with an unlimited think budget (planned at the {p.think_budget} "
                                   f"tokens its context window holds) on {p.target} {p.verdict}{instead}{number}.")
        raise UnsupportedError(f"{p.model} at {p.precision} with a {p.think_budget}-token think budget on {p.target} {p.verdict}{instead}.")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _top_level_hashes(d: Path) -> dict[str, str]:
    """sha256 of the files directly in `d` but manifest.json: what the export stage records of its checkpoint."""
    from egm_edge.artifacts import file_hashes

    return file_hashes(d, [n for n in sorted(os.listdir(d)) if n != "manifest.json" and (d / n).is_file()])


def _stage(name: str, stage_dir: Path, recorded: Callable[[dict], object], expected, run: Callable[[], object], say) -> dict:
    """Reuse `stage_dir` when its manifest is of stage `name` and records `expected` inputs; else `run()` it."""
    from egm_edge.artifacts import read_manifest

    m = read_manifest(stage_dir)
    reused = bool(m) and m.get("stage") == name and recorded(m) == expected
    if reused:
        say(f"reusing {stage_dir}")
    else:
        run()
    return {"dir": str(stage_dir.resolve()), "reused": reused}


def build_from_model(model_dir, recipe: str, target, out_dir, *, calib=None, think_budget: int | str | None = None,
                     kv_cache: str | None = None, image_wh: tuple[int, int] | None = None, work_dir=None, force: bool = False,
                     budget_mode: str = "hard", max_answer_tokens: int | None = None, max_batch_size: int = 8,
                     vision_int8: bool = False, prefill_int8: bool = False, progress: Callable[[str], None] | None = None,
                     block_size: int | None = None, effective_bits: float | None = None) -> Path:
    """Run quantize -> export -> build for `target` into `out_dir`; returns `out_dir` (see the module docstring).

    think_budget and block_size as in `preflight`; the decisions it made for them are said through `progress`."""
    from egm_edge import __version__
    from egm_edge.artifacts import file_hashes, sha256_file

    say = progress or (lambda _m: None)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    work = Path(work_dir) if work_dir else out_dir.parent / f"{out_dir.name}-stages"
    pf = preflight(model_dir, recipe, target, calib=calib, think_budget=think_budget, kv_cache=kv_cache, image_wh=image_wh,
                   out_dir=out_dir, force=force, work_dir=work, block_size=block_size, effective_bits=effective_bits)
    for note in pf.notes:
        say(note)
    say(f"plan: {pf.plan.verdict}")
    stages: dict[str, dict] = {}

    checkpoint = model_dir
    if recipe != "full":
        from egm_edge.quantize.calibration import recipe_file
        model_hashes = file_hashes(model_dir)
        spec = pf.quant
        key = _digest({"stage": "quantize", "model": model_hashes, "spec": spec.to_dict(), "calib": sha256_file(recipe_file(calib)),
                       "egm_edge": __version__})
        checkpoint = work / f"quantize-{recipe}-{key[:12]}"

        def run_quantize():
            from egm_edge.quantize.api import quantize

            say(f"quantizing {model_dir} with {recipe} into {checkpoint}")
            quantize(model_dir, spec, calib, checkpoint, force=True)

        stages["quantize"] = {"key": key, **_stage("quantize", checkpoint, lambda m: (m.get("input") or {}).get("sha256"),
                                                    model_hashes, run_quantize, say)}

    ck_hashes = _top_level_hashes(checkpoint)
    from egm_edge.builder.tensorrt import graph_dtype_for

    graph_dtype = graph_dtype_for(pf.target, pf.precision)  # float32 for cpu; 16-bit for TensorRT (Edge-LLM's)
    # graph_dtype joins the key only when 16-bit, so float32 exports keep the stage directories they had.
    key = _digest({"stage": "export", "checkpoint": ck_hashes, "lowering": pf.lowering, "egm_edge": __version__,
                   **({"graph_dtype": graph_dtype} if graph_dtype != "float32" else {})})
    export_dir = work / f"export-{key[:12]}"

    def run_export():
        say(f"exporting {checkpoint} to ONNX ({pf.lowering} lowering, {graph_dtype} graphs) into {export_dir}")
        _export_fn()(checkpoint, export_dir, lowering=pf.lowering, graph_dtype=graph_dtype, force=True, progress=say)

    stages["export"] = {"key": key, "lowering": pf.lowering, "graph_dtype": graph_dtype,
                        **_stage("export", export_dir, lambda m: (m.get("inputs") or {}).get("sha256"), ck_hashes, run_export, say)}

    extra = {"pipeline": {"recipe": recipe, "stages": stages, "work_dir": str(work.resolve())}}
    from egm_edge.build_memory import predict_build_memory

    build_memory = predict_build_memory(pf.plan, pf.target)
    if build_memory is not None:
        extra["build_memory"] = build_memory.to_dict()
    if pf.target.kind == "cpu":
        from egm_edge.builder.cpu import build_cpu
        from egm_edge.models import spec_from_config

        # +128: longer expressions, but never past the context window (an unlimited budget plans all of it).
        max_seq_len = min(pf.plan.context_tokens + 128, spec_from_config(model_dir).text.max_positions)
        return build_cpu(export_dir, out_dir, think_budget=pf.think_budget, budget_mode=budget_mode,
                         max_answer_tokens=max_answer_tokens or pf.plan.answer_tokens + 80,
                         max_seq_len=max_seq_len, force=force, vision_int8=vision_int8,
                         prefill_int8=prefill_int8, progress=say,
                         extra_manifest={**extra, "plan": pf.plan.to_dict()})
    if vision_int8 or prefill_int8:
        raise UnsupportedError("vision_int8 and prefill_int8 are ONNX Runtime CPU options; TensorRT builds choose precisions at quantize time.")
    from egm_edge.builder.tensorrt import build_tensorrt

    return build_tensorrt(export_dir, out_dir, pf.target, pf.plan, budget_mode=budget_mode, max_answer_tokens=max_answer_tokens,
                          force=force, checkpoint_dir=checkpoint, kv_cache=kv_cache, max_batch_size=max_batch_size,
                          progress=say, extra_manifest=extra)


def _export_fn():
    from egm_edge.export.pipeline import export

    return export
