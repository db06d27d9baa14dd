#!/usr/bin/env python3
"""Device check: on a machine with an NVIDIA GPU, build the embedded tiny grounder's TensorRT engines and check them.

    python scripts/gpu_check.py [--target NAME] [--out DIR] [--samples N] [--no-pytest]

Steps, each a row of the table printed at the end (and written to DIR/gpu_check.json):
1. the GPU (nvidia-smi: name, compute capability, memory) and the target profile it maps to
   (build/targets: the profiles with that compute capability, the one whose memory is nearest);
2. TensorRT importable (its version);
3. `egm-edge build --model <tiny grounder> --recipe full --target T` (export with the target's
   lowering, then the bundle), then `egm-edge build --finalize` (the engines, compiled here);
4. the same synthetic samples grounded with the TensorRT executor and with ONNX Runtime on the
   bundle's ONNX IR: per-sample IoU between the two boxes (agreement), think tokens, ms/token;
5. `pytest -m gpu` (the tests that need CUDA/TensorRT).
Without nvidia-smi or a GPU it stops at once: one sentence, exit status 2. With a GPU but no
TensorRT it still runs the gpu-marked tests, prints the table, then says why the engines were
not built, exit status 2. Any failed step: exit status 1. Standard library + egm-edge only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # egm_edge from this checkout, installed or not
NO_DEVICE = 2


class Stop(Exception):
    """The check cannot go on here: one sentence for the user."""


def gpu_facts() -> dict:
    """{"name", "compute_capability", "memory_gib", "driver"} of GPU 0, or Stop with why there is none."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise Stop("No NVIDIA GPU here: nvidia-smi is not on PATH; run scripts/gpu_check.py on a machine with an "
                   "NVIDIA GPU, its driver and TensorRT.")
    q = [smi, "--query-gpu=name,compute_cap,memory.total,driver_version", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(q, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Stop(f"No NVIDIA GPU here: nvidia-smi did not answer ({e}); check the driver, then rerun.") from None
    line = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 4:
        why = (out.stderr or out.stdout).strip().splitlines()[:1] or [f"exit status {out.returncode}"]
        raise Stop(f"No NVIDIA GPU here: nvidia-smi lists none ({why[0]}); run this on a machine with an NVIDIA GPU.")
    name, cc, mem_mib, driver = parts
    try:
        mem = round(float(mem_mib) / 1024, 1)
    except ValueError:  # a Jetson's nvidia-smi has no memory.total: its GPU shares the system memory
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return {"name": name, "compute_capability": cc, "memory_gib": mem, "driver": driver}


def pick_target(gpu: dict, wanted: str | None) -> str:
    """The target profile for this GPU: `wanted` if given, else the profiles with its compute capability, nearest memory."""
    from egm_edge.targets import list_targets, load_target

    if wanted:
        return load_target(wanted).name  # an unknown name: the registry's one sentence
    same = [t for t in map(load_target, list_targets()) if t.kind != "cpu" and t.compute_capability == gpu["compute_capability"]]
    if not same:
        raise Stop(f"No target profile in build/targets has compute capability {gpu['compute_capability']} ({gpu['name']}); "
                   "pass --target NAME or add a profile.")
    return min(same, key=lambda t: abs(t.memory_gib - gpu["memory_gib"])).name


def tensorrt_version() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return str(getattr(tensorrt, "__version__", "unknown"))


def egm(*args: str, timeout: int = 1800) -> tuple[int, str]:
    """Run `egm-edge ARGS` with this Python; (exit status, last lines of its output)."""
    p = subprocess.run([sys.executable, "-m", "egm_edge", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    return p.returncode, "\n".join((p.stdout + p.stderr).strip().splitlines()[-5:])


def compare_executors(bundle: Path, n: int) -> dict:
    """Ground n synthetic samples with the TensorRT executor and with ONNX Runtime on the same bundle."""
    from egm_edge.grounding import iou
    from egm_edge.runtime.grounder import Grounder
    from egm_edge.synth import draw, render

    samples = [draw(7, i) for i in range(n)]
    out = {}
    for executor in ("tensorrt", "onnxruntime"):
        g = Grounder.open(bundle, executor=executor, image_cache_size=0)
        g.ground(render(samples[0].scene), samples[0].expr.sent, think_budget=16)  # warm-up
        rows = []
        for s in samples:
            r = g.ground(render(s.scene), s.expr.sent, think_budget=16, task=s.task)
            rows.append({"box": r.box, "iou_gt": iou(r.box, s.box), "think": r.think_tokens,
                         "ms_per_token": r.timings.get("ms_per_token"), "total_ms": r.timings.get("total")})
        out[executor] = rows
    trt, ort = out["tensorrt"], out["onnxruntime"]
    agree = [iou(a["box"], b["box"]) if a["box"] and b["box"] else float(a["box"] == b["box"]) for a, b in zip(trt, ort)]
    mean = lambda xs: round(sum(xs) / len(xs), 3) if xs else None  # noqa: E731
    return {"samples": n, "iou_trt_vs_ort_mean": mean(agree), "iou_trt_vs_ort_min": round(min(agree), 3),
            "same_think_tokens": sum(a["think"] == b["think"] for a, b in zip(trt, ort)),
            **{f"{k}_ms_per_token": mean([r["ms_per_token"] for r in v if r["ms_per_token"]]) for k, v in out.items()},
            **{f"{k}_mean_ms": mean([r["total_ms"] for r in v if r["total_ms"]]) for k, v in out.items()},
            **{f"{k}_acc_vs_gt": mean([float(r["iou_gt"] > 0.5) for r in v]) for k, v in out.items()}}


def run_pytest(timeout: int) -> tuple[str, str]:
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
                           capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return "failed", f"timed out after {timeout} s"
    last = (p.stdout.strip().splitlines() or ["(no output)"])[-1]
    return ("ok" if p.returncode in (0, 5) else "failed"), last  # 5: nothing collected


def table(rows: list[tuple[str, str, str]]) -> str:
    w = [max(len(r[i]) for r in rows + [("step", "status", "detail")]) for i in range(2)]
    lines = [f"{'step':<{w[0]}}  {'status':<{w[1]}}  detail", f"{'-' * w[0]}  {'-' * w[1]}  ------"]
    return "\n".join(lines + [f"{a:<{w[0]}}  {b:<{w[1]}}  {c}" for a, b, c in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", help="target profile to build for (default: from the GPU's compute capability and memory)")
    ap.add_argument("--out", default="gpu-check", help="work folder: bundle, gpu_check.json (default ./gpu-check)")
    ap.add_argument("--samples", type=int, default=8, help="synthetic samples grounded per executor (default 8)")
    ap.add_argument("--no-pytest", action="store_true", help="skip `pytest -m gpu`")
    ap.add_argument("--pytest-timeout", type=int, default=1200, help="seconds for `pytest -m gpu` (default 1200)")
    args = ap.parse_args(argv)
    try:
        gpu = gpu_facts()
    except Stop as e:
        print(e, file=sys.stderr)
        return NO_DEVICE
    from egm_edge.assets import default_model_dir
    from egm_edge.errors import EgmError

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows, report, failed, stop = [], {"gpu": gpu}, False, None
    rows.append(("gpu", "ok", f"{gpu['name']}, SM {gpu['compute_capability']}, {gpu['memory_gib']} GiB, driver {gpu['driver']}"))
    try:
        target = pick_target(gpu, args.target)
    except (Stop, EgmError) as e:
        print(e, file=sys.stderr)
        return NO_DEVICE
    rows.append(("target", "ok", target))
    report["target"] = target
    trt = tensorrt_version()
    report["tensorrt"] = trt
    rows.append(("tensorrt", "ok" if trt else "missing", trt or "not importable: pip install egm-edge[trt] cuda-python"))
    if trt is None:
        stop = (f"TensorRT is not importable on this {gpu['name']}, so no engine was built; pip install egm-edge[trt] "
                "cuda-python (JetPack's python3-libnvinfer on a Jetson) and rerun.")
    else:
        bundle = out / f"bundle-{target}"
        t0 = time.perf_counter()
        code, tail = egm("build", "--model", str(default_model_dir()), "--recipe", "full", "--target", target,
                         "--out", str(bundle), "--force")
        rows.append(("build", "ok" if code == 0 else "failed", f"{time.perf_counter() - t0:.0f} s" if code == 0 else tail))
        if code == 0:
            t0 = time.perf_counter()
            code, tail = egm("build", "--finalize", str(bundle), "--force")
            rows.append(("finalize (engines)", "ok" if code == 0 else "failed",
                         f"{time.perf_counter() - t0:.0f} s" if code == 0 else tail))
        if code == 0:
            try:
                cmp = compare_executors(bundle, args.samples)
                report["executors"] = cmp
                rows.append(("TensorRT vs ONNX Runtime", "ok" if (cmp["iou_trt_vs_ort_min"] or 0) > 0.5 else "failed",
                             f"IoU mean {cmp['iou_trt_vs_ort_mean']} min {cmp['iou_trt_vs_ort_min']} over {cmp['samples']}; "
                             f"same think tokens {cmp['same_think_tokens']}/{cmp['samples']}"))
                rows.append(("ms/token", "ok", f"tensorrt {cmp['tensorrt_ms_per_token']}, onnxruntime {cmp['onnxruntime_ms_per_token']}"))
            except Exception as e:  # noqa: BLE001 - a device check reports every failure as a row
                rows.append(("TensorRT vs ONNX Runtime", "failed", f"{type(e).__name__}: {e}"[:200]))
        failed = any(r[1] == "failed" for r in rows)
    if not args.no_pytest:
        status, detail = run_pytest(args.pytest_timeout)
        rows.append(("pytest -m gpu", status, detail))
    failed = any(r[1] == "failed" for r in rows)
    report["rows"] = [{"step": a, "status": b, "detail": c} for a, b, c in rows]
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    print(table(rows))
    print(f"json: {out / 'gpu_check.json'}")
    if stop:
        print(stop, file=sys.stderr)
        return NO_DEVICE
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
