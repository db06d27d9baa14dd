"""Validate's local sides as Ray tasks: the sweep's units and executor, the driver the single writer of predictions.

Contract: `on_cluster(pred)` says whether a side can run on the cluster (a bundle or a
checkpoint on this machine; endpoints stay in this process, their concurrency is already
remote). `predict_on_cluster(executor, jobs, samples, groups, settings, ...)` cuts each
side's pending ids into shards, runs them as `egm_edge.sweep.units.Unit`s (the side's
artifact shipped once by content hash, the whole resolved `DecodeSettings` carried by the
unit; a cpu bundle or a checkpoint on any CPU, a gpu/jetson bundle on a node offering
`target:<its target>`) through `RayExecutor.run`, and appends every row that comes back
to that side's `PredictionStore` here, so the files, keys and resumption are exactly the
in-process ones. A sample whose unit failed or found no node gets an error row (an
ERROR in the report, retried by a rerun), never a silent gap.
"""

from __future__ import annotations

import time

from egm_edge.validate.store import PredictionStore

DEFAULT_SHARD_SIZE = 16
NO_RESULT = ("no result came back from the cluster for this sample ({why}); rerun the same command to retry it.")


def on_cluster(pred) -> bool:
    """Whether this side runs as Ray tasks: a bundle or a checkpoint this machine holds (not an endpoint)."""
    from egm_edge.validate.predictors import BundlePredictor, CheckpointPredictor

    return isinstance(pred, (BundlePredictor, CheckpointPredictor))


def _target(pred) -> str:
    """Where the side's units must run: a gpu/jetson bundle on its own target's nodes, anything else on any CPU."""
    bundle = getattr(pred, "bundle", None)
    return bundle.target if bundle is not None and bundle.target else "cpu"


def predict_on_cluster(executor, jobs: list[tuple[str, object, PredictionStore, list[str]]], samples: dict, groups: dict,
                       settings, *, shard_size: int | None = None, progress: bool = True) -> dict:
    """Run each (side, predictor, store, pending ids) of `jobs` on the cluster; every row is appended to its store.

    Returns {"wall_s": {side: seconds}, "nodes": {node: {"units", "seconds"}}, "notes": [sentences]}."""
    from egm_edge.sweep.units import Artifact, Unit, shards
    from egm_edge.validate.api import error_row

    units, stores, seen = [], {}, {}
    for side, pred, store, todo in jobs:
        art, target = Artifact.of_predictor(pred), _target(pred)
        stores[side], seen[side] = store, set()
        units += [Unit(side, settings.think_budget, target, j, part, art, settings.max_answer_tokens, settings)
                  for j, part in enumerate(shards(todo, shard_size or DEFAULT_SHARD_SIZE))]
    done_at: dict[str, float] = {}
    t0 = time.perf_counter()

    def on_rows(unit, rows, info) -> None:
        for row in rows:
            stores[unit.recipe].append(row)  # this process alone writes predictions-<side>.jsonl
            seen[unit.recipe].add(row["id"])
        done_at[unit.recipe] = time.perf_counter() - t0

    nodes = executor.run(units, samples, groups, on_rows, progress=progress, desc="validate units") if units else {}
    notes = list(getattr(executor, "notes", []))
    why = "see the report's notes" if notes else "its unit did not finish"
    for side, _pred, store, todo in jobs:
        for i in todo:
            if i not in seen[side]:
                store.append(error_row(samples[i], i, groups[i], NO_RESULT.format(why=why)))
    return {"wall_s": {side: round(done_at.get(side, 0.0), 2) for side, *_ in jobs}, "nodes": nodes, "notes": notes}
