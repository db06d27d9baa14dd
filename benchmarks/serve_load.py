"""`egm-edge serve` under load: one request at a time against in-flight batching, EGM's request shape.

Not a test (timings on shared machines are noisy): a script that prints a table and writes JSON and a PNG.
For each bundle and each server mode (`--max-batch 1`: one request at a time, as before batching;
`--max-batch 8`: in-flight batching) it starts `egm-edge serve` in its own process on loopback, then for each
concurrency level sends EGM's evaluation request (verl/scripts/sglang_infer.py: one user message with the image
as a base64 data URL and the Qwen3 grounding text, temperature 0, top_p 1, presence_penalty 0, max_tokens,
top_k 20, repetition_penalty 1.0) from that many client threads at once, and records:
- requests/s and completion tokens/s as the clients see them (wall clock of the level);
- decode tokens/s inside the decoder graphs (the server's /health batch counters: rows decoded / seconds in
  decode calls), which is what batching multiplies;
- p50 / p95 request latency, errors (any non-200), the server process's peak RSS (VmHWM).

    python benchmarks/serve_load.py [--bundle NAME=DIR ...] [--levels 1,8,64] [--requests N] [--max-tokens 64]
                                    [--threads 2] [--out FILE.json]

Without --bundle it builds the embedded tiny grounder's CPU bundle into ~/.cache/egm-edge/bench/serve-load
(reused when present). The EGM-2B architecture int4 bundle comes from benchmarks/egm2b_cpu.py
(`--bundle egm2b-int4=runs/egm2b/egm-int4.bundle`); give it `--levels 1,8` (each request's vision and
prefill run alone, ~3 s each at 2 threads, so level 64 takes many minutes).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "egm-edge" / "bench" / "serve-load"
MODES = {"one-at-a-time": 1, "batched": 8}
PROMPT = "Locate {sent}, output its bbox coordinates using JSON format"


def tiny_bundle() -> Path:
    """The embedded tiny grounder as a CPU bundle (export + build through the CLI), built once."""
    from egm_edge.assets import default_model_dir

    bundle, export = CACHE / "tiny-grounder.bundle", CACHE / "tiny-grounder.export"
    if not (bundle / "manifest.json").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        egm = [sys.executable, "-m", "egm_edge"]
        subprocess.run([*egm, "export", "--checkpoint", str(default_model_dir()), "--out", str(export), "--force"], check=True)
        subprocess.run([*egm, "build", "--export", str(export), "--target", "cpu", "--out", str(bundle), "--force"], check=True)
    return bundle


def requests_for(n: int) -> list[dict]:
    """n EGM request bodies on synthetic scenes (PNG data URLs), each a different image and expression."""
    from egm_edge.synth import draw, render

    out = []
    for i in range(n):
        s = draw(7, i, amodal_fraction=0.0)
        buf = io.BytesIO()
        render(s.scene).save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        out.append({"model": "egm", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url, "detail": "high"}},
            {"type": "text", "text": PROMPT.format(sent=s.expr.sent)}]}],
            "temperature": 0.0, "top_p": 1.0, "presence_penalty": 0.0, "top_k": 20, "repetition_penalty": 1.0})
    return out


def start_server(bundle: Path, max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "egm_edge", "serve", "--bundle", str(bundle), "--port", "0", "--max-batch", str(max_batch),
           "--threads", str(threads), "--request-timeout", "3600", "--max-queue", "256"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    m = re.search(r":(\d+)/v1", line)
    if not m:
        proc.kill()
        raise SystemExit(f"the server did not start: {line}{proc.stderr.read()[-2000:]}")
    return proc, f"http://127.0.0.1:{m.group(1)}"


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def post(url: str, body: dict) -> tuple[int, dict, float]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=data, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=3600) as r:
            return r.status, json.loads(r.read()), time.perf_counter() - t0
    except urllib.error.HTTPError as e:
        return e.code, {}, time.perf_counter() - t0
    except OSError as e:
        return 0, {"error": str(e)}, time.perf_counter() - t0


def peak_rss_gb(pid: int) -> float | None:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024**2, 3)
    except OSError:
        return None
    return None


def run_level(url: str, bodies: list[dict], concurrency: int, max_tokens: int) -> dict:
    before = get(url + "/health")["batch"]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda b: post(url, {**b, "max_tokens": max_tokens}), bodies))
    wall = time.perf_counter() - t0
    after = get(url + "/health")["batch"]
    ok = [r for r in results if r[0] == 200]
    lat = sorted(r[2] for r in ok)
    tokens = sum(r[1]["usage"]["completion_tokens"] for r in ok)
    rows, secs = after["rows_decoded"] - before["rows_decoded"], after["decode_s"] - before["decode_s"]
    q = lambda p: lat[min(len(lat) - 1, int(round(p * (len(lat) - 1))))] if lat else None  # noqa: E731
    return {"concurrency": concurrency, "requests": len(bodies), "errors": len(results) - len(ok), "wall_s": round(wall, 2),
            "requests_per_s": round(len(ok) / wall, 3), "client_tokens_per_s": round(tokens / wall, 1),
            "decode_tokens_per_s": round(rows / secs, 1) if secs else None, "mean_batch": round(rows / max(1, after["steps"] - before["steps"]), 2),
            "p50_s": round(q(0.5), 2) if lat else None, "p95_s": round(q(0.95), 2) if lat else None,
            "completion_tokens": tokens}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bundles = sorted({r["bundle"] for r in rows})
    fig, axes = plt.subplots(1, len(bundles), figsize=(5.5 * len(bundles), 4), squeeze=False)
    for ax, b in zip(axes[0], bundles):
        for mode in MODES:
            pts = [r for r in rows if r["bundle"] == b and r["mode"] == mode]
            ax.plot([r["concurrency"] for r in pts], [r["decode_tokens_per_s"] or 0 for r in pts], marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("decode tokens/s (server)")
        ax.set_title(b)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", action="append", default=[], metavar="NAME=DIR", help="bundles to load (default: the tiny grounder)")
    p.add_argument("--levels", default="1,8,64", help="client concurrency levels (default 1,8,64)")
    p.add_argument("--requests", type=int, default=None, help="requests per level (default: 2 x the level, at least 8)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request (default 64)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    p.add_argument("--out", type=Path, default=CACHE / "results.json")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    bundles = dict(b.split("=", 1) for b in args.bundle) if args.bundle else {"tiny-grounder": str(tiny_bundle())}
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    rows = []
    for name, bundle in bundles.items():
        for mode in modes:
            proc, url = start_server(Path(bundle), MODES[mode], args.threads)
            try:
                post(url, {**requests_for(1)[0], "max_tokens": 4})  # warm-up (graphs loaded, first allocations)
                for c in levels:
                    n = args.requests or max(8, 2 * c)
                    r = {"bundle": name, "mode": mode, **run_level(url, requests_for(n), c, args.max_tokens)}
                    r["server_peak_rss_gb"] = peak_rss_gb(proc.pid)
                    rows.append(r)
                    print(json.dumps(r), flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    print(f"\nmax_tokens {args.max_tokens}; threads {args.threads}; server modes: --max-batch 1 vs 8")
    print("| bundle | mode | clients | requests | errors | req/s | client tok/s | decode tok/s (server) | mean batch | "
          "p50 s | p95 s | server peak RSS GB |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['bundle']} | {r['mode']} | {r['concurrency']} | {r['requests']} | {r['errors']} | {r['requests_per_s']} | "
              f"{r['client_tokens_per_s']} | {r['decode_tokens_per_s']} | {r['mean_batch']} | {r['p50_s']} | {r['p95_s']} | "
              f"{r['server_peak_rss_gb']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"max_tokens": args.max_tokens, "threads": args.threads, "rows": rows}, indent=2) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
