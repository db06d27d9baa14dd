"""Units of sweep and validate work, (recipe or side, think budget, target, data shard), and the pure measurement of one.

Contract: a `Unit` names what to measure (its `Artifact`: the bundle, or the reference
checkpoint, named by the sha256 of its manifest, or of its fingerprint when it has
none), under which decode settings (the sweep's budget with a hard close, or the
whole `DecodeSettings` validate resolved), for which target, on which sample ids. `measure(unit, predictor, samples, groups)` grounds
those samples one request at a time and returns their prediction rows (validate's
`predict_row`), in the unit's order; it writes no file. Executors run units and hand
every row back to the driver (`on_rows(unit, rows, info)`), which alone writes
`runs/` and `records.jsonl`: `LocalExecutor` here, one unit after another (the
default), and `egm_edge.sweep.cluster.RayExecutor`, units as Ray tasks (`executor_for`
picks one; bad options are one sentence before any work). Both open one predictor per
artifact and warm it up once before its first measured request. An artifact whose `engine`
is "tensorrt" (a gpu/jetson bundle a sweep measures on its device) is opened by compiling
its engines for the device at hand if it has none (`builder.tensorrt.finalize`) and
running them; that device's refusal (no TensorRT, another GPU) is raised in one sentence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

CPU = "cpu"
TENSORRT = "tensorrt"  # Artifact.engine: the bundle's TensorRT engines, compiled on the node if it has none


@dataclass(frozen=True)
class Artifact:
    """What a unit runs: a bundle (torch-free runtime) or a quantized checkpoint (PyTorch reference)."""

    path: str  # on the driver
    kind: str  # "bundle" | "checkpoint"
    sha256: str  # of its manifest.json, written last by the stage that made it: the content key
    engine: str | None = None  # TENSORRT, or None: a bundle through its executor "auto", a checkpoint through PyTorch

    @classmethod
    def of(cls, path, kind: str, engine: str | None = None) -> "Artifact":
        from egm_edge.artifacts import sha256_file

        return cls(str(Path(path).resolve()), kind, sha256_file(Path(path) / "manifest.json"), engine)

    @property
    def key(self) -> str:
        """What one warm predictor serves: the content and the engine it runs through."""
        return f"{self.sha256}|{self.engine or 'auto'}"

    @classmethod
    def of_predictor(cls, pred) -> "Artifact":
        """The artifact a local predictor runs; a checkpoint without a manifest is named by its fingerprint."""
        import hashlib
        import json

        if (Path(pred.path) / "manifest.json").is_file():
            return cls.of(pred.path, pred.kind)
        blob = json.dumps(pred.fingerprint(), sort_keys=True).encode()
        return cls(str(Path(pred.path).resolve()), pred.kind, hashlib.sha256(blob).hexdigest())

    def open(self, path=None):
        """A predictor over this artifact at `path` (a worker's copy), else where the driver has it."""
        from egm_edge.validate.predictors import BundlePredictor, CheckpointPredictor

        where = Path(path or self.path)
        if self.engine == TENSORRT:
            from egm_edge.builder.tensorrt import finalize

            finalize(where)  # reuses this device's engines when the bundle already has them
            return BundlePredictor(where, executor=TENSORRT)
        return BundlePredictor(where) if self.kind == "bundle" else CheckpointPredictor(where)


@dataclass(frozen=True)
class Unit:
    recipe: str
    budget: int | str  # tokens or runtime.settings.UNLIMITED
    target: str
    shard: int
    ids: tuple[str, ...]
    artifact: Artifact
    max_answer_tokens: int
    decode: Any = None  # a whole resolved DecodeSettings (validate); None: `budget` with a hard close (sweep)

    @property
    def run(self) -> tuple:
        """The (recipe, budget, target) whose record this unit's rows feed."""
        return (self.recipe, self.budget, self.target)

    @property
    def resource(self) -> str:
        """The cluster resource a node must offer to run it: any CPU for target cpu, else `target:<name>`."""
        return resource_for(self.target)

    def settings(self):
        from egm_edge.runtime.settings import DecodeSettings

        if self.decode is not None:
            return self.decode
        return DecodeSettings(self.budget, "hard", self.max_answer_tokens).resolved()

    def label(self) -> str:
        from egm_edge.sweep.analysis import budget_label

        return f"{self.recipe} @ {budget_label(self.budget)} on {self.target} [shard {self.shard}]"


def resource_for(target: str) -> str:
    """The cluster resource a node must offer to run work for `target`: any CPU for cpu, else `target:<name>`."""
    return "CPU" if target == CPU else f"target:{target}"


def executor_for(cluster: str | None, timeout_s: float = 120.0, shared_dir=None, shard_size: int | None = None,
                 what: str = "sweeps"):
    """The local executor (cluster None) or a Ray one; bad options are one sentence before any work."""
    from egm_edge.errors import InputError

    if shard_size is not None and (isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1):
        raise InputError(f"The shard size must be a whole number of samples of at least 1, got {shard_size!r}.")
    if cluster is None:
        if shared_dir is not None:
            raise InputError(f"--shared-dir applies to --cluster {what} only; add --cluster ADDRESS or leave it out.")
        return LocalExecutor()
    from egm_edge.sweep.cluster import RayExecutor, _ray

    _ray()
    return RayExecutor(cluster, timeout_s=timeout_s, shared_dir=shared_dir)


def shards(ids: list[str], size: int | None) -> list[tuple[str, ...]]:
    """`ids` in order, cut into pieces of `size` (None: one piece)."""
    if not ids:
        return []
    size = size or len(ids)
    return [tuple(ids[i:i + size]) for i in range(0, len(ids), size)]


def warm_up(predictor, sample, max_answer_tokens: int) -> None:
    """One grounding that is no latency figure: the first request pays for session start-up and caches."""
    from egm_edge.runtime.image import load_image
    from egm_edge.runtime.settings import DecodeSettings

    image = load_image(sample.image, exif_transpose=False)
    predictor.predict(image, sample.expression, sample.task, DecodeSettings(0, "hard", max_answer_tokens).resolved())


def measure(unit: Unit, predictor, samples: dict, groups: dict, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """The prediction rows of the unit's samples, one request at a time; `on_row` sees each as it ends."""
    from egm_edge.validate.api import predict_row

    settings, rows = unit.settings(), []
    for i in unit.ids:
        rows.append(predict_row(predictor, samples[i], i, groups[i], settings))
        if on_row is not None:
            on_row(rows[-1])
    return rows


class LocalExecutor:
    """Units one after another in this process, rows handed over as each sample ends (an interrupted run keeps
    them), one progress bar per unit."""

    name = "local"

    def __init__(self):
        self.predictors: dict[str, Any] = {}

    def run(self, units: list[Unit], samples: dict, groups: dict, on_rows, *, progress: bool = True,
            on_start: Callable[[Unit], None] | None = None, say=None) -> dict[str, dict]:
        """Measure every unit; returns the per-node summary ({"this machine": {"units", "seconds"}})."""
        from egm_edge.validate.api import progress_bar

        node = {"units": 0, "seconds": 0.0}
        for unit in units:
            if on_start is not None:
                on_start(unit)
            t0 = time.perf_counter()
            pred = self._predictor(unit, samples)
            bar = progress_bar(len(unit.ids), f"{unit.label()} ({pred.kind})", progress)
            info = {"node": "this machine", "where": "this machine"}

            def one(row, bar=bar, unit=unit, info=info):
                on_rows(unit, [row], info)
                bar.update(1)

            try:
                measure(unit, pred, samples, groups, on_row=one)
            finally:
                bar.close()
            node["units"] += 1
            node["seconds"] += time.perf_counter() - t0
        return {"this machine": node} if node["units"] else {}

    def _predictor(self, unit: Unit, samples: dict):
        art = unit.artifact
        if art.key not in self.predictors:
            self.predictors[art.key] = pred = art.open()
            warm_up(pred, samples[unit.ids[0]], unit.max_answer_tokens)
        return self.predictors[art.key]
