"""`sweep --recipes auto`: the smallest AutoQuantize configuration that passes the validate gate.

Contract: `expand(recipes, targets, ladder)` turns "auto" into one recipe per rung of effective bits, "auto@5",
"auto@6", ... (with ":FORMAT/FORMAT" appended where the formats every sweep target runs are fewer than the cpu
target's), and the sweep builds and measures each rung like any recipe (CPU bundle, every budget, predictions for
the other targets). `parse(name)` reads a rung, `quant_spec(name, ...)` is the QuantSpec any recipe name quantizes
with. After the measurement, `search(...)` validates the rungs against the full-precision bundle from the fewest
bits up (unlimited thinking, the validate gate with its thresholds) and stops at the first that passes: the pick,
the smallest configuration that holds accuracy. It writes auto.md (a row per rung tried: effective bits, decoder
bytes and their fraction of the full decoder, layers per format, verdict, Acc@0.5 and mean IoU deltas, the split
mean) with the rungs' layer-map pictures beside it, and auto.json.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from egm_edge.errors import InputError

AUTO = "auto"
LADDER = (5.0, 6.0, 7.0, 8.0)  # effective bits tried, fewest first (4 is plain INT4: the recipe int4_awq)
SEARCH_MARKER = "auto-search.json"  # written first into `smallest_checkpoint`'s work folder: the folder is the search's


def parse(name: str) -> tuple[float, tuple[str, ...] | None]:
    """"auto@6" -> (6.0, None: the cpu target's formats); "auto@5.5:int4_awq" -> (5.5, ("int4_awq",))."""
    head, _, rest = str(name).partition("@")
    bits, _, fmts = rest.partition(":")
    try:
        value = float(bits)
    except ValueError:
        value = None
    if head != AUTO or value is None:
        raise InputError(f"Recipe {name!r} is not an AutoQuantize rung; write auto@BITS (e.g. auto@6) or auto@BITS:FORMAT/FORMAT.")
    from egm_edge.quantize.recipes import QuantSpec

    formats = tuple(fmts.split("/")) if fmts else None
    QuantSpec(AUTO, formats=formats or ("int4_awq",), effective_bits=value)  # one sentence for bad bits or formats
    return value, formats


def parse_ladder(values) -> list[float]:
    """--auto-bits as numbers ("5,6.5" or ["5", "6.5"]); one sentence for anything else."""
    items = [v.strip() for v in values.split(",")] if isinstance(values, str) else [str(v).strip() for v in values]
    try:
        return [float(v) for v in items if v]
    except ValueError:
        raise InputError(f"--auto-bits {','.join(items)} must be numbers of bits, e.g. 5,6,7.") from None


def label(bits: float, formats: tuple[str, ...] | None) -> str:
    return f"{AUTO}@{bits:g}" + (f":{'/'.join(formats)}" if formats else "")


def expand(recipes, targets, ladder=LADDER) -> tuple[str, ...]:
    """`recipes` with "auto" replaced by its rungs (module docstring); `targets`: the sweep's target profiles."""
    if AUTO not in recipes:
        return tuple(recipes)
    from egm_edge.targets import auto_formats, load_target

    cpu = auto_formats(load_target("cpu"))
    common = tuple(f for f in cpu if all(f in auto_formats(t) for t in targets))
    if not common:
        raise InputError(f"Recipe auto needs a per-layer format every sweep target runs, and {', '.join(t.name for t in targets)} "
                         "share none; sweep those targets apart.")
    rungs = [label(b, None if common == cpu else common) for b in sorted(set(ladder))]
    out = []
    for r in recipes:
        out += rungs if r == AUTO else [r]
    return tuple(dict.fromkeys(out))


def quant_spec(recipe: str, block_size: int | None, with_reasoning: bool):
    """The QuantSpec a sweep recipe name quantizes with."""
    from egm_edge.quantize.recipes import QuantSpec

    if not recipe.startswith(AUTO + "@"):
        return QuantSpec(recipe, block_size=block_size, calib_with_reasoning=with_reasoning)
    from egm_edge.targets import auto_formats, load_target

    bits, formats = parse(recipe)
    formats = formats or auto_formats(load_target("cpu"))
    return QuantSpec(AUTO, block_size=block_size if "int4_awq" in formats else None, formats=formats, effective_bits=bits)


def rungs(recipes) -> list[str]:
    """The AutoQuantize rungs among `recipes`, fewest bits first."""
    return sorted((r for r in recipes if str(r).startswith(AUTO + "@")), key=lambda r: parse(r)[0])


@dataclass
class AutoResult:
    pick: str | None
    rows: list[dict] = field(default_factory=list)
    report: Path | None = None

    def sentence(self) -> str:
        last = self.rows[-1] if self.rows else None
        if self.pick is None and last is not None and last["verdict"] != "fail":
            why = (last.get("notes") or ["see its report"])[0]
            return f"recipe auto: the validation of {last['recipe']} is {last['verdict']} ({why.rstrip('.')}); nothing was picked."
        if self.pick is None:
            return (f"recipe auto: none of {', '.join(r['recipe'] for r in self.rows)} passes the validate gate against the full "
                    "model; add rungs with more bits (--auto-bits) or keep 16-bit.")
        r = next(r for r in self.rows if r["recipe"] == self.pick)
        frac = f", {r['decoder_fraction']:.0%} of the full decoder" if r.get("decoder_fraction") else ""
        held = (f"; {len(r['held'])} drop(s) over the limit passed as within sampling noise (gate rule 'point' fails them)"
                if r.get("held") else "")
        return (f"recipe auto: {self.pick} is the smallest configuration that passes the validate gate "
                f"(Acc@0.5 {_pm(r['acc_delta'])}, mean IoU {_pm(r['miou_delta'])} points{frac}{held}); see {self.report}.")


def search(out: Path, recipes, full_bundle: Path, data, *, limit, seed: int, image_root, strict: bool, max_new_tokens: int,
           max_acc_drop: float, max_miou_drop: float, say: Callable[[str], None], gate: str = "significant") -> AutoResult:
    """The sweep's rungs (built and measured under out/bundles, out/checkpoints) validated fewest bits first until one
    passes (module docstring)."""

    def candidate(recipe: str) -> tuple[Path, Path]:
        cand = out / "bundles" / recipe
        if not (cand / "manifest.json").is_file():
            cand = out / "checkpoints" / recipe  # no CPU bundle: its checkpoint through the PyTorch reference
        return cand, out / "checkpoints" / recipe

    return gate_ladder(out / "auto", rungs(recipes), candidate, full_bundle, data, limit=limit, seed=seed, image_root=image_root,
                       strict=strict, max_new_tokens=max_new_tokens, max_acc_drop=max_acc_drop, max_miou_drop=max_miou_drop,
                       say=say, gate=gate)


def gate_ladder(report_dir: Path, labels, candidate: Callable[[str], tuple[Path, Path]], reference: Path, data, *, limit, seed: int,
                image_root, strict: bool, max_new_tokens: int, max_acc_drop: float, max_miou_drop: float,
                say: Callable[[str], None], gate: str = "significant") -> AutoResult:
    """Validate `candidate(label)` (what to validate, the quantized checkpoint it came from; made when asked, so the
    rungs after the first pass are never quantized) against `reference` for each label in order until one passes the
    gate (`gate`: validate's rule, "significant" holds an over-limit drop whose 95% CI reaches no change, "point" fails
    it); auto.md and auto.json in `report_dir`."""
    from egm_edge.validate.api import validate

    result = AutoResult(None)
    report_dir.mkdir(parents=True, exist_ok=True)
    for label in labels:
        cand, checkpoint = candidate(label)
        say(f"recipe auto: validating {label} against the full model")
        rep = validate(cand, reference, data, out_dir=report_dir / label, think_budget="none", limit=limit, seed=seed,
                       image_root=image_root, strict=strict, max_new_tokens=max_new_tokens, max_acc_drop=max_acc_drop,
                       max_miou_drop=max_miou_drop, gate=gate, progress=False, force=True)
        result.rows.append(_row(label, rep, checkpoint, report_dir))
        if rep.verdict == "pass":
            result.pick = label
        if rep.verdict != "fail":  # a pass, or a validation that could not score every sample: no rung after it says more
            break
    result.report = _write(report_dir, result, max_acc_drop, max_miou_drop, gate)
    return result


def smallest_checkpoint(model_dir, calibration, out_dir, data, *, target=None, formats=None, ladder=LADDER,
                        max_acc_drop: float = 1.0, max_miou_drop: float = 1.0, limit=None, seed: int = 0, image_root=None,
                        strict: bool = True, max_new_tokens: int = 512, force: bool = False, cache_dir=None, dtype: str = "auto",
                        progress: bool = True, say: Callable[[str], None] = print, gate: str = "significant") -> tuple[Path, AutoResult]:
    """`quantize --recipe auto --max-acc-drop P --data D`: AutoQuantize at each of `ladder` (fewest bits first), each
    checkpoint validated against the full model (both through PyTorch) until one passes the gate; that checkpoint
    becomes `out_dir`. Rungs, validation reports and auto.md stay in `<out_dir>.auto-search/`. None passing: an
    EgmError naming the report, `out_dir` untouched."""
    from egm_edge.artifacts import check_apart, check_output_dir, prepare_output_dir
    from egm_edge.errors import EgmError
    from egm_edge.quantize.api import quantize
    from egm_edge.quantize.calibration import recipe_file

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    inputs = [model_dir, data if isinstance(data, (str, Path)) else None,
              recipe_file(calibration) if isinstance(calibration, (str, Path)) else None]
    check_output_dir(out_dir, force, inputs=inputs)
    work = out_dir.with_name(out_dir.name + ".auto-search")
    check_apart(work, inputs, "Search directory", "--out")
    if not Path(data).is_file():
        raise InputError(f"Data file {data} does not exist; pass grounding samples (EGM eval JSONL) with --data.")
    # Resumed when it is this search's own (its marker); another egm-edge artifact there is replaced only on --force.
    prepare_output_dir(work, force, inputs=inputs, own=lambda d: (d / SEARCH_MARKER).is_file())
    (work / SEARCH_MARKER).write_text(json.dumps({"command": "quantize --recipe auto --max-acc-drop", "model": str(model_dir.resolve()),
                                                  "out": str(out_dir.resolve())}, indent=2) + "\n")

    def candidate(name: str) -> tuple[Path, Path]:
        bits, _ = parse(name)
        say(f"recipe auto: quantizing at {bits:g} effective bits")
        ck = quantize(model_dir, AUTO, calibration, work / "checkpoints" / name, target=target, formats=formats,
                      effective_bits=bits, force=True, cache_dir=cache_dir, dtype=dtype, progress=progress)
        return ck, ck

    labels = [label(b, None) for b in sorted(set(float(b) for b in ladder))]
    result = gate_ladder(work, labels, candidate, model_dir, data, limit=limit, seed=seed, image_root=image_root, strict=strict,
                         max_new_tokens=max_new_tokens, max_acc_drop=max_acc_drop, max_miou_drop=max_miou_drop, say=say,
                         gate=gate)
    if result.pick is None:
        raise EgmError(result.sentence().rstrip(".") + f" (report: {result.report}).")
    if out_dir.exists():  # check_output_dir allowed it: empty, or an egm-edge artifact replaced on --force
        shutil.rmtree(out_dir)
    (work / "checkpoints" / result.pick).rename(out_dir)
    return out_dir, result


def _row(recipe: str, rep, checkpoint: Path, report_dir: Path) -> dict:
    o = rep.data["groups"]["overall"]
    q = json.loads((checkpoint / "manifest.json").read_text())
    auto, dec = q.get("auto") or {}, q.get("decoder_bytes") or {}
    picture = None
    src = checkpoint / (auto.get("picture") or "layer_map.png")
    if src.is_file():
        picture = f"layer-map-{recipe.replace(':', '_').replace('/', '+')}.png"
        shutil.copyfile(src, report_dir / picture)
    sm = (rep.data.get("split_mean") or {}).get("delta") or {}
    return {"recipe": recipe, "verdict": rep.verdict, "n": o["n"], "acc_delta": o["delta"]["acc_delta"],
            "miou_delta": o["delta"]["miou_delta"], "miou_delta_ci95": o["delta"]["miou_delta_ci95"],
            "split_mean_acc_delta": sm.get("acc_delta"), "split_mean_miou_delta": sm.get("miou_delta"),
            "effective_bits": auto.get("effective_bits_target"), "formats": (auto.get("summary") or {}).get("formats"),
            "decoder_bytes": dec.get("quantized"), "decoder_fraction": auto.get("decoder_fraction"),
            "failures": rep.failures, "held": rep.data.get("held") or [], "notes": rep.data.get("notes") or [],
            "picture": picture, "report": str(rep.out_dir / "report.md")}


def _pm(v, fmt: str = "+.2f") -> str:
    return "-" if v is None else format(v, fmt)


def _write(report_dir: Path, result: AutoResult, max_acc_drop: float, max_miou_drop: float, gate: str) -> Path:
    lines = ["# Recipe auto: the smallest configuration that passes the gate", "",
             f"Rungs validated against the full-precision bundle, fewest effective bits first, until one passes (gate: "
             f"Acc@0.5 and mean IoU drops of at most {max_acc_drop:g} / {max_miou_drop:g} points, "
             + ("unless within sampling noise" if gate == "significant" else "rule point: every drop over the limit fails")
             + ", overall and per split).", "",
             "| recipe | effective bits | decoder | layers | Acc@0.5 delta | mIoU delta (95% CI) | split mean mIoU delta | gate |",
             "|---|---:|---:|---|---:|---|---:|---|"]
    for r in result.rows:
        fmts = ", ".join(f"{k} {v}" for k, v in (r["formats"] or {}).items()) or "-"
        frac = f"{r['decoder_fraction']:.0%}" if r["decoder_fraction"] else "-"
        ci = r["miou_delta_ci95"] or (None, None)
        lines.append(f"| {r['recipe']} | {_pm(r['effective_bits'], 'g')} | {frac} | {fmts} | {_pm(r['acc_delta'])} | "
                     f"{_pm(r['miou_delta'])} [{_pm(ci[0])}, {_pm(ci[1])}] | {_pm(r['split_mean_miou_delta'])} | {r['verdict'].upper()} |")
    path = result.report = report_dir / "auto.md"
    lines += ["", result.sentence(), ""]
    lines += [f"![{r['recipe']}]({r['picture']})" for r in result.rows if r["picture"]]
    path.write_text("\n".join(lines) + "\n")
    (report_dir / "auto.json").write_text(json.dumps({"pick": result.pick, "rows": result.rows}, indent=2) + "\n")
    return path
