#!/usr/bin/env python
"""Grounding accuracy of quantized checkpoints against the full model on a fixed synthetic set.

For each configuration (full, then each recipe with and without
--calib-with-reasoning) this quantizes the model with `egm_edge.quantize`
(calibration recipe `--calib`, default calibration/synth.toml, whose seed stream is
neither training's nor the evaluation's), runs every checkpoint through the
reference runner (quantized ones through the dequantizing loader, FP8/INT8 input
fake-quant on) on `--n` samples of stream `--seed`, greedy with unlimited
thinking, and prints a Markdown table: Acc@0.5, mean IoU, samples that flipped
hit->miss / miss->hit against the full model, the fraction of samples whose whole
greedy output (reasoning + answer) equals the full model's, and the fidelity figures of each
manifest (weight SNR, held-out logit cosine and top-1 agreement). `--out` keeps
the checkpoints and writes results.json and results.md.

    python scripts/quantize_accuracy.py --n 200 --recipes fp8,int4_awq --out /tmp/qacc
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EVAL_SEED = 20261122  # the tiny grounder's evaluation stream (scripts/eval_tiny_grounder.py)


def block_size_for(model_dir: Path, recipe: str) -> int | None:
    """128 (the recipe's default) when the text widths allow it, else 64."""
    from egm_edge.quantize.recipes import RECIPES

    if RECIPES[recipe].weights != "int4":
        return None
    t = json.loads((model_dir / "config.json").read_text())["text_config"]
    widths = (t["hidden_size"], t["intermediate_size"], t["num_attention_heads"] * t.get("head_dim", t["hidden_size"] // t["num_attention_heads"]))
    return None if all(w % 128 == 0 for w in widths) else 64


def score(model_dir: Path, samples, threads: int) -> dict:
    import torch

    from egm_edge.reference import ReferenceRunner
    from egm_edge.synth.evaluate import evaluate

    torch.set_num_threads(threads)
    runner = ReferenceRunner.open(model_dir)
    res = evaluate(runner, samples, [None], keep_rows=True, max_new_tokens=512)["none"]
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, nargs="?", help="checkpoint folder (default: the embedded tiny grounder)")
    p.add_argument("--recipes", default="fp8,int4_awq")
    p.add_argument("--calib", type=Path, default=REPO / "calibration" / "synth.toml")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("/tmp/egm-quantize-accuracy"))
    p.add_argument("--no-reasoning-variant", action="store_true", help="skip the --calib-with-reasoning runs")
    args = p.parse_args(argv)

    from egm_edge.assets import default_model_dir
    from egm_edge.quantize import quantize
    from egm_edge.synth import draw

    model = args.model or default_model_dir()
    samples = [draw(args.seed, i) for i in range(args.n)]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = {}
    t0 = time.time()
    rows["full"] = {"eval": score(model, samples, args.threads)}
    print(f"full: Acc@0.5 {rows['full']['eval']['all']['acc50']:.3f} ({time.time() - t0:.0f} s)", file=sys.stderr)
    for recipe in [r for r in args.recipes.split(",") if r]:
        for reasoning in (False, True) if not args.no_reasoning_variant else (False,):
            name = recipe + ("+reasoning" if reasoning else "")
            t0 = time.time()
            out = args.out / name.replace("+", "_")
            block = block_size_for(model, recipe)
            quantize(model, recipe, args.calib, out, calib_with_reasoning=reasoning, block_size=block, force=True,
                     cache_dir=args.out / "cache", progress=False)
            manifest = json.loads((out / "manifest.json").read_text())
            t_q = time.time() - t0
            rows[name] = {"eval": score(out, samples, args.threads), "fidelity": manifest.get("fidelity"),
                          "block_size": block, "quantize_s": round(t_q, 1), "calibration_sha256": manifest["calibration"]["sha256"]}
            print(f"{name}: Acc@0.5 {rows[name]['eval']['all']['acc50']:.3f} (quantize {t_q:.0f} s, total {time.time() - t0:.0f} s)",
                  file=sys.stderr)

    full_hits = [r["hit"] for r in rows["full"]["eval"]["rows"]]
    full_text = [r["text"] for r in rows["full"]["eval"]["rows"]]
    lines = [f"model {model}; {args.n} synthetic samples of seed {args.seed}; greedy, unlimited thinking; calibration {args.calib.name}", "",
             "| config | Acc@0.5 | mIoU | hit->miss | miss->hit | same output as full | think tokens | weight SNR min/median (dB) | logit cos | top-1 agree |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        ev = row["eval"]
        hits = [r["hit"] for r in ev["rows"]]
        lost = sum(f and not h for f, h in zip(full_hits, hits))
        won = sum(h and not f for f, h in zip(full_hits, hits))
        same = sum(a == b["text"] for a, b in zip(full_text, ev["rows"])) / len(full_text)
        row["same_output_as_full"] = same
        fid = row.get("fidelity") or {}
        w, lg = fid.get("weights") or {}, fid.get("logits") or {}
        snr = f"{w['snr_db_min']:.1f} / {w['snr_db_median']:.1f}" if w.get("layers") else "-"
        cos = f"{lg['logit_cosine_mean']:.4f}" if lg.get("positions") else "-"
        top1 = f"{100 * lg['top1_agreement']:.1f}%" if lg.get("positions") else "-"
        label = name + (f" (block {row['block_size']})" if row.get("block_size") else "")
        lines.append(f"| {label} | {ev['all']['acc50']:.3f} | {ev['all']['miou']:.3f} | {lost} | {won} | {100 * same:.0f}% | "
                     f"{ev['all']['think_tokens']:.1f} | {snr} | {cos} | {top1} |")
        row["eval"].pop("rows")
    text = "\n".join(lines)
    print(text)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps({"model": str(model), "seed": args.seed, "n": args.n, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
