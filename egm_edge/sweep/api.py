"""`sweep(model_dir, ...)`: every (recipe, thinking budget) on the data, one record each, then the choice.

Contract: for each recipe a CPU bundle is built or reused (`egm_edge.sweep.bundles`;
for a recipe the CPU runtime has no kernels for, fp8, the quantized checkpoint
through the PyTorch reference, marked not deployable on cpu);
each (recipe, budget) runs every sample through the torch-free runtime on this
machine (one warm-up grounding first, no image-encoding cache, so latencies are
per request) and appends a record (`egm_edge.sweep.records`); targets other than
cpu get records with the planner's predicted latency and memory. Records already
in `out_dir/records.jsonl` are skipped, and samples already done within an
interrupted run are reused from `out_dir/runs/`, so a sweep resumes (records.jsonl
marks the folder as a sweep's; any other non-empty folder is refused, and --force
replaces only another egm-edge artifact). The table,
the plots and the recommendation are then computed from the records alone
(`analyze`), which is also how a different `latency_budget_ms` is answered
without running anything again.

The measurement is cut into units (`egm_edge.sweep.units`: recipe, budget, target,
shard of samples) that an executor runs: in this process by default, or as Ray tasks
with `cluster` (`egm_edge.sweep.cluster`), where targets other than cpu are measured
on the nodes offering `target:<name>` (records with `measured_on`) and keep the
planner's prediction until such a node has measured them. There, with `target_engine`
"tensorrt" (the default), a gpu/jetson target runs its own bundle, built here once per
recipe (`bundles.device_bundle_for`) and shipped like the CPU ones, whose engines the
node compiles if it has none; a node that cannot (no TensorRT) says so in one sentence
among the notes and the target keeps its predicted record. With "cpu" a target's node
runs the recipe's CPU bundle through ONNX Runtime. Every measured record says its
`engine` (records without it were "onnxruntime-cpu", or "pytorch-reference" when
measured with a checkpoint). Either way this process alone writes runs/ and
records.jsonl, each record as its run's last rows arrive.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from egm_edge.errors import CheckpointError, InputError

DEFAULT_RECIPES = ("full", "fp8", "int4_awq")
DEFAULT_BUDGETS = (0, 16, 32, 64, 128, "unlimited")  # runtime.settings.UNLIMITED
TARGET_ENGINES = ("tensorrt", "cpu")  # what a --cluster sweep runs on a gpu/jetson target's node
ORT_CPU = "onnxruntime-cpu"  # a record's `engine` for the CPU bundle (and for records older than the field)


@dataclass
class SweepResult:
    out_dir: Path
    records: list[dict]
    recommendations: dict[str, dict]
    plots: dict[str, Path]
    table: str
    ran: int = 0  # runs measured now (the rest came from records.jsonl)
    notes: list[str] = field(default_factory=list)
    nodes: dict[str, dict] = field(default_factory=dict)  # where units ran now: {node: {"units", "seconds"}}
    measure_s: float = 0.0  # wall seconds of the measurement phase (the executor running the units)
    auto: Any = None  # sweep.auto_search.AutoResult when the recipes held AutoQuantize rungs

    def summary(self) -> str:
        lines = [self.table, ""]
        lines += [f"recommendation: {rec['why']}" for rec in self.recommendations.values()]
        lines += [f"plot ({t}): {p}" for t, p in self.plots.items()]
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"report: {self.out_dir / 'report.md'}; records: {self.out_dir / 'records.jsonl'} ({self.ran} runs measured now)")
        return "\n".join(lines)


def _check_budgets(budgets) -> tuple:
    """Each budget parsed once: tokens or UNLIMITED; None, the sweep bundles' default, is unlimited."""
    from egm_edge.runtime.settings import UNLIMITED, parse_think_budget

    out = tuple(UNLIMITED if b is None else parse_think_budget(b) for b in budgets)
    if not out or len(set(out)) != len(out):
        raise InputError(f"Think budgets {list(budgets)} must be a non-empty list without repeats.")
    return out


def _targets(names):
    from egm_edge.targets import load_target

    ts = [load_target(n) for n in names]
    if not ts:
        raise InputError("No target given; pass at least cpu.")
    return ts


