"""`egm-edge demo`: the whole story on the embedded tiny grounder, in a few minutes on a CPU.

1. a fresh synthetic grounding set (a seed the model never saw in training);
2. a sweep over recipes (full, int4_awq, auto@6: AutoQuantize's per-layer INT4/INT8/16-bit mix at 6
   effective bits, fp8 where it runs) x thinking budgets:
   each recipe quantized (ModelOpt), exported (ONNX), built for cpu (ONNX
   Runtime) or reused, each (recipe, budget) measured here, then a table, an
   accuracy-vs-latency Pareto plot and a recommendation;
3. validation of each quantized recipe against the full-precision model, with
   the accuracy gate (auto@6's is the sweep's own, `sweep.auto_search`);
4. a few images grounded by the recommended CPU bundle, saved with the boxes drawn.

Everything lands under one output directory (default: `default_out_dir()`, in the
user's cache, never the current folder) and is resumable: a second run reuses the
bundles and the records of the first. The folder is marked as the demo's by
`demo.json`; any other non-empty folder is refused (`force` replaces only another
egm-edge artifact).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

DEMO_SEED = 4242  # a stream the tiny grounder never trained on (training uses small seeds)
DEMO_BUDGETS = (0, 8, 16, 32, None)
# The tiny grounder's prompts take ~100 tokens and its reasoning well under 200: a 1024-token plan
# bounds a model that never closes its reasoning without cutting the trained one short.
DEMO_MAX_SEQ = 1024
MARKER = "demo.json"  # written first: the folder is the demo's, so a rerun (even of a stopped run) resumes there


@dataclass
class DemoResult:
    out_dir: Path
    sweep_summary: str
    validations: dict[str, dict] = field(default_factory=dict)
    images: list[Path] = field(default_factory=list)
    seconds: float = 0.0


# auto@6: the default AutoQuantize constraint; on 200 fresh samples it held Acc@0.5 within 0.5 points at 43% of the full
# decoder's bytes where all-INT4 lost 2 (benchmarks/README.md "Recipe auto").
AUTO = "auto@6"


def _recipes(include_fp8: bool) -> tuple[str, ...]:
    return ("full", "int4_awq", AUTO, "fp8") if include_fp8 else ("full", "int4_awq", AUTO)


def default_out_dir() -> Path:
    """$EGM_EDGE_CACHE/demo, else $XDG_CACHE_HOME/egm-edge/demo, else ~/.cache/egm-edge/demo."""
    from egm_edge.artifacts import cache_root

    return cache_root() / "demo"


def is_demo_dir(d) -> bool:
    """Whether `d` is the demo's own output: its marker, or (a folder from before the marker) its sweep records."""
    return (Path(d) / MARKER).is_file() or (Path(d) / "sweep" / "records.jsonl").is_file()


