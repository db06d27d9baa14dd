"""The planner's CPU decode prediction against what the CPU bundle measures on this machine.

Not a test (timings on shared machines are noisy): a script that prints a table and
writes JSON. In one run it
1. measures this machine's streaming read bandwidth (numpy, 256 MiB, best of 5);
2. writes a random Qwen3-VL checkpoint of a mid size (default: text hidden 1024, 8
   layers, intermediate 4096 with the embedded grounder's tokenizer; decode speed does
   not depend on weight values), unless --work already holds it;
3. builds CPU bundles from it with `egm-edge build --model ... --target cpu` for each
   --recipe (full = fp32, int4_awq, int8_sq), reusing bundles already built;
4. grounds one image per bundle `--repeats` times (a fixed 48-token reasoning budget,
   so every run decodes the same number of tokens) and keeps the median decode
   ms/token;
5. asks the planner (`egm_edge.plan.decode_ms_per_token`, target cpu) for the same
   model, precision and context, and derives what build/targets/cpu.toml [calibration]
   cites: the fp32 bundle's achieved share of the measured read bandwidth
   (decode_efficiency) and each quantized bundle's effective decode throughput
   (decode_gops: 2 x MACs per token / measured time; low-bit CPU GEMV is bound by its
   dequantising kernels, not by memory).

    python benchmarks/cpu_decode_vs_plan.py [--work runs/cpu_plan] [--recipes full,int4_awq] [--out runs/cpu_plan.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

def read_bandwidth_gbs(mib: int = 256, repeats: int = 5) -> float:
    a = np.ones(mib * 1024 * 1024 // 8, dtype=np.float64)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9


def make_checkpoint(d: Path, hidden: int, layers: int, intermediate: int) -> Path:
    from egm_edge.assets import default_model_dir
    from egm_edge.reference.checkpoint import write_tiny_checkpoint

    if (d / "config.json").is_file():
        return d
    heads = max(2, hidden // 128)
    text = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // 2), "head_dim": 128, "intermediate_size": intermediate,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                "mrope_interleaved": True}}
    vision = {"depth": 2, "hidden_size": 256, "intermediate_size": 1024, "num_heads": 4, "out_hidden_size": hidden,
              "deepstack_visual_indexes": [0]}
    return write_tiny_checkpoint(d, default_model_dir(), seed=0, text=text, vision=vision, tie_word_embeddings=True)


def build_bundle(model: Path, recipe: str, out: Path) -> Path:
    if (out / "manifest.json").is_file():
        return out
    cmd = [sys.executable, "-m", "egm_edge", "build", "--model", str(model), "--recipe", recipe, "--target", "cpu",
           "--calib", "synth", "--out", str(out)]
    subprocess.run(cmd, check=True)
    return out


def measure(bundle: Path, repeats: int, threads: int | None) -> dict:
    from egm_edge.runtime import Grounder
    from egm_edge.synth import draw, render

    g = Grounder.open(bundle, threads=threads)
    s = draw(7, 0)
    image = render(s.scene)
    runs = []
    for _ in range(repeats + 1):  # the first run warms the sessions up and is dropped
        r = g.ground(image, s.expr.sent, think_budget=48, task=s.task)
        runs.append(r.timings)
    runs = runs[1:]
    return {"ms_per_token": statistics.median(t["ms_per_token"] for t in runs),
            "context": runs[0]["prompt_tokens"] + runs[0]["output_tokens"] // 2,
            "decode_tokens": runs[0]["output_tokens"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("runs/cpu_plan"))
    p.add_argument("--recipes", default="full,int4_awq")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: the runtime's)")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default: WORK/results.json)")
    args = p.parse_args(argv)

    from egm_edge.builder.pipeline import full_precision
    from egm_edge.models.hf_config import spec_from_config
    from egm_edge.plan import _Model, calibration_for, decode_ms_per_token
    from egm_edge.targets import load_target

    args.work.mkdir(parents=True, exist_ok=True)
    bw = read_bandwidth_gbs()
    model = make_checkpoint(args.work / "model", args.hidden, args.layers, args.intermediate)
    spec = spec_from_config(model / "config.json")
    target = load_target("cpu")
    rows = []
    for recipe in [r.strip() for r in args.recipes.split(",") if r.strip()]:
        bundle = build_bundle(model, recipe, args.work / f"bundle-{recipe}")
        m = measure(bundle, args.repeats, args.threads)
        precision = full_precision(target) if recipe == "full" else recipe
        pred = decode_ms_per_token(spec, target, precision, m["context"])
        cost = _Model(spec, target, precision, "fp32")
        nbytes, ms = cost.decode_weight_bytes, m["ms_per_token"]
        rows.append({"recipe": recipe, "precision": precision, "weight_bytes_per_token": nbytes,
                     "measured_ms_per_token": ms, "predicted_ms_per_token": round(pred, 3),
                     "predicted_over_measured": round(pred / ms, 3), "context": m["context"],
                     "decode_tokens": m["decode_tokens"], "floor_ms_at_measured_bandwidth": round(nbytes / (bw * 1e9) * 1e3, 3),
                     "achieved_read_gbs": round(nbytes / (ms * 1e6), 2),
                     "effective_gops": round(cost.decode_flops(m["context"]) / (ms * 1e6), 2)})
    cal = calibration_for(target)
    full = next((r for r in rows if r["recipe"] == "full"), None)
    fitted = {"memory_bandwidth_gbs": round(bw, 1),
              "decode_efficiency": round(full["achieved_read_gbs"] / bw, 3) if full else None,
              "decode_gops": {r["precision"]: r["effective_gops"] for r in rows if r["recipe"] != "full"}}
    result = {"machine_read_bandwidth_gbs": round(bw, 2), "target_bandwidth_gbs": target.memory_bandwidth_gbs,
              "calibration_used": {"decode_efficiency": cal.decode_efficiency, "layer_overhead_us": cal.layer_overhead_us,
                                   "decode_gops": cal.decode_gops},
              "measured_calibration": fitted, "threads": args.threads,
              "model": {"hidden": args.hidden, "layers": args.layers, "intermediate": args.intermediate,
                        "vocab": spec.text.vocab},
              "rows": rows}
    print(f"machine read bandwidth {bw:.1f} GB/s (cpu.toml says {target.memory_bandwidth_gbs})")
    print("| recipe | weights read/token | floor ms | measured ms/token | achieved GB/s | effective GOPS | predicted ms/token | predicted/measured |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['weight_bytes_per_token'] / 1e6:.1f} MB | {r['floor_ms_at_measured_bandwidth']:.1f} | "
              f"{r['measured_ms_per_token']:.1f} | {r['achieved_read_gbs']:.1f} | {r['effective_gops']:.1f} | "
              f"{r['predicted_ms_per_token']:.1f} | {r['predicted_over_measured']:.2f} |")
    print(f"measured calibration: {json.dumps(fitted)} (in use: decode_efficiency {cal.decode_efficiency}, "
          f"decode_gops {cal.decode_gops}, bandwidth {target.memory_bandwidth_gbs} GB/s)")
    out = args.out or args.work / "results.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
