#!/usr/bin/env python
"""Accuracy of a grounding checkpoint on a fresh synthetic set, per thinking budget and split.

Runs the checkpoint through `egm_edge.reference.ReferenceRunner` (greedy, exact
think budget, hard close) on `--n` samples of stream `--seed` (default 20261122,
never used in training: training uses streams seed, seed+1, seed+2 of its own
--seed, small integers) and prints a Markdown table of Acc@0.5 (IoU > 0.5) and
mean IoU per budget, with Acc@0.5 per split; `--json` writes everything.

    python scripts/eval_tiny_grounder.py egm_edge/assets/tiny-grounder --n 200 --budgets none,0,8,16,32,64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EVAL_SEED = 20261122


def parse_budgets(text: str) -> list[int | None]:
    return [None if b.strip() == "none" else int(b) for b in text.split(",") if b.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, nargs="?", help="checkpoint folder (default: the embedded tiny grounder)")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--amodal-fraction", type=float, default=0.15)
    p.add_argument("--budgets", default="none,0,8,16,32,64")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="write the full results (with per-sample rows) here")
    args = p.parse_args(argv)

    import torch

    from egm_edge.assets import default_model_dir
    from egm_edge.reference import ReferenceRunner
    from egm_edge.synth import draw
    from egm_edge.synth.evaluate import evaluate, table

    torch.set_num_threads(args.threads)
    model = args.model or default_model_dir()
    runner = ReferenceRunner.open(model)
    samples = [draw(args.seed, i, args.amodal_fraction) for i in range(args.n)]
    budgets = parse_budgets(args.budgets)

    def progress(b, k, n):
        if k % 50 == 0 or k == n:
            print(f"  budget {b}: {k}/{n}", file=sys.stderr, flush=True)

    t0 = time.time()
    res = evaluate(runner, samples, budgets, progress=progress, keep_rows=bool(args.json), max_new_tokens=512)
    print(f"model {model}, {args.n} samples of seed {args.seed} (amodal fraction {args.amodal_fraction}), "
          f"{time.time() - t0:.0f} s\n")
    print(table(res))
    if args.json:
        args.json.write_text(json.dumps({"model": str(model), "seed": args.seed, "n": args.n, "results": res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
