"""One CPU bundle per recipe for a sweep: built through the pipeline stages, or reused when nothing changed.

Contract: `bundle_for(model_dir, recipe, bundles_dir, ...)` returns
`bundles_dir/<recipe>`, a bundle (manifest stage "build") whose manifest carries
`sweep.key`, a digest of every input that shapes it: the checkpoint's identity
(config.json sha256 and a fingerprint of its weights), the recipe, the
calibration recipe (quantized recipes only), the bundle caps and the egm-edge
version. A bundle whose key matches is reused as is; otherwise it is rebuilt:
quantize (skipped for "full"; INT4 blocks of 64 where the model's widths do
not divide by 128; the quantized checkpoint is kept and reused under
`checkpoints/<recipe>`, see `checkpoint_for`) -> export into
`bundles_dir/.work/<recipe>/` (removed afterwards) -> build_cpu. Stages write
their own manifests and rename into place, so an interrupted build leaves
nothing that looks reusable.

`device_bundle_for(model_dir, recipe, target, bundles_dir, work_dir, ...)` is the same for
a gpu/jetson target measured on its own node (`sweep --cluster --target-engine tensorrt`):
`bundles_dir/<recipe>-<target>`, built by `builder.pipeline.build_from_model` with its
stages kept in `work_dir` (one export per checkpoint and graph dtype, whichever targets
share it) and planned for the sweep's largest think budget; reused while
`bundles_dir/<recipe>-<target>.sweep-key` matches its inputs. Its engines are compiled on
the device, not here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

from egm_edge.errors import InputError

FULL = "full"


def recipe_names() -> tuple[str, ...]:
    from egm_edge.quantize.recipes import RECIPES

    return (FULL, *RECIPES)


def check_recipes(recipes) -> tuple[str, ...]:
    """The recipes, each a registered name, "full", or one AutoQuantize rung ("auto@BITS[:FORMAT/FORMAT]")."""
    from egm_edge.sweep.auto_search import parse

    names = recipe_names()
    bad = []
    for r in recipes:
        if str(r).startswith("auto@"):
            parse(r)  # one sentence for a malformed rung
        elif r not in names:
            bad.append(r)
    if bad or not recipes:
        raise InputError(f"Unknown recipe {bad[0] if bad else '(none given)'!r}. Choose from: {', '.join(names)}.")
    if len(set(recipes)) != len(recipes):
        raise InputError(f"Recipes {', '.join(recipes)} name one twice; give each once.")
    return tuple(recipes)


def default_calibration() -> Path:
    """The shipped synth recipe: the synthetic world, always available."""
    from egm_edge.quantize.calibration import recipes_dir

    return recipes_dir() / "synth.toml"


def int4_block_size(model_dir: Path, recipe: str) -> int | None:
    """The INT4 block `quantize` picks for this model (`quantize.recipes.choose_int4_block`); None if not INT4 or
    the recipe's own. Part of the bundle key, so a sweep says which block its bundles were built with."""
    from egm_edge.quantize.policy import config_widths
    from egm_edge.quantize.recipes import choose_int4_block

    if recipe == FULL:
        return None
    return choose_int4_block(recipe.partition("@")[0], config_widths(json.loads((model_dir / "config.json").read_text())).values())[0]


def bundle_key(model_dir: Path, recipe: str, calibration, caps: dict, with_reasoning: bool = False) -> str:
    from egm_edge import __version__
    from egm_edge.artifacts import sha256_file
    from egm_edge.validate.predictors import weights_fingerprint

    calib = None
    if recipe != FULL:
        from egm_edge.quantize.calibration import CalibrationRecipe

        rec = calibration if isinstance(calibration, CalibrationRecipe) else CalibrationRecipe.from_toml(calibration)
        calib = rec.digest()
    blob = {"config": sha256_file(model_dir / "config.json"), "weights": weights_fingerprint(model_dir),
            "tokenizer": sha256_file(model_dir / "tokenizer.json"), "recipe": recipe,
            "int4_block": int4_block_size(model_dir, recipe), "calibration": calib, "caps": caps,
            "egm_edge": __version__}
    if with_reasoning and recipe != FULL:  # calibrated on the full model's own reasoning (quantize --calib-with-reasoning)
        blob["calibration_reasoning"] = True
    if recipe != FULL:  # what the recipe means (its registry definition, AutoQuantize formats and bits): a changed default rebuilds
        from egm_edge.sweep.auto_search import quant_spec

        blob["quant_spec"] = quant_spec(recipe, blob["int4_block"], with_reasoning).to_dict()
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20]


