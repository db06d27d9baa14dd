"""Validation outputs: report.json (machines), report.md (tables for people), worst-regression images.

Contract: `write(report, rows, worst_k)` writes into `report.out_dir`
`report.json` (exactly `report.data`), `report.md`, and `worst-regressions/`
(replaced on every run): the `worst_k` samples whose IoU fell the most, each
drawn with the ground truth (green), the reference box (blue) and the candidate
box (red). Nothing here runs a model.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

GT, REF, CAND = (0, 170, 0), (30, 90, 220), (220, 30, 30)
WORST_DIR = "worst-regressions"


def _f(v, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def _ci(ci) -> str:
    return "-" if not ci else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def _points(v: float) -> str:
    return f"{v:g} point" + ("" if v == 1 else "s")


def notes(rows: dict, settings, errors: dict) -> list[str]:
    """Sentences a reader must see: errors, budgets a server ignored, truncated outputs."""
    out = []
    for side, n in errors.items():
        if n:
            first = next((r["error"] for r in rows[side].values() if r.get("error")), "")
            out.append(f"{n} {side} samples failed and are not scored (first: {first}); rerun the same command to retry only them.")
    if isinstance(settings.think_budget, int):  # a number of tokens, not UNLIMITED
        for side, rs in rows.items():
            over = sum(1 for r in rs.values() if not r.get("error") and r.get("think_tokens") is not None
                       and r["think_tokens"] > settings.think_budget + 32)
            if over:
                out.append(f"the {side} reasoned past the {settings.think_budget}-token budget on {over} samples; "
                           "it probably ignores the budget field it was sent (see its budget line), so the sides did not "
                           "run at equal budgets.")
    for side, rs in rows.items():
        trunc = sum(1 for r in rs.values() if not r.get("error") and (r.get("result") or {}).get("truncated"))
        if trunc:
            out.append(f"{trunc} {side} outputs hit a length cap before the model stopped (max_new_tokens={settings.max_new_tokens}).")
    return out


def _table(groups: dict, split_mean: dict | None = None) -> list[str]:
    head = ("| split | n | Acc@0.5 ref | Acc@0.5 cand | delta Acc (95% CI) | mIoU ref | mIoU cand | delta mIoU (95% CI) "
            "| same box | parse fail ref / cand | errors ref / cand | think tokens ref / cand | hit->miss | miss->hit |")
    lines = [head, "|" + "---|" * 14]
    if split_mean:  # beside the pooled overall, which the loop writes last
        r, c, d = split_mean["reference"], split_mean["candidate"], split_mean["delta"]
        mean_row = (f"| **{split_mean['label']}** | {split_mean['n']} | {_f(r['acc'])} | {_f(c['acc'])} | {_f(d['acc_delta'])} | "
                    f"{_f(r['miou'])} | {_f(c['miou'])} | {_f(d['miou_delta'])} |" + " - |" * 6)
    for name, g in groups.items():
        r, c, d = g["reference"], g["candidate"], g["delta"]
        lines.append(
            f"| {'**overall**' if name == 'overall' else name} | {g['n']} | {_f(r['acc'])} | {_f(c['acc'])} | "
            f"{_f(d['acc_delta'])} {_ci(d['acc_delta_ci95'])} | {_f(r['miou'])} | {_f(c['miou'])} | "
            f"{_f(d['miou_delta'])} {_ci(d['miou_delta_ci95'])} | {_f(d['same_box_rate'], 3)} | {_f(r['parse_failure_rate'], 3)} / {_f(c['parse_failure_rate'], 3)} | "
            f"{r['errors']} / {c['errors']} | {_f(r['mean_think_tokens'], 1)} / {_f(c['mean_think_tokens'], 1)} | "
            f"{len(d['hit_to_miss'])} | {len(d['miss_to_hit'])} |"
        )
    if split_mean:
        lines.append(mean_row)
    return lines


def _latency_table(groups: dict) -> list[str]:
    lines = ["| side | p50 ms | p90 ms | p99 ms |", "|---|---|---|---|"]
    for side in ("reference", "candidate"):
        lat = groups["overall"][side]["latency_ms"]
        lines.append(f"| {side} | {_f(lat['p50'], 1)} | {_f(lat['p90'], 1)} | {_f(lat['p99'], 1)} |")
    return lines


def _who(d: dict) -> str:
    where = d.get("path") or d.get("url")
    extra = ", ".join(f"{k} {d[k]}" for k in ("precision", "target", "model") if d.get(k))
    return f"{d['kind']} `{where}`" + (f" ({extra})" if extra else "")


def budget_lines(data: dict) -> list[str]:
    """One line per endpoint side: which server kind it was taken for and which mechanism capped its reasoning."""
    lines = []
    for side in ("candidate", "reference"):
        d = data.get(side) or {}
        if d.get("endpoint_kind"):
            how = d.get("budget_mechanism") or (f"sent as {d['budget_field']}" if d.get("budget_field") else "max_tokens only: no budget field")
            lines.append(f"- {side} budget: {how} (endpoint kind {d['endpoint_kind']}, {d.get('endpoint_kind_source', 'given')})")
    return lines


def markdown(data: dict) -> str:
    s = data["settings"]
    budget = "unlimited" if s["think_budget"] is None else f"{s['think_budget']} tokens ({s['budget_mode']})"
    lines = [
        f"# Validation: {data['verdict'].upper()}",
        "",
        f"- candidate: {_who(data['candidate'])}",
        f"- reference: {_who(data['reference'])}",
        f"- tokenizer: {data['tokenizer_check']}",
        f"- data: {data['data']['path'] or 'in memory'}, {data['data']['n_samples']} samples, split by `{data['data']['split_by']}`"
        + (f"; skipped while loading: {data['data']['skipped']}" if data["data"]["skipped"] else ""),
        f"- decode: think budget {budget}, max {s['max_answer_tokens']} answer tokens, max {s['max_new_tokens']} new tokens, greedy",
        *budget_lines(data),
        f"- gate: a drop of more than {_points(data['thresholds']['max_acc_drop_points'])} of Acc@0.5 or "
        f"{_points(data['thresholds']['max_miou_drop_points'])} of mean IoU on any split or overall fails"
        + ("" if data["thresholds"].get("rule", "point") == "point" else
           " when its paired 95% CI lies wholly below zero (rule `significant`; `--gate point` fails every such drop)")
        + (f"; a split (or the overall) with fewer than {data['thresholds']['min_split_n']} paired samples is too small to gate"
           if data["thresholds"].get("min_split_n") else ""),
        "",
    ]
    if data["failures"]:
        lines += ["## Gate failures", ""] + [f"- {f}" for f in data["failures"]] + [""]
    if data.get("held"):
        lines += ["## Drops over a limit but within sampling noise (not failing)", ""] + [f"- {f}" for f in data["held"]] + [""]
    if data.get("too_small"):
        lines += ["## Too small to gate (reported, not failing; `--min-split-n` sets the minimum)", ""]
        lines += [f"- {f}" for f in data["too_small"]] + [""]
    if data["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in data["notes"]] + [""]
    sm = data.get("split_mean")
    lines += ["## Accuracy (points; deltas are candidate minus reference over paired samples)", ""]
    if sm:
        lines += [f"**overall** is every sample pooled, and what the gate judges; **{sm['label']}** weighs each split equally, "
                  "as EGM reports its headline figure (its delta is the mean of the split deltas).", ""]
    lines += _table(data["groups"], sm) + [""]
    lines += ["## Latency per sample (measured on this machine; endpoints: request wall time)", ""] + _latency_table(data["groups"]) + [""]
    flips = data["groups"]["overall"]["delta"]
    for key, title in (("hit_to_miss", "Samples that flipped from hit to miss"), ("miss_to_hit", "Samples that flipped from miss to hit")):
        ids = flips[key]
        if ids:
            lines += [f"## {title} ({len(ids)})", ""] + [f"- `{i}`" for i in ids[:50]] + (["- ..."] if len(ids) > 50 else []) + [""]
    if data.get("worst_regressions"):
        lines += ["## Worst regressions (green: ground truth, blue: reference, red: candidate)", ""]
        lines += [f"- IoU {w['iou_reference']:.3f} -> {w['iou_candidate']:.3f}: `{w['id']}` \"{w['expression']}\" "
                  f"![]({w['png']})" for w in data["worst_regressions"]]
    return "\n".join(lines) + "\n"


def _draw_worst(out_dir: Path, rows: dict, k: int) -> list[dict]:
    from egm_edge.runtime.draw import draw_boxes
    from egm_edge.runtime.image import load_image

    folder = out_dir / WORST_DIR
    shutil.rmtree(folder, ignore_errors=True)
    cand, ref = rows["candidate"], rows["reference"]
    pairs = [(cand[i]["iou"] - ref[i]["iou"], i) for i in cand if i in ref and not cand[i].get("error") and not ref[i].get("error")]
    worst = sorted((p for p in pairs if p[0] < 0), key=lambda p: (p[0], p[1]))[:k]
    if not worst:
        return []
    folder.mkdir(parents=True)
    out = []
    for rank, (_, i) in enumerate(worst, 1):
        c, r = cand[i], ref[i]
        name = f"{rank:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', i)[:60]}.png"
        try:
            img = load_image(c["image"], exif_transpose=False)
        except Exception:  # the image went away since it was predicted: list the sample, draw nothing
            img = None
        if img is not None:
            k_up = max(1, round(480 / max(img.size)))  # small images are enlarged so the labels stay legible
            img = img.resize((img.width * k_up, img.height * k_up)) if k_up > 1 else img
            box = lambda b: None if not b else tuple(v * k_up for v in b)  # noqa: E731
            rb, cb = (r["result"] or {}).get("box"), (c["result"] or {}).get("box")
            drawn = draw_boxes(img, [(box(rb), f"ref {r['iou']:.2f}", REF), (box(cb), f"cand {c['iou']:.2f}", CAND),
                                     (box(c["gt"]), "GT", GT)])
            drawn.save(folder / name)
        out.append({"id": i, "split": c.get("split"), "expression": c["expression"], "iou_reference": round(r["iou"], 4),
                    "iou_candidate": round(c["iou"], 4), "png": f"{WORST_DIR}/{name}" if img is not None else None})
    return out


def write(report, rows: dict, worst_k: int) -> None:
    out = Path(report.out_dir)
    report.data["worst_regressions"] = _draw_worst(out, rows, worst_k) if worst_k > 0 else []
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report.data, indent=2, default=str))
    tmp.replace(out / "report.json")
    (out / "report.md").write_text(markdown(report.data))


def summary_text(report) -> str:
    """What the CLI prints: the verdict, the overall figures, why it failed, where the files are."""
    d = report.data
    o = d["groups"]["overall"]
    r, c, dl = o["reference"], o["candidate"], o["delta"]
    lines = [
        f"reference: Acc@0.5 {_f(r['acc'])}  mIoU {_f(r['miou'])}  errors {r['errors']}  p50 {_f(r['latency_ms']['p50'], 1)} ms",
        f"candidate: Acc@0.5 {_f(c['acc'])}  mIoU {_f(c['miou'])}  errors {c['errors']}  p50 {_f(c['latency_ms']['p50'], 1)} ms",
        f"delta (candidate - reference, {dl['pairs']} pairs): Acc@0.5 {_f(dl['acc_delta'])} {_ci(dl['acc_delta_ci95'])}, "
        f"mIoU {_f(dl['miou_delta'])} {_ci(dl['miou_delta_ci95'])}; same box {_f(dl['same_box_rate'], 3)}; "
        f"hit->miss {len(dl['hit_to_miss'])}, miss->hit {len(dl['miss_to_hit'])}",
    ]
    sm = d.get("split_mean")
    if sm:
        lines.append(f"{sm['label']}: Acc@0.5 {_f(sm['reference']['acc'])} -> {_f(sm['candidate']['acc'])} "
                     f"(delta {_f(sm['delta']['acc_delta'])}), mIoU {_f(sm['reference']['miou'])} -> {_f(sm['candidate']['miou'])} "
                     f"(delta {_f(sm['delta']['miou_delta'])}); the pooled figures above are what the gate judges")
    lines += [f"FAIL {f}" for f in report.failures]
    lines += [f"held {f}" for f in d.get("held") or []]
    lines += [f"not gated: {f}" for f in d.get("too_small") or []]
    lines += [line[2:] for line in budget_lines(d)]
    lines += [f"note: {n}" for n in d["notes"]]
    lines.append(f"verdict: {report.verdict.upper()}; report: {Path(report.out_dir) / 'report.md'}")
    return "\n".join(lines)
