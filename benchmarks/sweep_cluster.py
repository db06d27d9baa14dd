"""The same sweep in-process vs on a local Ray cluster of 2 one-CPU worker nodes: measurement wall time and overhead.

Not a test (timings on shared machines are noisy): a script that prints a table and
writes JSON. The embedded tiny grounder, recipe full, on a fresh synthetic set; the
bundle is built once and every run reuses it (copied into its --out), so each figure
is the measurement phase (`SweepResult.measure_s`: the executor running the units).

- in-process: today's default, one unit per (recipe, budget), ONNX Runtime on all cores
  (and again with one intra-op thread, what each Ray unit gets).
- ray (cold): a head with no CPUs (the driver's) and 2 worker nodes of 1 CPU each; units
  of `--shard-size` samples; the first run pays for worker processes, unpacking the
  bundle from the object store and one warm-up per worker.
- ray (warm): the same sweep again into a fresh folder on the same cluster (workers,
  their unpacked bundle and warm predictors reused).

Overhead per unit = (wall x workers - seconds inside the tasks) / units: worker time a
unit costs outside its own code (scheduling, arguments, result transfer, the driver's writes).

    python benchmarks/sweep_cluster.py [--n 48] [--budgets 0,32,none] [--shard-size 4] [--out runs/sweep_cluster.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

MB = 1 << 20


def _sweep(data, out: Path, args, bundle: Path | None = None, **kw):
    from egm_edge.assets import default_model_dir
    from egm_edge.sweep import sweep

    if bundle is not None:
        shutil.copytree(bundle, out / "bundles" / "full")
        (out / "records.jsonl").touch()
    return sweep(default_model_dir(), recipes=("full",), budgets=args.budgets, targets=("cpu",), data=data, out_dir=out,
                 max_answer_tokens=64, progress=False, **kw)


def _figures(name: str, res, workers: int) -> dict:
    units = sum(n["units"] for n in res.nodes.values())
    inside = sum(n["seconds"] for n in res.nodes.values())
    lat = [r["latency"]["mean_ms"] for r in res.records if r["target"] == "cpu"]
    return {"run": name, "workers": workers, "units": units, "measure_s": res.measure_s,
            "task_s": round(inside, 3), "overhead_ms_per_unit": round((res.measure_s * workers - inside) / units * 1000, 1) if units and workers > 1 else None,
            "mean_latency_ms": round(sum(lat) / len(lat), 1), "acc": [r["accuracy"]["acc"] for r in res.records if r["target"] == "cpu"],
            "nodes": {k: {"units": v["units"], "seconds": round(v["seconds"], 2)} for k, v in res.nodes.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=48, help="synthetic samples (default 48)")
    ap.add_argument("--budgets", default="0,32,none", help="think budgets (default 0,32,none)")
    ap.add_argument("--shard-size", type=int, default=4, help="samples per Ray unit (default 4)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here too")
    args = ap.parse_args()
    args.budgets = [b.strip() for b in args.budgets.split(",")]

    import ray
    from ray.cluster_utils import Cluster

    from egm_edge.assets import default_model_dir
    from egm_edge.sweep.bundles import bundle_for
    from egm_edge.synth import generate

    root = Path(tempfile.mkdtemp(prefix="sweep-cluster-"))
    os.environ.setdefault("EGM_EDGE_CACHE", str(root / "cache"))  # workers unpack the bundle here, fresh each run
    try:
        data = generate(root / "data", args.n, seed=11)
        t0 = time.perf_counter()
        bundle, _ = bundle_for(default_model_dir(), "full", root / "build", max_answer_tokens=64, max_seq_len=4096)
        build_s = time.perf_counter() - t0
        rows = [_figures("in-process", _sweep(data, root / "local", args, bundle), 1)]
        os.environ["EGM_EDGE_THREADS"] = "1"  # what each Ray unit gets (its one CPU), for comparison
        try:
            rows.append(_figures("in-process, 1 thread", _sweep(data, root / "local-1t", args, bundle), 1))
        finally:
            del os.environ["EGM_EDGE_THREADS"]  # before the cluster starts: its workers inherit this environment
        c = Cluster(initialize_head=True, connect=True,
                    head_node_args=dict(num_cpus=0, object_store_memory=100 * MB, include_dashboard=False))
        try:
            for _ in range(2):
                c.add_node(num_cpus=1, object_store_memory=100 * MB)
            c.wait_for_nodes()
            for name in ("ray (cold)", "ray (warm)"):
                res = _sweep(data, root / name.replace(" ", "-").strip("()"), args, bundle, cluster="auto",
                             shard_size=args.shard_size)
                rows.append(_figures(name, res, 2))
        finally:
            ray.shutdown()
            c.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    base = rows[0]["measure_s"]
    print(f"tiny grounder, recipe full, budgets {','.join(args.budgets)}, {args.n} samples, shard size {args.shard_size}; "
          f"bundle build (once) {build_s:.1f} s")
    print("| run | workers | units | measurement wall s | speed-up | seconds inside tasks | overhead ms/unit | mean latency ms | Acc@0.5 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['workers']} | {r['units']} | {r['measure_s']:.2f} | {base / r['measure_s']:.2f}x | {r['task_s']:.2f} | "
              f"{r['overhead_ms_per_unit']} | {r['mean_latency_ms']} | {r['acc']} |")
    doc = {"n": args.n, "budgets": args.budgets, "shard_size": args.shard_size, "bundle_build_s": round(build_s, 1), "runs": rows,
           "cpus": os.cpu_count(), "load_average": os.getloadavg()}  # the machine is shared: other jobs' load
    print(json.dumps(doc, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
