"""The accuracy-vs-latency plot of a sweep (matplotlib, Agg backend): one PNG per target, from records only.

Each recipe is one coloured line through its thinking budgets (so the accuracy
bought by each budget step and its latency cost read directly), every point is
labelled (recipe, budget), the Pareto frontier is a dashed step line with
ringed points, the latency budget a vertical line, and the recommendation a star.
The axis label says whether latency was measured or predicted.
"""

from __future__ import annotations

from pathlib import Path

from egm_edge.errors import EgmError
from egm_edge.sweep.analysis import budget_label, pareto, usable


def _order(b) -> float:
    return float("inf") if b is None else float(b)


def plot_target(records: list[dict], target: str, path: Path, latency_budget_ms: float | None = None,
                recommended: dict | None = None) -> Path | None:
    """Draw `target`'s records into `path`; None when the target has no usable record."""
    rs = usable(records, target, deployable_only=False)
    if not rs:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EgmError("matplotlib is not installed, so the sweep plot cannot be drawn; pip install matplotlib "
                       "(records.jsonl and report.md are written regardless).") from None
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    recipes = list(dict.fromkeys(r["recipe"] for r in rs))
    colours = plt.get_cmap("tab10")
    for k, recipe in enumerate(recipes):
        pts = sorted((r for r in rs if r["recipe"] == recipe), key=lambda r: _order(r["think_budget"]))
        xs = [r["latency"]["mean_ms"] for r in pts]
        ys = [r["accuracy"]["acc"] for r in pts]
        emulated = not all(r.get("deployable", True) for r in pts)  # hollow and dashed: accuracy only, latency emulated
        ax.plot(xs, ys, "--o" if emulated else "-o", color=colours(k % 10), markersize=5, linewidth=1.2, alpha=0.9,
                markerfacecolor="white" if emulated else colours(k % 10), label=recipe + (" (not deployable here)" if emulated else ""))
        for r, x, y in zip(pts, xs, ys):
            mark = "" if r.get("deployable", True) else " not deployable"
            ax.annotate(f"({recipe}, {budget_label(r['think_budget'])}){mark}", (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color=colours(k % 10))
    front = pareto(usable(records, target))
    fx = [r["latency"]["mean_ms"] for r in front]
    fy = [r["accuracy"]["acc"] for r in front]
    ax.step(fx, fy, where="post", linestyle="--", color="black", linewidth=1, label="Pareto frontier")
    ax.scatter(fx, fy, s=90, facecolors="none", edgecolors="black", linewidths=1.2, zorder=3)
    if latency_budget_ms is not None:
        ax.axvline(latency_budget_ms, color="grey", linestyle=":", linewidth=1.2, label=f"latency budget {latency_budget_ms:g} ms")
    if recommended is not None:
        ax.scatter([recommended["latency"]["mean_ms"]], [recommended["accuracy"]["acc"]], marker="*", s=260, color="gold",
                   edgecolors="black", zorder=4, label="recommended")
    accs = [r["accuracy"]["acc"] for r in rs]
    lo, hi = max(0.0, min(accs) - 5), min(100.0, max(accs) + 5)
    if hi - lo < 10:
        lo, hi = max(0.0, (lo + hi) / 2 - 5), min(100.0, (lo + hi) / 2 + 5)
    ax.set_ylim(lo - 1, hi + 1)
    source, where = rs[0]["latency"]["source"], rs[0]["latency"].get("measured_on")
    where = f" at {where.split(' (')[0]}" if where else (" on this machine" if source == "measured" else "")
    ax.set_xlabel(f"mean latency per grounding, ms ({source}{where})")
    ax.set_ylabel("Acc@0.5 (%)")
    ax.set_title(f"Accuracy vs latency on {target}: recipe x thinking budget")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