def run_demo(out_dir=None, *, model=None, n: int = 24, include_fp8: bool = True, budgets=DEMO_BUDGETS,
             latency_budget_ms: float | None = None, n_images: int = 4,
             say: Callable[[str], None] = print, force: bool = False) -> DemoResult:
    from egm_edge.artifacts import prepare_output_dir
    from egm_edge.assets import default_model_dir
    from egm_edge.data import load_samples
    from egm_edge.runtime.draw import draw_boxes
    from egm_edge.runtime.grounder import Grounder
    from egm_edge.runtime.image import load_image
    from egm_edge.sweep.api import sweep
    from egm_edge.synth import generate
    from egm_edge.validate.api import validate

    t0 = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else default_out_dir()
    model = Path(model) if model else default_model_dir()
    out = prepare_output_dir(out, force, inputs=[model], own=is_demo_dir)
    if not (out / MARKER).is_file():
        (out / MARKER).write_text(json.dumps({"command": "demo", "seed": DEMO_SEED, "model": str(model.resolve())}, indent=2) + "\n")
    say(f"writing to {out}")
    data = out / "data" / "samples.jsonl"
    if data.is_file():  # a rerun into the same folder keeps its data (and so every stored measurement)
        say(f"[1/4] synthetic grounding set: reusing {data} (a new --out makes a fresh one)")
    else:
        say(f"[1/4] synthetic grounding set: {n} samples of stream {DEMO_SEED} -> {out / 'data'}")
        shutil.rmtree(out / "data", ignore_errors=True)  # a set cut short in this (the demo's own) folder
        data = generate(out / "data", n=n, seed=DEMO_SEED)

    recipes = _recipes(include_fp8)
    say(f"[2/4] sweep: recipes {', '.join(recipes)} x think budgets "
        f"{', '.join('none' if b is None else str(b) for b in budgets)} (bundles built once, then reused)")
    sw = sweep(model, recipes=recipes, budgets=budgets, targets=("cpu", "jetson-orin-nano-8gb"), data=data,
               out_dir=out / "sweep", latency_budget_ms=latency_budget_ms, max_seq_len=DEMO_MAX_SEQ,
               say=lambda m: say(f"      {m}"),
               # EGM models think before they answer: calibrating on the full model's own reasoning keeps fp8's
               # boxes as tight as the full model's on the tiny grounder (mean IoU -1.2 vs -2.6 points, 100 samples).
               calib_with_reasoning=True)

    say("[3/4] validate each quantized recipe against the full-precision model (unlimited thinking)")
    reference = out / "sweep" / "bundles" / "full"
    validations = {}
    for row in (sw.auto.rows if sw.auto else []):  # validated by the sweep's search for the smallest passing rung
        validations[row["recipe"]] = {"verdict": row["verdict"], "report": row["report"], "overall": {
            "acc_delta": row["acc_delta"], "miou_delta": row["miou_delta"]}}
        say(f"      {row['recipe']}: {row['verdict'].upper()} ({row['report']})")
        for f in row["failures"]:
            say(f"        {f}")
    for recipe in [r for r in recipes[1:] if r not in validations]:
        cand = out / "sweep" / "bundles" / recipe
        if not (cand / "manifest.json").is_file():  # no CPU bundle (fp8): its quantized checkpoint, through PyTorch
            cand = out / "sweep" / "checkpoints" / recipe
        if not (cand / "manifest.json").is_file():
            say(f"      {recipe}: no artifact to validate, skipped")
            continue
        rep = validate(cand, reference, data, out_dir=out / "validate" / recipe, think_budget="none",
                       max_new_tokens=DEMO_MAX_SEQ // 2, progress=False)
        o = rep.data["groups"]["overall"]
        validations[recipe] = {"verdict": rep.verdict, "report": str(rep.out_dir / "report.md"), "overall": o}
        say(f"      {recipe}: {rep.verdict.upper()} ({rep.out_dir / 'report.md'})")
        for f in rep.failures:
            say(f"        {f}")
        for h in rep.data.get("held") or []:
            say(f"        held (within noise): {h}")

    shown = next(r for r in ("int4_awq", "full") if (out / "sweep" / "bundles" / r / "manifest.json").is_file())
    say(f"[4/4] ground a few images with the {shown} CPU bundle")
    g = Grounder.open(out / "sweep" / "bundles" / shown)
    images = []
    samples = load_samples(data).samples[:n_images]
    (out / "grounded").mkdir(exist_ok=True)
    for i, s in enumerate(samples):
        img = load_image(s.image, exif_transpose=False)
        r = g.ground(img, s.expression, task=s.task)
        path = out / "grounded" / f"{i:02d}.png"
        draw_boxes(img, [(s.bbox, "truth", (40, 170, 60)), (r.box, shown, (220, 40, 40))]).save(path)
        images.append(path)
        say(f"      '{s.expression}': think {r.think_tokens} tokens, {r.timings['total']:.0f} ms -> {path}")
    return DemoResult(out, sw.summary(), validations, images, time.perf_counter() - t0)
