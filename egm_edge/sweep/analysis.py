"""Sweep analysis from records only: the Pareto frontier, the table, and the recommendation.

Contract: every function takes sweep records (dicts as `egm_edge.sweep.records`
writes them) and nothing else, so a resumed or copied sweep gives the same
answer. A record's accuracy is `accuracy.acc` (Acc@0.5, points), its latency
`latency.mean_ms` (measured on this machine or, for a deployed sweep, where
`latency.measured_on` says; or the planner's prediction for targets not at hand,
as `latency.source` says), its memory `memory_gib` (the planner's prediction;
null for deployed sweeps). Records whose target does not support the recipe are
listed, never recommended. Pure Python.
"""

from __future__ import annotations

from typing import Any


def budget_label(b) -> str:
    """A record's budget (null: unlimited) or a parsed one (runtime.settings.UNLIMITED) as keys and labels spell it."""
    return "none" if b is None or b == "unlimited" else str(b)


def usable(records: list[dict], target: str, deployable_only: bool = True) -> list[dict]:
    """Finished records of `target`; without deployable_only also those the target's profile does not offer
    (e.g. an fp8 bundle measured on a CPU: its accuracy is real, its latency is an emulation)."""
    return [r for r in records if r["target"] == target and r.get("supported", True)
            and (not deployable_only or r.get("deployable", True))
            and r["accuracy"].get("acc") is not None and r["latency"].get("mean_ms") is not None]


def pareto(records: list[dict]) -> list[dict]:
    """The records no other record beats on both accuracy (higher) and latency (lower), by latency."""
    front = []
    for r in records:
        a, t = r["accuracy"]["acc"], r["latency"]["mean_ms"]
        dominated = any(
            (q["accuracy"]["acc"] >= a and q["latency"]["mean_ms"] <= t)
            and (q["accuracy"]["acc"] > a or q["latency"]["mean_ms"] < t)
            for q in records if q is not r
        )
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: (r["latency"]["mean_ms"], -r["accuracy"]["acc"]))


def name(r: dict) -> str:
    return f"{r['recipe']} @ {budget_label(r['think_budget'])}"


def recommend(records: list[dict], target: str, latency_budget_ms: float | None = None,
              memory_budget_gb: float | None = None) -> dict[str, Any]:
    """{"record": the pick or None, "why": one sentence}: the most accurate configuration within the budgets.

    Ties in accuracy go to the faster one. Memory is the planner's prediction (GiB).
    """
    cands = usable(records, target)
    if not cands:
        return {"record": None, "target": target, "why": f"No finished run for target {target} to choose from."}
    fits = [r for r in cands
            if (latency_budget_ms is None or r["latency"]["mean_ms"] <= latency_budget_ms)
            and (memory_budget_gb is None or (r.get("memory_gib") is not None and r["memory_gib"] <= memory_budget_gb))]
    limits = " and ".join(x for x in (f"{latency_budget_ms:g} ms" if latency_budget_ms is not None else "",
                                      f"{memory_budget_gb:g} GB" if memory_budget_gb is not None else "") if x)
    src = cands[0]["latency"]["source"]
    if not fits:
        fastest = min(cands, key=lambda r: r["latency"]["mean_ms"])
        return {"record": None, "target": target, "why": (
            f"Nothing fits {limits} on {target}: the fastest configuration, {name(fastest)}, takes "
            f"{fastest['latency']['mean_ms']:.0f} ms ({src}) and {_gib(fastest)}; raise the budget or choose a smaller model.")}
    best = max(fits, key=lambda r: (r["accuracy"]["acc"], -r["latency"]["mean_ms"]))
    within = f"within {limits}" if limits else "with no latency or memory budget given"
    why = (f"On {target}, {name(best)} is the most accurate of the {len(fits)} of {len(cands)} configurations {within}: "
           f"Acc@0.5 {best['accuracy']['acc']:.1f} at {best['latency']['mean_ms']:.0f} ms ({src}) and {_gib(best)}")
    better = [r for r in cands if r["accuracy"]["acc"] > best["accuracy"]["acc"]]
    if better:
        nxt = min(better, key=lambda r: r["latency"]["mean_ms"])
        why += (f"; the next more accurate, {name(nxt)} (Acc@0.5 {nxt['accuracy']['acc']:.1f}), needs "
                f"{nxt['latency']['mean_ms']:.0f} ms and {_gib(nxt)}")
    return {"record": best, "target": target, "why": why + "."}


def _gib(r: dict) -> str:
    m = r.get("memory_gib")
    return "unknown memory" if m is None else f"{m:.2f} GiB predicted"


def table(records: list[dict]) -> str:
    """A Markdown table, one row per record, grouped by target then recipe then budget."""
    head = ("| target | recipe | precision | think budget | Acc@0.5 | mIoU | parse fail | errors | think tokens | "
            "latency mean ms | p50 | p90 | ms/token | latency source | memory GiB (pred.) | Pareto |")
    lines = [head, "|" + "---|" * 16]
    order = {t: i for i, t in enumerate(dict.fromkeys(r["target"] for r in records))}
    fronts = {t: {id(r) for r in pareto(usable(records, t))} for t in order}

    def key(r):
        b = r["think_budget"]
        return (order[r["target"]], r["recipe"], float("inf") if b is None else b)

    f = lambda v, nd=1: "-" if v is None else f"{v:.{nd}f}"  # noqa: E731
    reasons: list[str] = []

    def _note(reason: str) -> str:
        if reason not in reasons:
            reasons.append(reason)
        return f"[{reasons.index(reason) + 1}]"

    for r in sorted(records, key=key):
        a, lat = r["accuracy"], r["latency"]
        if not r.get("supported", True):
            lines.append(f"| {r['target']} | {r['recipe']} | {r.get('precision', '-')} | {budget_label(r['think_budget'])} | "
                         f"unsupported {_note(r.get('reason', ''))} |" + " |" * 11)
            continue
        lines.append(
            f"| {r['target']} | {r['recipe']} | {r.get('precision') or '-'} | {budget_label(r['think_budget'])} | {f(a.get('acc'))} | "
            f"{f(a.get('miou'))} | {f(a.get('parse_failure_rate'), 3)} | {a.get('errors', 0)} | {f(a.get('mean_think_tokens'))} | "
            f"{f(lat.get('mean_ms'))} | {f(lat.get('p50_ms'))} | {f(lat.get('p90_ms'))} | {f(lat.get('ms_per_token'), 2)} | "
            f"{lat['source']}{'' if r.get('deployable', True) else ', not deployable ' + _note(r.get('reason', ''))} | {f(r.get('memory_gib'), 2)} | {'yes' if id(r) in fronts[r['target']] else ''} |"
        )
    lines += [""] * bool(reasons) + [f"[{k}] {why}" for k, why in enumerate(reasons, 1)]
    return "\n".join(lines)
