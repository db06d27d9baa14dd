"""Sweep records: one JSON line per (recipe, think budget, target) in `records.jsonl`, appended as each run ends.

Contract: a record's `key` is recipe | budget | target | run key, where the run
key digests the bundle's inputs, the samples and the decode caps; a sweep skips
every record whose key is already in the file (that is how it resumes) and
ignores records of other run keys (another model, other data). Records hold the
accuracy measured with the CPU bundle on this machine (Acc@0.5 and mean IoU in
points, parse failures, errors, think tokens, per split) and a latency whose
`source` says "measured" (this machine, target cpu) or "predicted" (the planner's
roofline for targets not at hand, with its label). `memory_gib` is the planner's
prediction, or null where nothing predicts it. A recipe a target cannot run is
recorded as unsupported, with the planner's sentence.

Sweeps of something already deployed (`egm_edge.sweep.deployed`: an endpoint, or a
bundle measured where it runs) write measured records for the target they name,
with `latency.measured_on` (where), the request's wall time per sample, the output
tokens (an endpoint's from its `usage`), `budget_mechanism` (what capped the
reasoning) and `data_key` (samples + caps, so sweeps of several deployments into one
folder are compared on the same data). A `--cluster` sweep's measured records name the
Ray node(s) in `measured_on` too, for cpu and for each target measured on its own node.
A --model sweep's measured records say their `engine`: "tensorrt" (a target's own bundle
on its node), "onnxruntime-cpu" (the CPU bundle) or "pytorch-reference" (a checkpoint).
Records written before these fields existed read as before: every reader uses `.get` for them.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

from egm_edge.runtime.settings import budget_to_json
from egm_edge.sweep.analysis import budget_label

SCHEMA = 1
RECORDS = "records.jsonl"


def run_key(bundle_key: str, samples_digest: str, caps: dict) -> str:
    blob = json.dumps({"bundle": bundle_key, "samples": samples_digest, "caps": caps}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def record_key(recipe: str, budget, target: str, rkey: str) -> str:
    return f"{recipe}|{budget_label(budget)}|{target}|{rkey}"


class RecordStore:
    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / RECORDS

    def load(self) -> list[dict]:
        """Every readable record, the last one per key (a torn last line is skipped)."""
        by_key: dict[str, dict] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(r, dict) and "key" in r:
                    by_key[r["key"]] = r
        return list(by_key.values())

    def keys(self) -> set[str]:
        return {r["key"] for r in self.load()}

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = self.path.read_bytes()[-1:] if self.path.is_file() and self.path.stat().st_size else b"\n"
        with open(self.path, "a", encoding="utf-8") as f:
            if text != b"\n":
                f.write("\n")  # never glue a record onto a torn line
            f.write(json.dumps(record, default=str) + "\n")


def _mean(vals) -> float | None:
    vals = [v for v in vals if v is not None]
    return round(statistics.fmean(vals), 3) if vals else None


def measured_record(recipe: str, budget, rkey: str, runner, rows: list[dict], memory_gib: float | None, *,
                    target: str = "cpu", extra: dict | None = None) -> dict[str, Any]:
    """The record of one run measured where it ran: on this machine for target cpu (the default), or on the
    deployment a deployed sweep names (`extra` adds its fields: measured_on, budget_mechanism, data_key, ...).

    runner: `egm_edge.sweep.api.Runner`; when its `not_deployable` says why the cpu profile does not offer
    the precision, the accuracy counts but the latency is no deployment figure: never recommended.
    """
    not_deployable = runner.not_deployable
    from egm_edge.validate.stats import side_metrics

    m = side_metrics(rows)
    ok = [r for r in rows if not r.get("error")]
    splits = {}
    for r in rows:
        splits.setdefault(r.get("split") or "-", []).append(r)
    per_split = {k: {key: side_metrics(v)[key] for key in ("n", "acc", "miou")} for k, v in sorted(splits.items())}
    return {
        "schema": SCHEMA,
        "key": record_key(recipe, budget, target, rkey),
        "run_key": rkey,
        "recipe": recipe,
        "precision": runner.precision,
        "measured_with": runner.kind,
        "think_budget": budget_to_json(budget),  # null: unlimited, as records have always said
        "target": target,
        "supported": True,
        "deployable": not_deployable is None,
        **({"reason": not_deployable} if not_deployable else {}),
        "accuracy": {k: m[k] for k in ("n", "scored", "errors", "acc", "miou", "parse_failure_rate", "mean_think_tokens")},
        "per_split": per_split,
        "latency": {
            "source": "measured",
            "mean_ms": _mean(r["latency_ms"] for r in ok),
            "p50_ms": m["latency_ms"]["p50"],
            "p90_ms": m["latency_ms"]["p90"],
            "ms_per_token": _mean((r.get("result") or {}).get("timings", {}).get("ms_per_token") for r in ok),
            "max_think_tokens": max((r["think_tokens"] for r in ok if r.get("think_tokens") is not None), default=None),
            **output_tokens(ok),
        },
        "memory_gib": memory_gib,
        "memory_source": "predicted" if memory_gib is not None else None,
        "artifact": str(runner.path),  # the bundle, or the checkpoint measured_with says
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }


def output_tokens(ok: list[dict]) -> dict[str, Any]:
    """Mean output tokens per sample (reasoning + answer; an endpoint's are its usage counts) and the request wall
    time per output token, prefill included; {} when no row says how many tokens it produced."""
    counted = [(r["latency_ms"], r["think_tokens"] + ((r.get("result") or {}).get("answer_tokens") or 0))
               for r in ok if r.get("think_tokens") is not None and r.get("latency_ms") is not None]
    tokens = sum(n for _, n in counted)
    if not counted or tokens <= 0:
        return {}
    return {"mean_output_tokens": round(tokens / len(counted), 2),
            "wall_ms_per_output_token": round(sum(ms for ms, _ in counted) / tokens, 3)}


def planner_precision(recipe: str, target) -> str:
    """The planner's precision for a recipe on a target: 'full' is what the build pipeline runs unquantized there."""
    from egm_edge.builder.pipeline import full_precision

    return full_precision(target) if recipe == "full" else recipe.partition("@")[0]  # an AutoQuantize rung plans as auto


def predict(spec, target, recipe: str, think_tokens: float, budget_cap: int, image_wh: tuple[int, int]) -> dict[str, Any]:
    """Predicted latency (at the measured mean think tokens) and memory (at the budget cap), or why not."""
    from egm_edge.errors import EgmError
    from egm_edge.plan import GIB, PREDICTED, plan

    try:
        precision = planner_precision(recipe, target)
        lat = plan(spec, target, precision, int(round(think_tokens)), image_wh=image_wh, explore=False).latency
        mem = plan(spec, target, precision, int(budget_cap), image_wh=image_wh, explore=False)
    except EgmError as e:
        return {"supported": False, "reason": str(e)}
    return {"supported": True, "precision": precision, "mean_ms": round(lat.total_ms, 2), "ms_per_token": round(lat.decode_ms_per_token, 3),
            "memory_gib": round(mem.total_bytes / GIB, 4), "fits": mem.fits, "label": PREDICTED}


def predicted_record(measured: dict, target, prediction: dict) -> dict[str, Any]:
    """The record of a target not at hand: the measured accuracy with the planner's latency and memory."""
    r = {k: measured[k] for k in ("schema", "run_key", "recipe", "think_budget", "accuracy", "per_split", "artifact", "measured_with")}
    r.update(key=record_key(measured["recipe"], measured["think_budget"], target.name, measured["run_key"]), target=target.name,
             accuracy_source="measured on this machine with the " + ("CPU bundle" if r["measured_with"] == "bundle" else "PyTorch reference"),
             created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if not prediction["supported"]:
        return {**r, "supported": False, "reason": prediction["reason"], "latency": {"source": "predicted", "mean_ms": None},
                "memory_gib": None}
    return {**r, "supported": True, "precision": prediction["precision"], "memory_gib": prediction["memory_gib"],
            "memory_source": "predicted", "fits": prediction["fits"],
            "latency": {"source": "predicted", "label": prediction["label"], "mean_ms": prediction["mean_ms"], "p50_ms": None,
                        "p90_ms": None, "ms_per_token": prediction["ms_per_token"]}}
