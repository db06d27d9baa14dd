"""INT4 under the validate gate on the embedded grounder: plain int4_awq, its AWQ variants, and recipe auto.

Each system is a quantization spec (egm_edge.quantize.recipes.QuantSpec) built into a CPU bundle the way the demo builds
its own (quantize on the shipped synth calibration recipe with the full model's reasoning -> export -> build_cpu with the
demo's 1024-token sequence cap) and validated against the full-precision bundle on fresh synthetic samples of the demo's
stream (seed 4242, never trained on) with the demo's settings (unlimited thinking, 512 new tokens, the default gate).

    python benchmarks/int4_gate.py --n 200 --systems int4_awq,auto@6,auto@5,auto@6:int4_awq
    python benchmarks/int4_gate.py --n 200 --systems int4_awq,int4_awq+awq_clip,int4_awq+awq_full,int4_awq-plain

System names: RECIPE[+AWQ][-plain][@EFFECTIVE_BITS[:FORMAT/FORMAT]]; "-plain" calibrates on the prompts only (no reasoning);
auto without formats searches the cpu target's (int4_awq, int8_sq). Prints a table, writes results.json (and each auto
system's layer map) into --out. Accuracy only: timings here are not comparable (see cpu benchmarks for speed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

DEMO_SEED = 4242
DEMO_MAX_SEQ = 1024


def parse_system(name: str):
    """(QuantSpec, name) for a system name (module docstring)."""
    from egm_edge.quantize.recipes import QuantSpec
    from egm_edge.targets import auto_formats, load_target

    head, _, bits_part = name.partition("@")
    plain = head.endswith("-plain")
    head = head.removesuffix("-plain")
    recipe, _, awq = head.partition("+")
    bits, _, fmts = bits_part.partition(":")
    kw = {"block_size": 64, "awq": awq or None, "calib_with_reasoning": not plain}
    if recipe == "auto":
        kw["formats"] = tuple(fmts.split("/")) if fmts else auto_formats(load_target("cpu"))
        kw["effective_bits"] = float(bits) if bits else None
    return QuantSpec(recipe, **kw)


def dataset(out: Path, n: int) -> Path:
    from egm_edge.synth import generate

    data = out / f"data-{n}" / "samples.jsonl"
    if not data.is_file():
        shutil.rmtree(data.parent, ignore_errors=True)
        generate(data.parent, n=n, seed=DEMO_SEED)
    return data


def bundle(model: Path, out: Path, name: str, spec=None, say=print) -> Path:
    """out/bundles/<name>: the CPU bundle of `spec` (None: the full model), reused when its manifest exists."""
    from egm_edge.builder import build_cpu
    from egm_edge.export.pipeline import export
    from egm_edge.quantize.api import quantize

    dest = out / "bundles" / name
    if (dest / "manifest.json").is_file():
        return dest
    work = out / "work" / name
    shutil.rmtree(work, ignore_errors=True)
    src = model
    if spec is not None:
        say(f"{name}: quantizing ({spec.describe()})")
        src = quantize(model, spec, "synth", work / "checkpoint", force=True, progress=False)
        if (src / "layer_map.png").is_file():
            shutil.copyfile(src / "layer_map.png", out / f"layer_map-{name}.png")
        (out / f"quantize-{name}.json").write_text((src / "manifest.json").read_text())
    say(f"{name}: exporting and building")
    ex = export(src, work / "export", force=True)
    build_cpu(ex, dest, max_answer_tokens=128, max_seq_len=DEMO_MAX_SEQ, force=True, name=f"tiny-grounder-{name}")
    shutil.rmtree(work / "export", ignore_errors=True)
    return dest


def measure(model: Path, out: Path, data: Path, name: str, spec, reference: Path, say=print) -> dict:
    from egm_edge.validate.api import validate

    cand = bundle(model, out, name, spec, say)
    t0 = time.perf_counter()
    rep = validate(cand, reference, data, out_dir=out / "validate" / name, think_budget="none", max_new_tokens=DEMO_MAX_SEQ // 2,
                   progress=False, force=True)
    o = rep.data["groups"]["overall"]
    q = json.loads((out / f"quantize-{name}.json").read_text()) if (out / f"quantize-{name}.json").is_file() else {}
    dec = q.get("decoder_bytes") or {}
    auto = q.get("auto") or {}
    return {
        "system": name, "spec": spec.to_dict() if spec else None, "verdict": rep.verdict, "n": o["n"],
        "acc_reference": o["reference"]["acc"], "acc_candidate": o["candidate"]["acc"], "acc_delta": o["delta"]["acc_delta"],
        "acc_delta_ci95": o["delta"]["acc_delta_ci95"], "miou_delta": o["delta"]["miou_delta"],
        "miou_delta_ci95": o["delta"]["miou_delta_ci95"], "hit_to_miss": len(o["delta"]["hit_to_miss"]),
        "miss_to_hit": len(o["delta"]["miss_to_hit"]), "split_mean": rep.data.get("split_mean"),
        "failures": rep.failures, "decoder_fraction": round(dec["quantized"] / dec["full"], 4) if dec else None,
        "layer_formats": (auto.get("summary") or {}).get("formats"), "validate_s": round(time.perf_counter() - t0, 1),
    }


def versus(out: Path, name: str, base: str) -> dict | None:
    """Paired deltas of system `name` against system `base` on the same samples (both validated in `out`)."""
    from egm_edge.validate.stats import paired

    def rows(system):
        f = out / "validate" / system / "predictions-candidate.jsonl"
        return {r["id"]: r for r in map(json.loads, f.read_text().splitlines())} if f.is_file() else None

    a, b = rows(name), rows(base)
    if a is None or b is None or name == base:
        return None
    return paired(a, b, sorted(set(a) & set(b)), seed=0)


def table(rows: list[dict]) -> str:
    head = ("| system | decoder bytes | layers | Acc@0.5 drop | mIoU delta (95% CI) | split-mean mIoU delta | flips h->m / m->h | gate "
            "| mIoU vs base (95% CI) |\n|---|---:|---|---:|---|---:|---|---|---|")
    lines = [head]
    for r in rows:
        sm = ((r.get("split_mean") or {}).get("delta") or {}).get("miou_delta")
        fmts = ", ".join(f"{k} {v}" for k, v in (r["layer_formats"] or {}).items()) or "-"
        frac = f"{r['decoder_fraction']:.0%}" if r["decoder_fraction"] else "-"
        lines.append(f"| {r['system']} | {frac} | {fmts} | {-r['acc_delta']:+.2f} | {r['miou_delta']:+.2f} "
                     f"[{r['miou_delta_ci95'][0]:+.2f}, {r['miou_delta_ci95'][1]:+.2f}] | "
                     f"{sm:+.2f} | {r['hit_to_miss']} / {r['miss_to_hit']} | {r['verdict'].upper()} | {_vs(r.get('versus'))} |")
    return "\n".join(lines)


def _vs(v) -> str:
    if not v:
        return "-"
    ci = v["miou_delta_ci95"]
    return f"{v['miou_delta']:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="fresh samples of the demo's stream")
    ap.add_argument("--systems", default="int4_awq,auto@6,auto@6:int4_awq")
    ap.add_argument("--out", default="runs/int4_gate")
    ap.add_argument("--model", default=None, help="default: the embedded tiny grounder")
    ap.add_argument("--base", default=None, help="a system measured in --out that every row is also compared with, paired")
    ap.add_argument("--table-only", action="store_true", help="print the table of results.json (with --base) and measure nothing")
    args = ap.parse_args(argv)
    from egm_edge.assets import default_model_dir

    model = Path(args.model) if args.model else default_model_dir()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = dataset(out, args.n)
    reference = bundle(model, out, "full")
    rows = []
    results = out / "results.json"
    old = {r["system"]: r for r in json.loads(results.read_text())} if results.is_file() else {}
    if args.table_only:
        rows = [{**r, "versus": versus(out, r["system"], args.base) if args.base else None} for r in old.values()]
        print(table(rows))
        return 0
    for name in [s.strip() for s in args.systems.split(",") if s.strip()]:
        rows.append(measure(model, out, data, name, parse_system(name), reference))
        rows[-1]["versus"] = versus(out, name, args.base) if args.base else None
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        old[name] = rows[-1]
        results.write_text(json.dumps(list(old.values()), indent=2) + "\n")
    print(f"\n{args.n} samples (seed {DEMO_SEED}), gate: the validate default\n")
    print(table(rows))
    print(f"\nwrote {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
