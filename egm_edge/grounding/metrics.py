"""IoU, Acc@0.5 (strictly greater, as EGM) and aggregation per split and over RefCOCO's 8 splits."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

# The 8 splits EGM averages for its RefCOCO headline figure.
REFCOCO_SPLITS = (
    "refcoco_val",
    "refcoco_testA",
    "refcoco_testB",
    "refcoco+_val",
    "refcoco+_testA",
    "refcoco+_testB",
    "refcocog_val",
    "refcocog_test",
)

ACC_THRESHOLD = 0.5


def iou(a, b) -> float:
    """IoU of two (x1, y1, x2, y2) pixel boxes; 0.0 when either is None or the union is empty."""
    if a is None or b is None:
        return 0.0
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return float(inter / union) if union > 0 else 0.0


def hit(iou_value: float, threshold: float = ACC_THRESHOLD) -> bool:
    """EGM counts a hit when IoU is strictly greater than the threshold."""
    return iou_value > threshold


@dataclass(frozen=True)
class SplitScore:
    split: str
    n: int
    acc: float  # Acc@0.5 as a fraction
    miou: float
    parse_failures: int

    def to_dict(self) -> dict:
        return {"split": self.split, "n": self.n, "acc@0.5": self.acc, "miou": self.miou, "parse_failures": self.parse_failures}


def score(ious, parsed=None, split: str = "all") -> SplitScore:
    """Score one split; samples with no box count as IoU 0 and stay in the average."""
    ious = [float(v) for v in ious]
    n = len(ious)
    fails = 0 if parsed is None else sum(1 for p in parsed if not p)
    if n == 0:
        return SplitScore(split, 0, 0.0, 0.0, fails)
    return SplitScore(split, n, sum(hit(v) for v in ious) / n, sum(ious) / n, fails)


def score_by_split(records) -> dict[str, SplitScore]:
    """records: iterable of (split, iou, parsed_ok). Returns per split plus 'all' (pooled)."""
    groups: dict[str, list] = defaultdict(list)
    for split, v, ok in records:
        groups[split or "all"].append((v, ok))
    out = {s: score([v for v, _ in g], [ok for _, ok in g], s) for s, g in sorted(groups.items())}
    pooled = [r for g in groups.values() for r in g]
    out["all"] = score([v for v, _ in pooled], [ok for _, ok in pooled], "all")
    return out


def refcoco_average(per_split: dict[str, SplitScore]) -> float:
    """EGM's headline: the unweighted mean of Acc@0.5 over the 8 RefCOCO splits (all must be present)."""
    missing = [s for s in REFCOCO_SPLITS if s not in per_split]
    if missing:
        from egm_edge.errors import InputError

        raise InputError(f"The RefCOCO average needs all 8 splits; missing: {', '.join(missing)}.")
    return sum(per_split[s].acc for s in REFCOCO_SPLITS) / len(REFCOCO_SPLITS)
