"""`build_cpu`: the ONNX IR of an export, optimised for ONNX Runtime's CPU provider, as a bundle.

Steps: check the export (manifest, stage, graphs); let ONNX Runtime apply its
graph optimisations and save the optimised graphs (weights kept in external
data files where the export had them); copy the tokenizer and the image
processor config; write the bundle's generation config (stop tokens, think
tags, default budget, caps); prove the bundle loads and grounds one image; only
then write manifest.json and rename the directory into place.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

from egm_edge.errors import CheckpointError

# EXTENDED fuses for the CPU provider (attention, layer norm, MatMulNBits paths) but stays free
# of the hardware-specific layouts of ALL, so the saved graph runs on any x86-64 or Arm CPU.
_SIDE_FILES = ("tokenizer.json", "preprocessor_config.json")


def _read_export(export_dir: Path) -> dict:
    from egm_edge.artifacts import read_manifest

    if not export_dir.is_dir():
        raise CheckpointError(f"Export directory {export_dir} does not exist; run `egm-edge export` first.")
    m = read_manifest(export_dir)
    if m is None:
        raise CheckpointError(f"{export_dir} has no manifest.json, so it is not a finished export; run `egm-edge export` again.")
    if m.get("stage") != "export":
        raise CheckpointError(f"{export_dir} holds a {m.get('stage')!r} artifact; `build` takes the output of `egm-edge export`.")
    for name in ("vision.onnx", "decoder.onnx", *_SIDE_FILES):
        if not (export_dir / name).is_file():
            raise CheckpointError(f"Export {export_dir} is missing {name}; run `egm-edge export` again.")
    return m


def optimize_graph(src: Path, dst: Path, external: bool, disabled_optimizers=()) -> None:
    """Run ONNX Runtime's offline optimiser on `src` and save the result at `dst`.

    `disabled_optimizers` (from the export manifest) keeps transformers off that would
    change the graph's numerics (e.g. Q/DQ fusion of FP8 graphs).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    if external:
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled_optimizers))


def _smoke_image():
    """A small image with two shapes, enough to drive one full grounding."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (320, 240), (235, 235, 235))
    d = ImageDraw.Draw(img)
    d.rectangle((40, 60, 120, 140), fill=(220, 30, 30))
    d.ellipse((180, 80, 270, 170), fill=(30, 60, 220))
    return img


def build_cpu(export_dir, out_dir, *, think_budget: int | None = None, budget_mode: str = "hard",
              max_answer_tokens: int = 128, max_seq_len: int = 4096, force: bool = False,
              name: str | None = None, progress: Callable[[str], None] | None = None, extra_manifest: dict | None = None) -> Path:
    """Build a CPU bundle from an export directory; returns `out_dir`."""
    from egm_edge.artifacts import file_hashes, staged_output, write_manifest
    from egm_edge.runtime.budget import BudgetSpec
    from egm_edge.runtime.bundle import GenerationConfig

    say = progress or (lambda _m: None)
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    em = _read_export(export_dir)
    BudgetSpec(think_budget, budget_mode, max_answer_tokens)  # validate before any work
    gen = GenerationConfig(think_budget=think_budget, budget_mode=budget_mode, max_answer_tokens=max_answer_tokens,
                           max_seq_len=max_seq_len)
    t0 = time.perf_counter()
    timings = {}
    ort_settings = em.get("onnxruntime") or {}
    disabled = tuple(ort_settings.get("disabled_optimizers") or ())
    with staged_output(out_dir, force=force) as tmp:
        for graph in ("vision", "decoder"):
            external = bool((em.get("graphs", {}).get(graph) or {}).get("external_data"))
            say(f"optimising {graph}.onnx for ONNX Runtime (CPU)")
            t = time.perf_counter()
            optimize_graph(export_dir / f"{graph}.onnx", tmp / f"{graph}.onnx", external, disabled)
            timings[f"optimize_{graph}"] = round(time.perf_counter() - t, 3)
        for f in _SIDE_FILES:
            shutil.copyfile(export_dir / f, tmp / f)
        for f in ("config.json", "chat_template.jinja", "tokenizer_config.json"):
            if (export_dir / f).is_file():
                shutil.copyfile(export_dir / f, tmp / f)
        import json

        (tmp / "generation_config.json").write_text(json.dumps(gen.to_dict(), indent=2))
        manifest = dict(
            target="cpu",
            name=name or out_dir.name,
            precision=em.get("precision", "full"),
            executor="onnxruntime",
            inputs={"export": str(export_dir.resolve()), "export_manifest_sha256": file_hashes(export_dir, ["manifest.json"])["manifest.json"],
                    "checkpoint": (em.get("inputs") or {}).get("checkpoint")},
            runtime=em["runtime"],
            onnxruntime=ort_settings,
            source_validation=em.get("validation"),
            **(extra_manifest or {}),
        )
        # The smoke test needs a manifest to open the bundle; the final one (with figures) replaces it.
        write_manifest(tmp, "build", **manifest)
        say("checking that the bundle loads and grounds one image")
        t = time.perf_counter()
        smoke = _smoke_test(tmp)
        timings["smoke_test"] = round(time.perf_counter() - t, 3)
        timings["total"] = round(time.perf_counter() - t0, 3)
        sizes = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file() and p.name != "manifest.json"}
        write_manifest(tmp, "build", **manifest, smoke_test=smoke, sizes_bytes=sizes,
                       outputs={"sha256": file_hashes(tmp, [n for n in sizes])}, timings_s=timings)
    say(f"wrote {out_dir}")
    return out_dir


def _smoke_test(bundle_dir: Path) -> dict:
    from egm_edge.errors import EgmError
    from egm_edge.runtime.grounder import Grounder

    try:
        g = Grounder.open(bundle_dir)
        r = g.ground(_smoke_image(), "the red square", think_budget=8, max_answer_tokens=32)
    except EgmError:
        raise
    except Exception as e:  # a bundle that cannot run is a failed build, with the reason
        raise EgmError(f"The built bundle failed its smoke test ({type(e).__name__}: {e}); nothing was written.") from e
    return {"think_tokens": r.think_tokens, "answer_tokens": r.answer_tokens, "box": r.to_dict()["box"],
            "total_ms": r.timings.get("total")}
