"""`sweep_deployed(source, budgets, ...)`: a thinking-budget sweep of something already deployed, measured there.

Contract: `source` is an OpenAI-compatible endpoint URL (egm-edge serve, TensorRT-LLM,
vLLM, SGLang) or a bundle directory. Each budget runs every sample one request at a
time (after one warm-up request), so a sample's latency is what one request sees: for
an endpoint the request's wall time, with the output tokens from the server's `usage`;
for a bundle the runtime's total on this machine, which stands for its target (a GPU
bundle is swept on the machine it was built for). Predictions go through
`EndpointPredictor` (the budget in the field of the endpoint's kind, `--endpoint-kind`
or detected) or `BundlePredictor` (the executor asked for). Each budget appends one
record, `latency.source` "measured", for the named `target` (an endpoint's: a label
saying what hardware serves it, a target profile's name where there is one; a
bundle's: its manifest's), with `measured_on`, `budget_mechanism` (what capped the
reasoning) and no memory figure. Keys are content hashes (the deployment's
fingerprint, the samples, the caps), so a rerun skips recorded budgets without a
request and an interrupted budget resumes from `out_dir/runs/`; a budget with failed
samples gets no record until a rerun finishes them. The table, plot and
recommendation come from the folder's records of the same target and data
(`data_key`), so several deployments swept into one folder are compared.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Callable

from egm_edge.errors import InputError

_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _is_url(source) -> bool:
    return str(source).startswith(("http://", "https://"))


def _check_label(what: str, value: str) -> str:
    if not _LABEL.match(str(value)):
        raise InputError(f"The {what} {value!r} must be 1-64 letters, digits, '.', '_' or '-' (it names files and plot "
                         "lines); choose another.")
    return str(value)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def open_deployment(source, *, target: str | None, label: str | None, endpoint_kind: str = "auto",
                    executor: str = "auto", model_name: str | None = None, api_key: str | None = None,
                    timeout_s: float = 120.0, retries: int = 3, family: str | None = None):
    """(runner, target name, label, notes) for an endpoint URL or a bundle directory; one sentence for bad input.
    The label names the deployment's records and plot line (default: the served model's name, or the bundle's
    precision); the runner's precision is the bundle's, None for an endpoint (what it serves is not known)."""
    from egm_edge.sweep.api import Runner

    notes: list[str] = []
    if _is_url(source):
        from egm_edge.targets import list_targets
        from egm_edge.validate.endpoint import EndpointPredictor

        if not target:
            raise InputError(f"Sweeping the endpoint {source} needs --target NAME saying what hardware serves it "
                             "(a target profile such as h100, or a label of your own).")
        pred = EndpointPredictor(str(source), model_name=model_name, api_key=api_key, timeout_s=timeout_s, retries=retries,
                                 kind=endpoint_kind, **({"family": family} if family else {}))
        target = _check_label("target", target)
        if target not in list_targets():
            notes.append(f"target {target} is no profile in build/targets: it labels the hardware serving {pred.base}.")
        name = _check_label("label", label or re.sub(r"[^A-Za-z0-9._-]+", "-", pred.model_name).strip("-._")[:64] or "endpoint")
        return Runner(pred, pred.base, None, "endpoint", None), target, name, notes
    from egm_edge.validate.predictors import BundlePredictor

    from egm_edge.runtime.executors import EXECUTORS

    if family:
        raise InputError("--family applies to endpoints only; a bundle names its family in its manifest.")
    if executor not in EXECUTORS:
        raise InputError(f"Unknown executor {executor!r}. Choose from: {', '.join(EXECUTORS)}.")
    path = Path(source)
    if not path.is_dir():
        raise InputError(f"{source} is neither an http(s) URL nor a bundle directory; pass --endpoint URL or --bundle DIR.")
    pred = BundlePredictor(path, executor=executor)
    if target and target != pred.bundle.target:
        raise InputError(f"Bundle {path} was built for target {pred.bundle.target}, not {target}; leave --target out "
                         "(a bundle's target comes from its manifest).")
    name = _check_label("label", label or pred.bundle.precision)
    return Runner(pred, path, pred.bundle.precision, "bundle", None), pred.bundle.target, name, notes


def _where(runner, executor: str) -> str:
    if runner.kind == "endpoint":
        return f"the endpoint {runner.path} (request wall time; tokens from the server's usage)"
    return f"this machine with the bundle's {executor} executor (the runtime's total per request)"


def _mechanism(runner, settings) -> str:
    if runner.kind == "endpoint":
        return runner.predictor.endpoint_kind.mechanism(settings)
    b = settings.think_budget
    if not isinstance(b, int):
        return f"no thinking budget (unlimited); {settings.max_new_tokens} new tokens cap the whole output"
    return f"egm-edge's decode loop closes the reasoning at {b} tokens ({settings.budget_mode} close)"


def sweep_deployed(source, budgets=(0, 16, 32, 64, 128, "unlimited"), *, data, out_dir, target: str | None = None,
                   label: str | None = None, endpoint_kind: str = "auto", executor: str = "auto", model_name: str | None = None,
                   api_key: str | None = None, timeout_s: float = 120.0, retries: int = 3, family: str | None = None,
                   limit: int | None = None, seed: int = 0, image_root=None, strict: bool = True,
                   latency_budget_ms: float | None = None, memory_budget_gb: float | None = None,
                   max_answer_tokens: int = 128, max_new_tokens: int = 4096, progress: bool = True,
                   say: Callable[[str], None] | None = None, force: bool = False):
    """Sweep `budgets` on an endpoint or a bundle into `out_dir` (see the module docstring); returns a SweepResult."""
    from egm_edge.artifacts import check_output_dir, prepare_output_dir
    from egm_edge.runtime.settings import DecodeSettings
    from egm_edge.sweep import records as R
    from egm_edge.sweep.analysis import budget_label
    from egm_edge.sweep.api import SweepResult, _check_budgets, _image, analyze, is_sweep_dir
    from egm_edge.validate.api import load_data, run_side, subset
    from egm_edge.validate.store import PredictionStore, sample_ids, samples_digest

    say = say or (lambda _m: None)
    out = Path(out_dir)
    inputs = [p for p in (data, image_root) if isinstance(p, (str, Path))] + ([] if _is_url(source) else [Path(source)])
    check_output_dir(out, force, inputs=inputs, own=is_sweep_dir, resume=True)  # before anything is read
    budgets = _check_budgets(tuple(budgets))
    for name, v in (("latency_budget_ms", latency_budget_ms), ("memory_budget_gb", memory_budget_gb)):
        if v is not None and (not isinstance(v, (int, float)) or v <= 0):
            raise InputError(f"{name} must be a positive number, got {v!r}.")
    samples, _ = load_data(data, image_root, strict)
    if not samples:
        raise InputError(f"No usable samples in {data}; nothing to sweep.")
    samples = subset(samples, limit, seed)
    runner, target, label, notes = open_deployment(source, target=target, label=label, endpoint_kind=endpoint_kind, executor=executor,
                                            model_name=model_name, api_key=api_key, timeout_s=timeout_s, retries=retries,
                                            family=family)
    ids = sample_ids(samples)
    by_id = dict(zip(ids, samples))
    groups = {i: s.split or "-" for i, s in by_id.items()}
    caps = {"max_answer_tokens": max_answer_tokens, "max_new_tokens": max_new_tokens}
    data_key = _digest({"samples": samples_digest(by_id), "caps": caps})
    deployment = {**runner.predictor.fingerprint(), **({"executor": executor} if runner.kind == "bundle" else {})}
    rkey = R.run_key(_digest(deployment), samples_digest(by_id), caps)
    keys = {b: R.record_key(label, b, target, rkey) for b in budgets}
    if memory_budget_gb is not None:
        notes.append("a deployed sweep measures no memory, so no configuration meets --memory-budget-gb; leave it out.")

    prepare_output_dir(out, force, inputs=inputs, own=is_sweep_dir)
    store = R.RecordStore(out)
    store.path.touch()
    todo = [b for b in budgets if keys[b] not in store.keys()]
    if not todo:
        say(f"{label} on {target}: all {len(budgets)} budgets already recorded")
    else:
        first = samples[0]  # warm-up: the first request of a cold server or session is no latency figure
        runner.predictor.predict(_image(first), first.expression, first.task, DecodeSettings(0, "hard", max_answer_tokens,
                                                                                              max_new_tokens).resolved())
    ran, where = 0, _where(runner, executor)
    for b in todo:
        ran += 1
        say(f"[{budgets.index(b) + 1}/{len(budgets)}] {label} on {target}, think budget {budget_label(b)}")
        settings = DecodeSettings(b, "hard", max_answer_tokens, max_new_tokens).resolved()
        runs = PredictionStore(out / "runs", f"{target}-{label}-{budget_label(b)}", rkey)
        run_side(runner.predictor, f"{label} @ {budget_label(b)}", by_id, groups, runs.pending(by_id), settings,
                 runs, 1, progress)
        rows = list(runs.load(by_id).values())
        failed = sum(bool(r.get("error")) for r in rows)
        if failed:
            notes.append(f"{failed} of {len(rows)} samples failed at think budget {budget_label(b)} (first: "
                         f"{next(r['error'] for r in rows if r.get('error'))}); no record was written, rerun to retry them.")
            continue
        extra = {"measured_on": where, "budget_mechanism": _mechanism(runner, settings), "data_key": data_key,
                 # describe()'s own budget_mechanism is the last request's, maybe the warm-up's: the record's is above
                 "deployment": {k: v for k, v in runner.predictor.describe().items() if k != "budget_mechanism"}}
        rec = R.measured_record(label, b, rkey, runner, rows, None, target=target, extra=extra)
        rec["latency"]["measured_on"] = where
        if runner.kind == "endpoint":  # an endpoint's ms_per_token is wall time per usage token, not decode alone
            rec["latency"]["ms_per_token"] = rec["latency"].get("wall_ms_per_output_token")
        store.append(rec)
    records = [r for r in store.load() if r.get("target") == target and r.get("data_key") == data_key]
    recs, plots, tab, more = analyze(records, out, targets=[target], latency_budget_ms=latency_budget_ms,
                                     memory_budget_gb=memory_budget_gb)
    return SweepResult(out, records, recs, plots, tab, ran, notes + more)
