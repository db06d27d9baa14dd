"""Validation statistics: per-side metrics, paired per-sample deltas with a bootstrap interval, and the gate.

Pure numpy. Inputs are prediction rows (dicts with `iou`, `hit`, `parsed`,
`think_tokens`, `latency_ms`, `error`) as `egm_edge.validate.store` writes them.
Rows with an `error` are never scored (neither hit nor miss): they are counted.
Deltas are candidate minus reference over the samples both sides completed, in
points (percent of Acc@0.5 or of mean IoU); a drop is the negative delta. The
95% interval is a seeded percentile bootstrap over samples (paired resampling).
The gate judges each split and the pooled overall that has at least `MIN_GATE_N`
pairs; `split_mean` is the overall as EGM reports it (splits weighted equally).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from egm_edge.grounding.metrics import REFCOCO_SPLITS

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

# The fewest paired samples a split (or the overall) needs before the gate judges it; smaller groups are reported as
# too small to gate. Why 6: the bootstrap takes the samples it has for the population, so a group in which every sample
# flipped from hit to miss resamples to a zero-width interval at -100 points and reads as significant at any n, one
# sample included. An exact test asks more: n flips all one way have a two-sided sign-test p of 2 * 0.5**n, 0.0625 at
# n=5 and 0.031 at n=6, so below 6 no outcome of a group can be told from chance, while the bootstrap already calls 3
# one-way flips significant at n=3..8. From 6 on it still calls 4-5 one-way flips significant (sign test: p = 0.125,
# 0.0625) at any n; that is the percentile bootstrap's own optimism, which no minimum removes.
MIN_GATE_N = 6


class GateResult(NamedTuple):
    """One sentence per finding: `failures` fail the run, `held` and `too_small` are reported only."""

    failures: list[str]
    held: list[str]
    too_small: list[str]


def gate(groups: dict[str, dict], max_acc_drop: float, max_miou_drop: float,
         rule: str = "significant", min_n: int = MIN_GATE_N) -> GateResult:
    """Judge each split and the pooled overall: an over-limit candidate drop fails, is held, or its group is too small.

    A group with fewer than `min_n` paired samples is not judged under either rule: it goes to `too_small`, naming any
    over-limit drops. Rule "point" fails every over-limit drop. Rule "significant" (the default) fails it only when the
    paired bootstrap 95% interval of the delta lies wholly below zero, i.e. the candidate is worse beyond what
    resampling these samples explains; an over-limit drop whose interval reaches zero is returned in `held`: on a
    25-sample split one flipped sample is 4 points, and one flip in 8 samples (12.5 points) leaves 34% of resamples
    ((7/8)**8) with no flip at all, so it is held.
    """
    if rule not in GATE_RULES:
        raise ValueError(f"unknown gate rule {rule!r}; choose from {', '.join(GATE_RULES)}")
    if isinstance(min_n, bool) or not isinstance(min_n, int) or min_n < 1:
        raise ValueError(f"min_n must be a whole number of at least 1, got {min_n!r}")
    out = GateResult([], [], [])
    for name, g in groups.items():
        d = g["delta"]
        if not d["pairs"]:
            continue
        where = "overall" if name == "overall" else f"split {name}"
        over = []
        for metric, label, limit in (("acc", "Acc@0.5", max_acc_drop), ("miou", "mean IoU", max_miou_drop)):
            drop = -d[f"{metric}_delta"]
            if drop > limit:
                over.append((metric, label, limit, drop))
        if d["pairs"] < min_n:
            drops = "".join(f"; {label} dropped {drop:.2f} points ({g['reference'][metric]:.2f} -> {g['candidate'][metric]:.2f})"
                            for metric, label, _, drop in over)
            out.too_small.append(f"{where}: too small to gate (n={d['pairs']} < {min_n}){drops}")
            continue
        for metric, label, limit, drop in over:
            ci = d[f"{metric}_delta_ci95"]
            text = (f"{where}: {label} dropped {drop:.2f} points ({g['reference'][metric]:.2f} -> {g['candidate'][metric]:.2f}, "
                    f"delta 95% CI [{ci[0]:.2f}, {ci[1]:.2f}], n={d['pairs']}), over the {limit:g}-point limit"
                    if ci else f"{where}: {label} dropped {drop:.2f} points (n={d['pairs']}), over the {limit:g}-point limit")
            if rule == "point" or (ci is not None and ci[1] < 0):
                out.failures.append(text)
            else:
                flips = f" ({len(d['hit_to_miss'])} hit->miss, {len(d['miss_to_hit'])} miss->hit)" if metric == "acc" else ""
                out.held.append(f"{text}; its 95% CI reaches no change{flips}, so it is within sampling noise at this n")
    return out


def split_mean(groups: dict[str, dict]) -> dict[str, Any] | None:
    """The overall as EGM reports it: each split's Acc@0.5 and mean IoU averaged with equal weight (None: one split).

    Over EGM's 8 RefCOCO splits when all of them are present (its headline figure), else over every split. The
    delta is the mean of the per-split paired deltas. Reported beside the pooled overall; only the pooled one gates.
    """
    names = [k for k in groups if k != "overall"]
    egm = all(s in names for s in REFCOCO_SPLITS)
    if egm:
        names = list(REFCOCO_SPLITS)
    if len(names) < 2:  # one split: the pooled overall already is its mean
        return None

    def mean(vals):
        return None if any(v is None for v in vals) else round(float(np.mean(vals)), 3)

    side = lambda s: {m: mean([groups[k][s][m] for k in names]) for m in ("acc", "miou")}  # noqa: E731
    return {
        "label": "EGM average (8 RefCOCO splits)" if egm else f"mean of {len(names)} splits",
        "egm_refcoco": egm,
        "splits": names,
        "n": sum(groups[k]["n"] for k in names),
        "reference": side("reference"),
        "candidate": side("candidate"),
        "delta": {f"{m}_delta": mean([groups[k]["delta"][f"{m}_delta"] for k in names]) for m in ("acc", "miou")},
    }