def analyze(records: list[dict], out_dir, *, targets=None, latency_budget_ms: float | None = None,
            memory_budget_gb: float | None = None, plot: bool = True) -> tuple[dict, dict, str, list[str]]:
    """Recommendations, plots, the table and notes from records only; writes report.md and summary.json."""
    from egm_edge.errors import EgmError
    from egm_edge.sweep.analysis import recommend, table
    from egm_edge.sweep.plot import plot_target

    out = Path(out_dir)
    targets = list(dict.fromkeys(targets or [r["target"] for r in records]))
    recs = {t: recommend(records, t, latency_budget_ms, memory_budget_gb) for t in targets}
    plots, notes = {}, []
    for t in targets:
        if not plot:
            break
        try:
            p = plot_target(records, t, out / f"pareto-{t}.png", latency_budget_ms, recs[t]["record"])
        except EgmError as e:
            notes.append(str(e))
            break
        if p is not None:
            plots[t] = p
    tab = table(records)
    lines = ["# Sweep: accuracy vs latency", "", *_provenance(records), "", tab, "", "## Recommendation", ""]
    lines += [f"- {r['why']}" for r in recs.values()]
    lines += [""] + [f"![{t}]({p.name})" for t, p in plots.items()] + [f"- {n}" for n in notes]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    summary = {"latency_budget_ms": latency_budget_ms, "memory_budget_gb": memory_budget_gb,
               "recommendations": {t: {"key": (r["record"] or {}).get("key"), "why": r["why"]} for t, r in recs.items()},
               "plots": {t: p.name for t, p in plots.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return recs, plots, tab, notes


def _provenance(records: list[dict]) -> list[str]:
    """Where the records' accuracy and latency come from, one sentence per kind of run."""
    out = []
    if any(not r.get("measured_on") for r in records):
        out.append("Accuracy is measured on this machine with the CPU bundle (or, for recipes the CPU runtime cannot run, the "
                   "quantized checkpoint through the PyTorch reference); latency is measured for target cpu and predicted by "
                   "the planner (roofline x calibrated efficiency) for other targets; memory is predicted.")
    how = {"tensorrt": "its own bundle's TensorRT engines", ORT_CPU: "the CPU bundle through ONNX Runtime",
           "pytorch-reference": "the PyTorch reference"}
    for (target, where, engine) in dict.fromkeys((r["target"], r["measured_on"], r.get("engine")) for r in records
                                                 if r.get("measured_on")):
        through = f" with {how.get(engine, engine)}" if engine else ""
        out.append(f"On {target}, accuracy and latency are measured at {where}{through}, one request at a time; memory is not "
                   "measured.")
    return out


def is_sweep_dir(d) -> bool:
    """Whether `d` is a sweep's own output (it resumes there): it holds records.jsonl."""
    from egm_edge.sweep.records import RECORDS

    return (Path(d) / RECORDS).is_file()


def sweep(model_dir, recipes=DEFAULT_RECIPES, budgets=DEFAULT_BUDGETS, targets=("cpu",), *, data, out_dir,
          limit: int | None = None, latency_budget_ms: float | None = None, memory_budget_gb: float | None = None,
          calibration=None, image_root=None, strict: bool = True, seed: int = 0, max_answer_tokens: int = 128,
          max_seq_len: int = 4096, progress: bool = True, say: Callable[[str], None] | None = None,
          calib_with_reasoning: bool = False, force: bool = False, cluster: str | None = None,
          cluster_timeout: float = 120.0, shared_dir=None, shard_size: int | None = None,
          target_engine: str = "tensorrt", auto_bits=None, max_acc_drop: float = 1.0,
          max_miou_drop: float = 1.0, gate: str = "significant") -> SweepResult:
    """Run (or resume) the sweep into `out_dir` and recommend a configuration; see the module docstring.

    `out_dir` is new, empty or a sweep's own (its records.jsonl: resumed); `force` replaces another egm-edge
    artifact there, never a folder of other files nor one that is, holds or lies inside an input.
    `cluster` ("auto", "HOST:PORT", "ray://HOST:PORT"): units run as Ray tasks (`egm_edge.sweep.cluster`), shards of
    `shard_size` samples (default 16; locally one unit per run); units whose target no node offers for
    `cluster_timeout` seconds are reported; `shared_dir`: a folder every node sees, bundles placed there;
    `target_engine` ("tensorrt" or "cpu"): what a gpu/jetson target's node runs (see the module docstring).
    Recipe "auto" becomes one recipe per rung of `auto_bits` (default `auto_search.LADDER`) and, once measured, the
    rungs are validated against the full model until one passes the gate (`max_acc_drop`, `max_miou_drop`, `gate`): the
    pick is in the result's `auto`, auto/auto.md and the report (`egm_edge.sweep.auto_search`)."""
    from egm_edge.artifacts import check_output_dir, prepare_output_dir
    from egm_edge.reference.runner import read_model_config
    from egm_edge.sweep import bundles as B
    from egm_edge.sweep import records as R
    from egm_edge.validate.api import load_data, subset
    from egm_edge.sweep.analysis import budget_label
    from egm_edge.sweep.units import Artifact, Unit, executor_for, shards
    from egm_edge.validate.store import PredictionStore, sample_ids, samples_digest

    say = say or (lambda _m: None)
    model_dir, out = Path(model_dir), Path(out_dir)
    if target_engine not in TARGET_ENGINES:
        raise InputError(f"Unknown target engine {target_engine!r}. Choose from: {', '.join(TARGET_ENGINES)}.")
    executor = executor_for(cluster, cluster_timeout, shared_dir, shard_size)
    shard_size = shard_size or (16 if cluster else None)
    inputs = [model_dir] + [p for p in (data, calibration, image_root) if isinstance(p, (str, Path))]
    check_output_dir(out, force, inputs=inputs, own=is_sweep_dir, resume=True)  # before anything is read
    read_model_config(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"Model directory {model_dir} has no tokenizer.json; copy the model's tokenizer files there.")
    from egm_edge.sweep import auto_search

    budgets, tprofiles = _check_budgets(tuple(budgets)), _targets(targets)
    recipes = B.check_recipes(auto_search.expand(tuple(recipes), tprofiles, tuple(auto_bits or auto_search.LADDER)))
    for name, v in (("latency_budget_ms", latency_budget_ms), ("memory_budget_gb", memory_budget_gb)):
        if v is not None and (not isinstance(v, (int, float)) or v <= 0):
            raise InputError(f"{name} must be a positive number, got {v!r}.")
    if isinstance(data, (str, Path)) and not Path(data).exists():
        raise InputError(f"Data file {data} does not exist; pass an EGM eval .jsonl file with --data.")
    samples, _ = load_data(data, image_root, strict)
    if not samples:
        raise InputError(f"No usable samples in {data}; nothing to sweep.")
    samples = subset(samples, limit, seed)
    ids = sample_ids(samples)
    by_id = dict(zip(ids, samples))
    groups = {i: s.split or "-" for i, s in by_id.items()}
    image_wh = (int(statistics.median(s.width for s in samples)), int(statistics.median(s.height for s in samples)))
    spec, notes = None, []
    try:
        from egm_edge.models import spec_from_config

        spec = spec_from_config(model_dir / "config.json")
    except Exception as e:  # noqa: BLE001 - predictions are optional; say why they are missing
        notes.append(f"no latency predictions for other targets: the planner cannot read {model_dir / 'config.json'} ({e}).")
    cpu = next((t for t in tprofiles if t.name == "cpu"), None) or _targets(["cpu"])[0]
    others = [t for t in tprofiles if t.name != "cpu"]

    if executor.name == "ray":
        executor.connect()  # an unreachable cluster is one sentence before any bundle is built
    prepare_output_dir(out, force, inputs=inputs, own=is_sweep_dir)
    store = R.RecordStore(out)
    store.path.touch()  # marks the folder as this sweep's at once, so a run stopped while building its first bundle resumes
    caps = {"max_answer_tokens": max_answer_tokens, "max_seq_len": max_seq_len}
    on_nodes = executor.name == "ray"  # targets other than cpu are then measured on the nodes that offer them
    wanted, ran, total, plan, units = [], 0, len(recipes) * len(budgets), [], []
    runs: dict[tuple, _Run] = {}
    for recipe in recipes:
        calib = calibration if calibration is not None else B.default_calibration()
        if recipe != B.FULL and isinstance(calib, (str, Path)) and not Path(calib).is_file():
            raise InputError(f"Recipe {recipe} needs a calibration recipe and {calib} does not exist; pass --calib FILE.toml.")
        bkey = B.bundle_key(model_dir, recipe, calib, caps, calib_with_reasoning)
        rkey = R.run_key(bkey, samples_digest(by_id), caps)
        keys = {b: [R.record_key(recipe, b, t.name, rkey) for t in [cpu, *others]] for b in budgets}
        wanted += [k for ks in keys.values() for k in ks]
        have = {r["key"]: r for r in store.load()}
        measured_on = {t.name for t in others if on_nodes and _offers(t, recipe)}
        engine = {t.name: _target_engine(t, target_engine) for t in others}
        todo = [b for b in budgets if not all(_done(have.get(k), t.name in measured_on, engine.get(t.name))
                                              for t, k in zip([cpu, *others], keys[b]))]
        if not todo:
            say(f"{recipe}: all {len(budgets)} budgets already recorded")
            continue
        runner = _runner(model_dir, recipe, out, cpu, calib, max_answer_tokens, max_seq_len, say, progress, calib_with_reasoning)
        art = Artifact.of(runner.path, runner.kind)
        on_device = {t.name: _device_runner(model_dir, recipe, t, out, calib, budgets, image_wh, max_answer_tokens, say,
                                            calib_with_reasoning, notes)
                     for t in others if t.name in measured_on and engine[t.name] == "tensorrt"}
        measured_on -= {name for name, r in on_device.items() if r is None}  # no bundle: the planner's record stays
        for b in todo:
            ran += 1
            plan.append((recipe, b, rkey, keys[b], runner))
            for t, k in zip([cpu, *others], keys[b]):
                if (t is cpu and k in have) or (t is not cpu and (t.name not in measured_on or
                                                          _done(have.get(k), True, engine[t.name]))):
                    continue
                name = f"{recipe}-{budget_label(b)}" if t is cpu else f"{t.name}-{recipe}-{budget_label(b)}"
                r_runner, r_art, config = runner, art, rkey
                if on_device.get(t.name) is not None:  # its own bundle's rows, apart from the CPU bundle's in that file
                    r_runner = on_device[t.name]
                    r_art = Artifact.of(r_runner.path, "bundle", engine="tensorrt")
                    config = f"{rkey}|tensorrt|{r_art.sha256[:16]}"
                runs[(recipe, b, t.name)] = run = _Run(recipe, b, t, k, rkey, r_runner, PredictionStore(out / "runs", name, config),
                                                       engine="tensorrt" if r_runner is not runner else _engine_of(runner))
                run.remaining = set(pend := run.store.pending(by_id))
                units += [Unit(recipe, b, t.name, j, part, r_art, max_answer_tokens) for j, part in enumerate(shards(pend, shard_size))]

    def finish(run: _Run) -> None:
        """The run's record from its rows in runs/ (plus, for cpu, the predictions of targets not measured now)."""
        rows = run.store.load(by_id)
        rows = [rows[i] for i in ids if i in rows]
        cap = run.budget if isinstance(run.budget, int) else max((r.get("think_tokens") or 0 for r in rows), default=0)
        mem = R.predict(spec, run.target, run.recipe, 0, cap, image_wh) if spec is not None else {"supported": False}
        where = "; ".join(sorted(run.where))
        rec = R.measured_record(run.recipe, run.budget, run.rkey, run.runner, rows, mem.get("memory_gib") if mem["supported"] else None,
                                target=run.target.name,
                                extra={"engine": run.engine, **({"measured_on": where} if on_nodes and where else {})})
        if on_nodes and where:
            rec["latency"]["measured_on"] = where
        store.append(rec)
        if run.target is cpu:
            _predict_others(store, spec, rec, others, runs, image_wh)

    def on_rows(unit, rows, info) -> None:
        run = runs[unit.run]
        for row in rows:
            run.store.append(row)
            run.remaining.discard(row["id"])
        run.where.add(info["where"])
        if not run.remaining:
            finish(run)

    def on_start(unit) -> None:
        if unit.target == cpu.name and unit.shard == 0:
            say(f"[{recipes.index(unit.recipe) * len(budgets) + budgets.index(unit.budget) + 1}/{total}] {unit.recipe}, "
                f"think budget {budget_label(unit.budget)}")

    for run in [r for r in runs.values() if not r.remaining]:  # every sample already in runs/: nothing to measure
        finish(run)
    t0 = time.perf_counter()
    try:
        nodes = executor.run(units, by_id, groups, on_rows, progress=progress, on_start=on_start, say=say) if units else {}
    finally:
        getattr(executor, "close", lambda: None)()
    measure_s = time.perf_counter() - t0
    notes += getattr(executor, "notes", [])
    for recipe, b, rkey, ks, runner in plan:  # targets whose measurement did not finish (or was not asked for): predicted
        measured = next((r for r in store.load() if r["key"] == ks[0]), None)
        if measured is not None:
            _predict_others(store, spec, measured, others, {}, image_wh)
    for node, n in sorted(nodes.items()):
        say(f"node {node}: {n['units']} units in {n['seconds']:.1f} s")
    records = [r for r in store.load() if r["key"] in set(wanted)]
    recs, plots, tab, more = analyze(records, out, targets=[cpu.name, *[t.name for t in others]],
                                     latency_budget_ms=latency_budget_ms, memory_budget_gb=memory_budget_gb)
    auto = None
    if auto_search.rungs(recipes):
        full, _ = B.bundle_for(model_dir, B.FULL, out / "bundles", max_answer_tokens=max_answer_tokens, max_seq_len=max_seq_len,
                               say=say)
        auto = auto_search.search(out, recipes, full, data, limit=limit, seed=seed, image_root=image_root, strict=strict,
                                  max_new_tokens=max_seq_len // 2, max_acc_drop=max_acc_drop, max_miou_drop=max_miou_drop, say=say,
                                  gate=gate)
        more.append(auto.sentence())
        with open(out / "report.md", "a") as f:
            f.write(f"\n## Recipe auto\n\n{auto.sentence()} ([rungs and layer maps](auto/auto.md))\n")
    return SweepResult(out, records, recs, plots, tab, ran, notes + more, nodes, round(measure_s, 3), auto)


@dataclass
class _Run:
    """One (recipe, budget, target) being measured now: its prediction rows, the ids still missing, where it ran."""

    recipe: str
    budget: Any
    target: Any  # a target profile
    key: str
    rkey: str
    runner: "Runner"
    store: Any  # validate.store.PredictionStore
    remaining: set = field(default_factory=set)
    where: set = field(default_factory=set)
    engine: str = ORT_CPU  # the record's `engine`


def _done(record: dict | None, measured_there: bool, engine: str | None = None) -> bool:
    """Whether a record needs no work: present, and measured where its target's latency is now measured on a node,
    through TensorRT exactly when `engine` is "tensorrt" (a sweep switching --target-engine measures again)."""
    if record is None or not measured_there:
        return record is not None
    on_trt = record.get("engine", ORT_CPU) == "tensorrt"
    return record.get("latency", {}).get("source") == "measured" and (engine is None or on_trt == (engine == "tensorrt"))


def _target_engine(target, target_engine: str) -> str:
    """The `engine` a --cluster sweep measures `target` through on its node: TensorRT engines or the CPU bundle."""
    return "tensorrt" if target_engine == "tensorrt" and target.kind != "cpu" else ORT_CPU


def _engine_of(runner) -> str:
    """The `engine` of a record measured with the recipe's CPU runner."""
    return ORT_CPU if runner.kind == "bundle" else "pytorch-reference"


def _device_runner(model_dir: Path, recipe: str, target, out: Path, calib, budgets, image_wh, max_answer_tokens: int, say,
                   with_reasoning: bool, notes: list[str]) -> "Runner | None":
    """The recipe's own bundle for gpu/jetson `target`, built here once (engines compiled on its node), or None with
    the pipeline's refusal among `notes`: that target then keeps the planner's records."""
    from egm_edge.errors import EgmError
    from egm_edge.runtime.bundle import open_bundle
    from egm_edge.runtime.settings import UNLIMITED
    from egm_edge.sweep import bundles as B

    cap = UNLIMITED if UNLIMITED in budgets else max(budgets)  # one bundle planned for every budget of the sweep
    try:
        path, _ = B.device_bundle_for(model_dir, recipe, target, out / "bundles", out / "stages", calibration=calib,
                                      think_budget=cap, image_wh=image_wh, max_answer_tokens=max_answer_tokens, say=say,
                                      with_reasoning=with_reasoning)
    except EgmError as e:
        notes.append(f"No {target.name} bundle of {recipe} could be built here ({str(e).rstrip('.')}); its records keep the "
                     "planner's prediction (--target-engine cpu measures the CPU bundle on that node instead).")
        return None
    return Runner(None, path, open_bundle(path).precision, "bundle", None)


def _offers(target, recipe: str) -> bool:
    """Whether the target's profile runs the recipe at all (else its record is the planner's 'unsupported')."""
    from egm_edge.errors import UnsupportedError
    from egm_edge.sweep.records import planner_precision
    from egm_edge.targets import check_precision

    try:
        check_precision(target, planner_precision(recipe, target))
    except UnsupportedError:
        return False
    return True


def _predict_others(store, spec, measured: dict, others, runs: dict, image_wh) -> None:
    """Predicted records, from a measured cpu record, for the targets with no record and none being measured."""
    from egm_edge.sweep import records as R

    if spec is None:
        return
    have = store.keys()
    think = measured["accuracy"]["mean_think_tokens"] or 0.0
    b = measured["think_budget"]
    cap = b if isinstance(b, int) else (measured["latency"].get("max_think_tokens") or 0)
    budget = "unlimited" if b is None else b
    for t in others:
        k = R.record_key(measured["recipe"], budget, t.name, measured["run_key"])
        if k in have or (measured["recipe"], budget, t.name) in runs:
            continue
        store.append(R.predicted_record(measured, t, R.predict(spec, t, measured["recipe"], think, cap, image_wh)))


def _image(sample) -> Any:
    from egm_edge.runtime.image import load_image

    return load_image(sample.image, exif_transpose=False)


@dataclass(frozen=True)
class Runner:
    """What measures one recipe on this machine: a CPU bundle, or (where the CPU runtime has no kernels for the
    recipe) the quantized checkpoint through the PyTorch reference, whose latency is then no deployment figure."""

    predictor: Any
    path: Path
    precision: str
    kind: str  # "bundle" | "checkpoint"
    not_deployable: str | None  # why the cpu profile does not offer this precision; None when it does


def _runner(model_dir: Path, recipe: str, out: Path, cpu, calib, max_answer_tokens: int, max_seq_len: int, say, progress,
            with_reasoning: bool = False) -> Runner:
    from egm_edge.errors import EgmError, UnsupportedError
    from egm_edge.runtime.bundle import open_bundle
    from egm_edge.sweep import bundles as B
    from egm_edge.sweep.records import planner_precision
    from egm_edge.targets import check_precision
    from egm_edge.validate.predictors import BundlePredictor, CheckpointPredictor

    def reference(why: str) -> Runner:
        path, _ = B.checkpoint_for(model_dir, recipe, out / "checkpoints", calibration=calib, say=say, quantize_progress=progress,
                                   with_reasoning=with_reasoning)
        say(f"{recipe}: measured with the PyTorch reference ({why})")
        why += "; measured with the PyTorch reference (dequantized, activations fake-quantized): its accuracy counts, its latency does not."
        return Runner(CheckpointPredictor(path), path, recipe, "checkpoint", why)

    try:
        check_precision(cpu, planner_precision(recipe, cpu))
    except UnsupportedError as e:
        return reference(str(e).rstrip("."))
    try:
        path, _ = B.bundle_for(model_dir, recipe, out / "bundles", checkpoints_dir=out / "checkpoints", calibration=calib,
                               max_answer_tokens=max_answer_tokens, max_seq_len=max_seq_len, say=say, quantize_progress=progress,
                               with_reasoning=with_reasoning)
    except EgmError as e:
        if recipe == B.FULL:
            raise
        return reference(f"no CPU bundle could be built for {recipe}: {str(e).rstrip('.')}")
    return Runner(BundlePredictor(path), path, open_bundle(path).precision, "bundle", None)
