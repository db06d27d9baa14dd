"""`validate(candidate, reference, data, out_dir=...)`: prove that a candidate grounds as well as its reference.

Contract: both sides run on exactly the same samples (loaded once, images checked,
`limit` a seeded subset kept in file order) under the same decode settings
(think budget: the one asked for, else the candidate bundle's default, else
unlimited; the same answer and output caps). A reference and a candidate whose
tokenizer.json differ are refused before any work; endpoints cannot be checked
and the report says so. Each finished sample is appended to
`predictions-<side>.jsonl` at once, so a rerun into the same folder does only
what is missing or failed; any other non-empty folder is refused (--force
replaces only another egm-edge artifact). Samples whose image cannot be read or whose request failed after retries
are ERRORS: counted per split, never scored as misses. The report
(`report.json`, `report.md`, `worst-regressions/*.png`) is computed from the
prediction files; the gate fails when a drop exceeds its limit on any split or
the pooled overall with enough samples to judge (`min_split_n`; smaller ones are
reported as too small), and the result is incomplete while errors remain. The
overall is also reported as EGM reports it, the mean of the per-split figures.
With `cluster`, local sides (bundles, checkpoints) predict as Ray tasks over shards of
samples (`egm_edge.validate.cluster`), this process still the only writer of the
prediction files, so the report and resumption are those of the in-process run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from egm_edge.errors import EgmError, InputError
from egm_edge.validate.predictors import DecodeSettings, open_predictor
from egm_edge.validate.store import SIDES, PredictionStore, config_hash, gt_box, sample_ids


@dataclass
class Report:
    """What a validation found; `data` is exactly what report.json holds."""

    verdict: str  # "pass" | "fail" | "incomplete"
    failures: list[str]
    out_dir: Path
    data: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    @property
    def exit_code(self) -> int:
        """0 pass, 1 a drop over its limit, 2 incomplete (samples that errored; rerun to retry them)."""
        return {"pass": 0, "fail": 1}.get(self.verdict, 2)

    def summary(self) -> str:
        from egm_edge.validate.report import summary_text

        return summary_text(self)


_GROUP_FIELDS = ("split", "task", "sample_id")


def _group_key(split_by: str, samples) -> str:
    names = set(_GROUP_FIELDS)
    if split_by in names or any(split_by in s.extra for s in samples):
        return split_by
    extra = sorted({k for s in samples for k in s.extra})
    raise InputError(f"No sample has the field {split_by!r} to split by; choose from: {', '.join(sorted(names) + extra)}.")


def _group_of(sample, key: str) -> str:
    v = getattr(sample, key) if key in _GROUP_FIELDS else sample.extra.get(key)
    return "-" if v is None or v == "" else str(v)


def _resolve_settings(candidate, asked: DecodeSettings) -> DecodeSettings:
    """What both sides run under: what was asked, else the candidate's defaults, else the built-in ones."""
    return asked.resolved(candidate.defaults() if hasattr(candidate, "defaults") else None)


def tokenizer_check(candidate, reference) -> str:
    """A sentence for the report, or InputError when the tokenizers differ."""
    c, r = candidate.tokenizer_sha256(), reference.tokenizer_sha256()
    if c and r:
        if c != r:
            raise InputError(
                f"The candidate's tokenizer.json (sha256 {c[:12]}) differs from the reference's ({r[:12]}); they are not the same "
                "model, so validate the candidate against the checkpoint it was built from."
            )
        return f"same tokenizer.json on both sides (sha256 {c[:12]})"
    which = " and ".join(s for s, h in (("candidate", c), ("reference", r)) if not h)
    return f"not checked: the {which} is an endpoint whose tokenizer cannot be read; make sure it serves the same model"


def load_data(data, image_root, strict: bool):
    from egm_edge.data import load_samples

    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.exists():
            raise InputError(f"Data file {path} does not exist; pass an EGM eval .jsonl file with --data.")
        res = load_samples(path, image_root=image_root, strict=strict, check_images=True)
        return res.samples, {"path": str(path), "skipped": dict(res.skipped), "skipped_lines": res.skipped_lines[:20]}
    samples = list(getattr(data, "samples", data))
    return samples, {"path": None, "skipped": dict(getattr(data, "skipped", {}) or {}), "skipped_lines": []}


