"""Validation statistics: per-side metrics, paired per-sample deltas with a bootstrap interval, and the gate.

Pure numpy. Inputs are prediction rows (dicts with `iou`, `hit`, `parsed`,
`think_tokens`, `latency_ms`, `error`) as `egm_edge.validate.store` writes them.
Rows with an `error` are never scored (neither hit nor miss): they are counted.
Deltas are candidate minus reference over the samples both sides completed, in
points (percent of Acc@0.5 or of mean IoU); a drop is the negative delta. The
95% interval is a seeded percentile bootstrap over samples (paired resampling).
"""

from __future__ import annotations

from typing import Any

import numpy as np

N_BOOT = 2000


def percentiles(values) -> dict[str, float | None]:
    vals = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if vals.size == 0:
        return {"p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(vals, [50, 90, 99])
    return {"p50": round(float(p50), 3), "p90": round(float(p90), 3), "p99": round(float(p99), 3)}


def side_metrics(rows: list[dict]) -> dict[str, Any]:
    """Acc@0.5 and mean IoU (points), parse-failure rate, errors, mean think tokens, latency percentiles."""
    ok = [r for r in rows if not r.get("error")]
    n = len(ok)
    think = [r["think_tokens"] for r in ok if r.get("think_tokens") is not None]
    return {
        "n": len(rows),
        "scored": n,
        "errors": len(rows) - n,
        "acc": round(100.0 * sum(bool(r["hit"]) for r in ok) / n, 3) if n else None,
        "miou": round(100.0 * sum(float(r["iou"]) for r in ok) / n, 3) if n else None,
        "parse_failure_rate": round(sum(not r["parsed"] for r in ok) / n, 4) if n else None,
        "mean_think_tokens": round(float(np.mean(think)), 2) if think else None,
        "latency_ms": percentiles(r.get("latency_ms") for r in ok),
    }


def bootstrap_ci(values, seed: int, n_boot: int = N_BOOT) -> tuple[float, float] | None:
    """95% percentile-bootstrap interval of the mean of `values` (None for no values)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return None
    if np.all(v == v[0]):
        return (float(v[0]), float(v[0]))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n_boot, v.size))
    means = v[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return (float(lo), float(hi))


def paired(cand: dict[str, dict], ref: dict[str, dict], ids: list[str], seed: int) -> dict[str, Any]:
    """Paired deltas (candidate - reference, points) over `ids` both sides completed, with 95% intervals."""
    both = [i for i in ids if i in cand and i in ref and not cand[i].get("error") and not ref[i].get("error")]
    d_iou = [100.0 * (float(cand[i]["iou"]) - float(ref[i]["iou"])) for i in both]
    d_hit = [100.0 * (int(bool(cand[i]["hit"])) - int(bool(ref[i]["hit"]))) for i in both]
    ci_acc, ci_iou = bootstrap_ci(d_hit, seed), bootstrap_ci(d_iou, seed + 1)
    rnd = lambda t: None if t is None else [round(t[0], 3), round(t[1], 3)]  # noqa: E731
    return {
        "pairs": len(both),
        "acc_delta": round(float(np.mean(d_hit)), 3) if both else None,
        "acc_delta_ci95": rnd(ci_acc),
        "miou_delta": round(float(np.mean(d_iou)), 3) if both else None,
        "miou_delta_ci95": rnd(ci_iou),
        # Identical boxes: how often quantization changed nothing the user sees (greedy decoding usually agrees token for token).
        "same_box_rate": round(sum(_box(cand[i]) == _box(ref[i]) for i in both) / len(both), 4) if both else None,
        "hit_to_miss": sorted(i for i in both if ref[i]["hit"] and not cand[i]["hit"]),
        "miss_to_hit": sorted(i for i in both if cand[i]["hit"] and not ref[i]["hit"]),
    }


def _box(row: dict):
    return (row.get("result") or {}).get("box")


def group_ids(rows: dict[str, dict], ids: list[str]) -> dict[str, list[str]]:
    """Sample ids per split (in the given order), plus 'overall' with all of them."""
    groups: dict[str, list[str]] = {}
    for i in ids:
        groups.setdefault(str(rows[i].get("split") or "-"), []).append(i)
    return {**dict(sorted(groups.items())), "overall": list(ids)}


GATE_RULES = ("significant", "point")


def gate(groups: dict[str, dict], max_acc_drop: float, max_miou_drop: float,
         rule: str = "significant") -> tuple[list[str], list[str]]:
    """(failures, held): one sentence per split and metric whose candidate drop exceeds its limit.

    rule "point" fails every such drop. Rule "significant" (the default) fails it only when the paired
    bootstrap 95% interval of the delta lies wholly below zero, i.e. the candidate is worse beyond what
    resampling these samples explains; an over-limit drop whose interval reaches zero is returned in
    `held` (reported, not failing): on a 25-sample split one flipped sample is 4 points.
    """
    if rule not in GATE_RULES:
        raise ValueError(f"unknown gate rule {rule!r}; choose from {', '.join(GATE_RULES)}")
    failures, held = [], []
    for name, g in groups.items():
        d = g["delta"]
        if not d["pairs"]:
            continue
        where = "overall" if name == "overall" else f"split {name}"
        for metric, label, limit in (("acc", "Acc@0.5", max_acc_drop), ("miou", "mean IoU", max_miou_drop)):
            drop = -d[f"{metric}_delta"]
            if drop > limit:
                ci = d[f"{metric}_delta_ci95"]
                text = (f"{where}: {label} dropped {drop:.2f} points ({g['reference'][metric]:.2f} -> {g['candidate'][metric]:.2f}, "
                        f"delta 95% CI [{ci[0]:.2f}, {ci[1]:.2f}], n={d['pairs']}), over the {limit:g}-point limit"
                        if ci else f"{where}: {label} dropped {drop:.2f} points (n={d['pairs']}), over the {limit:g}-point limit")
                if rule == "point" or (ci is not None and ci[1] < 0):
                    failures.append(text)
                else:
                    held.append(text + "; its 95% CI reaches no change, so it is within sampling noise at this n")
    return failures, held