def checkpoint_for(model_dir, recipe: str, root, *, calibration=None, say: Callable[[str], None] | None = None,
                   quantize_progress: bool = True, with_reasoning: bool = False) -> tuple[Path, bool]:
    """(quantized checkpoint, reused?) at `root/<recipe>`, reused when `root/<recipe>.sweep-key` matches the inputs.

    It feeds the export of a quantized bundle, and is what gets measured (through the PyTorch reference's
    dequantizing loader) where no CPU bundle can be built for the recipe."""
    from egm_edge.artifacts import read_manifest
    from egm_edge.quantize.api import quantize

    say = say or (lambda _m: None)
    model_dir, root = Path(model_dir), Path(root)
    calibration = calibration if calibration is not None else default_calibration()
    key = bundle_key(model_dir, recipe, calibration, {}, with_reasoning)
    out, key_file = root / recipe, root / f"{recipe}.sweep-key"
    if (read_manifest(out) or {}).get("stage") == "quantize" and key_file.is_file() and key_file.read_text().strip() == key:
        say(f"{recipe}: reusing {out} (inputs unchanged)")
        return out, True
    key_file.unlink(missing_ok=True)
    say(f"{recipe}: quantizing {model_dir.name}")
    from egm_edge.sweep.auto_search import quant_spec

    quantize(model_dir, quant_spec(recipe, int4_block_size(model_dir, recipe), with_reasoning), calibration, out, force=True,
             progress=quantize_progress)
    key_file.write_text(key + "\n")  # after the stage renamed its output into place: only a finished one is reused
    return out, False


def reusable(bundle_dir: Path, key: str) -> bool:
    from egm_edge.artifacts import read_manifest

    m = read_manifest(bundle_dir) or {}
    return m.get("stage") == "build" and (m.get("sweep") or {}).get("key") == key


def bundle_for(model_dir, recipe: str, bundles_dir, *, checkpoints_dir=None, calibration=None, max_answer_tokens: int = 128,
               max_seq_len: int = 4096, say: Callable[[str], None] | None = None, quantize_progress: bool = True,
               with_reasoning: bool = False) -> tuple[Path, bool]:
    """(bundle path, reused?) for `recipe` (see the module docstring)."""
    say = say or (lambda _m: None)
    model_dir, bundles_dir = Path(model_dir), Path(bundles_dir)
    calibration = calibration if calibration is not None else default_calibration()
    if recipe != FULL and isinstance(calibration, (str, Path)) and not Path(calibration).is_file():
        raise InputError(f"Calibration recipe {calibration} does not exist; pass --calib FILE.toml (e.g. calibration/synth.toml).")
    caps = {"max_answer_tokens": max_answer_tokens, "max_seq_len": max_seq_len}
    key = bundle_key(model_dir, recipe, calibration, caps, with_reasoning)
    out = bundles_dir / recipe
    if reusable(out, key):
        say(f"{recipe}: reusing {out} (inputs unchanged)")
        return out, True
    from egm_edge.builder import build_cpu
    from egm_edge.export.pipeline import export

    src = model_dir
    if recipe != FULL:
        src, _ = checkpoint_for(model_dir, recipe, checkpoints_dir or bundles_dir.parent / "checkpoints", calibration=calibration,
                                say=say, quantize_progress=quantize_progress, with_reasoning=with_reasoning)
    work = bundles_dir / ".work" / recipe
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        say(f"{recipe}: exporting to ONNX")
        ex = export(src, work / "export", force=True)
        say(f"{recipe}: building the CPU bundle")
        build_cpu(ex, out, max_answer_tokens=max_answer_tokens, max_seq_len=max_seq_len, force=True, name=f"{model_dir.name}-{recipe}",
                  extra_manifest={"sweep": {"key": key, "recipe": recipe, "model": str(model_dir.resolve())}})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out, False


def device_bundle_for(model_dir, recipe: str, target, bundles_dir, work_dir, *, calibration=None, think_budget,
                      image_wh: tuple[int, int], max_answer_tokens: int = 128, say: Callable[[str], None] | None = None,
                      with_reasoning: bool = False) -> tuple[Path, bool]:
    """(bundle path, reused?) of `recipe` for a gpu/jetson `target` (see the module docstring); the pipeline's own
    one-sentence refusals (a precision the target lacks, a plan that does not fit, no CUDA to quantize) pass through."""
    from egm_edge.artifacts import read_manifest
    from egm_edge.builder.pipeline import build_from_model
    from egm_edge.errors import UnsupportedError
    from egm_edge.runtime.settings import budget_to_json

    say = say or (lambda _m: None)
    model_dir, bundles_dir = Path(model_dir), Path(bundles_dir)
    if with_reasoning and recipe != FULL:
        raise UnsupportedError(f"Recipe {recipe} calibrated on the model's own reasoning has no {target.name} bundle in a "
                               "sweep; build it with `egm-edge build` and sweep it with --bundle on the device.")
    calibration = calibration if calibration is not None else default_calibration()
    caps = {"target": target.name, "think_budget": budget_to_json(think_budget), "image_wh": list(image_wh),
            "max_answer_tokens": max_answer_tokens}
    key = bundle_key(model_dir, recipe, calibration, caps)
    out, key_file = bundles_dir / f"{recipe}-{target.name}", bundles_dir / f"{recipe}-{target.name}.sweep-key"
    if (read_manifest(out) or {}).get("stage") == "build" and key_file.is_file() and key_file.read_text().strip() == key:
        say(f"{recipe}: reusing {out} (inputs unchanged)")
        return out, True
    key_file.unlink(missing_ok=True)
    say(f"{recipe}: building the {target.name} bundle (its TensorRT engines are compiled on that target's node)")
    build_from_model(model_dir, recipe, target, out, calib=None if recipe == FULL else calibration, think_budget=think_budget,
                     image_wh=image_wh, work_dir=work_dir, force=True, max_answer_tokens=max_answer_tokens, progress=say)
    key_file.write_text(key + "\n")  # after the build renamed its bundle into place: only a finished one is reused
    return out, False