def subset(samples, limit, seed):
    if limit is None or limit >= len(samples):
        return samples
    if limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}.")
    import numpy as np

    keep = np.sort(np.random.default_rng(seed).permutation(len(samples))[:limit])
    return [samples[i] for i in keep]


def progress_bar(total: int, desc: str, enabled: bool):
    class _Silent:
        def update(self, n=1): pass

        def set_postfix_str(self, s): pass

        def close(self): pass

    if not enabled or total == 0:
        return _Silent()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm ships with the compiler extras; the bare runtime install may lack it
        return _Silent()
    return tqdm(total=total, desc=desc, unit="sample")


def _row(sample, sid: str, group: str) -> dict:
    return {"id": sid, "split": group, "task": sample.task, "image": str(sample.image), "expression": sample.expression,
            "gt": gt_box(sample), "error": None}


def error_row(sample, sid: str, group: str, error: str) -> dict:
    """The row of a sample that has no prediction: an ERROR, counted per split and retried by a rerun."""
    return {**_row(sample, sid, group), "error": error, "latency_ms": None}


def predict_row(predictor, sample, sid: str, group: str, settings: DecodeSettings) -> dict:
    from egm_edge.grounding import hit, iou
    from egm_edge.runtime.image import load_image

    row = _row(sample, sid, group)
    t0 = time.perf_counter()
    try:
        image = load_image(sample.image, exif_transpose=False)  # RefCOCO boxes live in the stored frame
        result = predictor.predict(image, sample.expression, sample.task, settings)
    except EgmError as e:
        return error_row(sample, sid, group, str(e))
    wall = (time.perf_counter() - t0) * 1000.0
    v = iou(result.box, sample.bbox)
    return {**row, "iou": v, "hit": hit(v), "parsed": result.box is not None, "think_tokens": result.think_tokens,
            "latency_ms": float(result.timings.get("total", wall)), "result": result.to_dict()}


def run_side(predictor, side: str, samples: dict, groups: dict, todo: list[str], settings, store, concurrency: int, progress: bool) -> float:
    """Predict every id in `todo`, appending each row as it finishes; returns the wall seconds spent."""
    t0 = time.perf_counter()
    bar = progress_bar(len(todo), f"{side} ({predictor.kind})", progress)
    errors = 0

    def done(row):
        nonlocal errors
        store.append(row)
        errors += bool(row["error"])
        bar.update(1)
        if errors:
            bar.set_postfix_str(f"{errors} errors")

    try:
        if getattr(predictor, "concurrent", False) and concurrency > 1 and len(todo) > 1:
            from concurrent.futures import ThreadPoolExecutor, as_completed

            pool = ThreadPoolExecutor(max_workers=concurrency)
            try:
                futures = [pool.submit(predict_row, predictor, samples[i], i, groups[i], settings) for i in todo]
                for fut in as_completed(futures):
                    done(fut.result())
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        else:
            for i in todo:
                done(predict_row(predictor, samples[i], i, groups[i], settings))
    finally:
        bar.close()
    return time.perf_counter() - t0


def _gate_notes(per_group: dict, min_split_n: int) -> list[str]:
    pairs = per_group["overall"]["delta"]["pairs"]
    if 0 < pairs < min_split_n:
        return [f"nothing was gated: the whole run has {pairs} paired samples, fewer than the {min_split_n} the gate needs, "
                "so its verdict says nothing about accuracy; validate more samples."]
    return []


def is_validation_dir(d) -> bool:
    """Whether `d` is a validation's own output (it resumes there): it holds a predictions file."""
    return any((Path(d) / f"predictions-{side}.jsonl").is_file() for side in SIDES)


def _is_url(p) -> bool:
    return str(p).startswith(("http://", "https://"))


