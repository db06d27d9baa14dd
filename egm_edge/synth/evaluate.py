"""Score a grounding runner on synthetic samples for several thinking budgets.

Contract: `evaluate(runner, samples, budgets)` calls `runner.ground(image,
sent, think_budget=b, task=...)` (anything with the ReferenceRunner's `ground`)
for every sample and budget, greedy, and returns one JSON-ready dict per budget:
Acc@0.5 (IoU strictly above 0.5, as EGM), mean IoU, mean think tokens, the
fraction of budget-forced closes, and the same per split and per task. Samples
are `synth.Sample`s (rendered in memory) or EGM JSONL records with an absolute
`image` path. Torch-free; the runner owns the model.
"""

from __future__ import annotations

import time
from collections import defaultdict

from egm_edge.grounding import hit, iou


def budget_name(b: int | None) -> str:
    return "none" if b is None else str(b)


def _items(samples):
    from egm_edge.synth.dataset import Sample
    from egm_edge.synth.world import render

    for s in samples:
        if isinstance(s, Sample):
            yield render(s.scene), s.expr.sent, s.task, s.expr.type, tuple(s.box)
        else:
            yield s["image"], s["sent"], s.get("task", "vanilla"), s.get("split", "all"), tuple(s["bbox"])


def _summary(rows: list[dict]) -> dict:
    n = len(rows)
    return {
        "n": n,
        "acc50": sum(r["hit"] for r in rows) / n if n else 0.0,
        "miou": sum(r["iou"] for r in rows) / n if n else 0.0,
        "think_tokens": sum(r["think_tokens"] for r in rows) / n if n else 0.0,
        "budget_forced": sum(r["budget_forced"] for r in rows) / n if n else 0.0,
        "no_box": sum(r["no_box"] for r in rows) / n if n else 0.0,
    }


def evaluate(runner, samples, budgets=(None, 0), progress=None, keep_rows: bool = False, max_new_tokens: int = 4096) -> dict[str, dict]:
    """{budget name: {"all": summary, "split": {split: summary}, "task": {task: summary}, "seconds": s}}."""
    items = list(_items(samples))
    out: dict[str, dict] = {}
    for b in budgets:
        t0 = time.perf_counter()
        rows = []
        for image, sent, task, split, box in items:
            r = runner.ground(image, sent, think_budget=b, task=task, max_new_tokens=max_new_tokens)
            v = iou(r.box, box) if r.box is not None else 0.0
            rows.append({
                "split": split, "task": task, "iou": v, "hit": hit(v), "think_tokens": r.think_tokens,
                "budget_forced": bool(r.budget_forced), "no_box": r.box is None, "text": r.text,
            })
            if progress:
                progress(budget_name(b), len(rows), len(items))
        by_split, by_task = defaultdict(list), defaultdict(list)
        for row in rows:
            by_split[row["split"]].append(row)
            by_task[row["task"]].append(row)
        out[budget_name(b)] = {
            "all": _summary(rows),
            "split": {k: _summary(v) for k, v in sorted(by_split.items())},
            "task": {k: _summary(v) for k, v in sorted(by_task.items())},
            "seconds": round(time.perf_counter() - t0, 1),
            **({"rows": rows} if keep_rows else {}),
        }
    return out


def table(results: dict[str, dict]) -> str:
    """A Markdown table: one row per budget, Acc@0.5 / mIoU overall and Acc@0.5 per split."""
    splits = sorted({s for r in results.values() for s in r["split"]})
    head = "| think budget | Acc@0.5 | mIoU | mean think tokens | " + " | ".join(splits) + " |"
    sep = "|" + "---|" * (4 + len(splits))
    lines = [head, sep]
    for name, r in results.items():
        a = r["all"]
        per = " | ".join(f"{r['split'][s]['acc50']:.3f}" if s in r["split"] else "-" for s in splits)
        lines.append(f"| {name} | {a['acc50']:.3f} | {a['miou']:.3f} | {a['think_tokens']:.1f} | {per} |")
    return "\n".join(lines)