def validate(candidate, reference, data, *, out_dir, split_by: str = "split", max_acc_drop: float = 1.0,
             max_miou_drop: float = 1.0, think_budget=None, limit: int | None = None, concurrency: int = 4, seed: int = 0,
             image_root=None, strict: bool = True, model_name: str | None = None, budget_mode: str | None = None,
             max_answer_tokens: int | None = None, max_new_tokens: int | None = None, progress: bool = True,
             worst_k: int = 8, timeout_s: float = 120.0, retries: int = 3, backoff_s: float = 0.5,
             api_key: str | None = None, gate: str = "significant", min_split_n: int | None = None,
             force: bool = False, settings: DecodeSettings | None = None, family: str | None = None,
             cluster: str | None = None, cluster_timeout: float = 120.0, shared_dir=None, shard_size: int | None = None) -> Report:
    """Validate `candidate` against `reference` on `data` into `out_dir`; see the module docstring.

    candidate/reference: a bundle dir, a checkpoint dir, an http(s) URL, or a predictor object.
    settings: a whole `DecodeSettings`; think_budget / budget_mode / max_answer_tokens / max_new_tokens override it.
    think_budget: tokens, None (the candidate bundle's default, else unlimited) or "none"/UNLIMITED (unlimited).
    max_acc_drop / max_miou_drop: allowed drops in points (percent) on any split and overall.
    gate: "significant" fails an over-limit drop only when its paired bootstrap 95% CI excludes no change
    (other over-limit drops are reported as held); "point" fails every over-limit drop.
    min_split_n: the fewest paired samples a split (or the overall) needs to be gated under either rule
    (default `stats.MIN_GATE_N`, see there why); smaller ones are reported as too small to gate.
    out_dir: new, empty, or a validation's own (its predictions files: resumed); `force` replaces another
    egm-edge artifact there, never a folder of other files nor one that is, holds or lies inside an input.
    cluster ("auto", "HOST:PORT", "ray://HOST:PORT"): bundle and checkpoint sides run as Ray tasks, `shard_size` samples
    each (default 16), shipped through the object store or `shared_dir`; units whose target no node offers for
    `cluster_timeout` seconds are reported and their samples left as errors (see `egm_edge.validate.cluster`).
    """
    from egm_edge.sweep.units import executor_for
    from egm_edge.validate import report as rep
    from egm_edge.validate import stats

    if gate not in stats.GATE_RULES:
        raise InputError(f"Unknown gate rule {gate!r}; choose from {', '.join(stats.GATE_RULES)}.")
    min_split_n = stats.MIN_GATE_N if min_split_n is None else min_split_n
    if isinstance(min_split_n, bool) or not isinstance(min_split_n, int) or min_split_n < 1:
        raise InputError(f"min_split_n must be a whole number of at least 1, got {min_split_n!r}; "
                         f"{stats.MIN_GATE_N} is the default, 1 gates every split.")
    for name, v in (("max_acc_drop", max_acc_drop), ("max_miou_drop", max_miou_drop)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise InputError(f"{name} must be a non-negative number of points, got {v!r}.")
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise InputError(f"concurrency must be a positive whole number, got {concurrency!r}.")
    executor = executor_for(cluster, cluster_timeout, shared_dir, shard_size, what="validations")
    asked = (settings or DecodeSettings()).override(think_budget=think_budget, budget_mode=budget_mode,
                                                    max_answer_tokens=max_answer_tokens, max_new_tokens=max_new_tokens)
    if isinstance(data, (str, Path)) and not Path(data).exists():
        raise InputError(f"Data file {data} does not exist; pass an EGM eval .jsonl file with --data.")
    from egm_edge.artifacts import check_output_dir, prepare_output_dir

    inputs = [p for p in (candidate, reference, data, image_root) if isinstance(p, (str, Path)) and not _is_url(p)]
    check_output_dir(out_dir, force, inputs=inputs, own=is_validation_dir, resume=True)  # before any model loads
    t_start = time.perf_counter()
    kw = dict(model_name=model_name, api_key=api_key, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s, family=family)
    cand = open_predictor(candidate, **kw)
    ref = open_predictor(reference, **kw)
    tok_note = tokenizer_check(cand, ref)
    samples, data_info = load_data(data, image_root, strict)
    if not samples:
        raise InputError(f"No usable samples in {data_info['path'] or 'the data'} ({data_info['skipped'] or 'it is empty'}); nothing to validate.")
    key = _group_key(split_by, samples)
    samples = subset(samples, limit, seed)
    ids = sample_ids(samples)
    by_id = dict(zip(ids, samples))
    groups = {i: _group_of(s, key) for i, s in by_id.items()}
    settings = _resolve_settings(cand, asked)

    from egm_edge.validate.cluster import on_cluster, predict_on_cluster

    remote = executor.name == "ray" and (on_cluster(ref) or on_cluster(cand))
    if remote:
        executor.connect()  # an unreachable cluster is one sentence before the output folder is touched
    out = prepare_output_dir(out_dir, force, inputs=inputs, own=is_validation_dir)
    rows, runs, jobs, cluster_notes = {}, {}, [], []
    for side, pred in (("reference", ref), ("candidate", cand)):
        store = PredictionStore(out, side, config_hash(pred.fingerprint(), settings.to_dict()))
        todo = store.pending(by_id)
        runs[side] = {"predicted_now": len(todo), "reused": len(ids) - len(todo), "wall_s": 0.0,
                      "predictions": store.path.name, "config": store.config}
        if todo and remote and on_cluster(pred):
            jobs.append((side, pred, store, todo))
        elif todo:
            runs[side]["wall_s"] = round(run_side(pred, side, by_id, groups, todo, settings, store, concurrency, progress), 2)
    if jobs:
        got = predict_on_cluster(executor, jobs, by_id, groups, settings, shard_size=shard_size, progress=progress)
        for side, *_ in jobs:
            runs[side].update(wall_s=got["wall_s"][side], where=sorted(got["nodes"]))
        cluster_notes = got["notes"]
    elif remote:
        executor.close()
    for side in ("reference", "candidate"):
        loaded = PredictionStore(out, side, runs[side]["config"]).load(by_id)
        rows[side] = {i: loaded[i] for i in ids if i in loaded}  # sample order, however the rows arrived

    per_group = {}
    for name, gids in stats.group_ids({i: {"split": groups[i]} for i in ids}, ids).items():
        per_group[name] = {
            "n": len(gids),
            "reference": stats.side_metrics([rows["reference"][i] for i in gids if i in rows["reference"]]),
            "candidate": stats.side_metrics([rows["candidate"][i] for i in gids if i in rows["candidate"]]),
            "delta": stats.paired(rows["candidate"], rows["reference"], gids, seed),
        }
    failures, held, too_small = stats.gate(per_group, max_acc_drop, max_miou_drop, gate, min_split_n)
    errors = {s: per_group["overall"][s]["errors"] for s in SIDES}
    verdict = "fail" if failures else "incomplete" if any(errors.values()) else "pass"
    data_info.update(n_samples=len(ids), split_by=split_by, limit=limit,
                     splits={k: g["n"] for k, g in per_group.items() if k != "overall"})
    body = {
        "verdict": verdict,
        "failures": failures,
        "held": held,
        "too_small": too_small,
        "errors": errors,
        "thresholds": {"max_acc_drop_points": max_acc_drop, "max_miou_drop_points": max_miou_drop, "rule": gate,
                       "min_split_n": min_split_n},
        "candidate": cand.describe(),
        "reference": ref.describe(),
        "tokenizer_check": tok_note,
        "settings": {**settings.to_dict(), "seed": seed, "concurrency": concurrency, "bootstrap_resamples": stats.N_BOOT},
        "data": data_info,
        "runs": runs,
        "groups": per_group,
        "split_mean": stats.split_mean(per_group),
        "notes": rep.notes(rows, settings, errors) + _gate_notes(per_group, min_split_n) + cluster_notes,
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    report = Report(verdict, failures, out, body)
    rep.write(report, rows, worst_k)
    return report
