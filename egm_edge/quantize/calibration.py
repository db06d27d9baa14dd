"""Calibration recipes (TOML in `calibration/`) and the registry of calibration sources.

Contract: `CalibrationRecipe.from_toml(path)` reads and validates a recipe:
sources (each a registered `kind` with its options and a `weight` in the mix),
sample count, held-out count (for the fidelity report, never calibrated on),
seed, prompt style (`task`: vanilla, amodal or mixed as the source says) and
image size policy (`max_pixels`/`min_pixels`: "model" keeps the checkpoint's own
processor settings, an integer caps them). `select_samples(recipe)` returns
`(calibration, holdout)` lists of `egm_edge.data.Sample`, drawn deterministically
from the seed, allocated across sources by weight. A recipe whose sources give
no usable sample raises an InputError that says which source and why.
Relative paths in a recipe resolve against the TOML file's folder. Pure Python.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from egm_edge.errors import InputError

TASKS = ("vanilla", "amodal", "source")
MIN_NEW_TOKENS = 64  # "source": each sample keeps the task its data says


@dataclass(frozen=True)
class SourceSpec:
    """One calibration source: a registered kind, its options, and its share of the samples."""

    kind: str
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.kind not in SOURCES:
            raise InputError(f"Unknown calibration source kind {self.kind!r}. Choose from: {', '.join(SOURCES)}.")
        if not isinstance(self.weight, (int, float)) or isinstance(self.weight, bool) or not self.weight > 0:
            raise InputError(f"Calibration source {self.kind} has weight {self.weight!r}; give a positive number.")
        allowed = SOURCES[self.kind].options
        unknown = sorted(set(self.options) - set(allowed))
        if unknown:
            raise InputError(f"Calibration source {self.kind} has unknown options {unknown}; it takes: {', '.join(allowed)}.")
        whole = SOURCES[self.kind].whole
        for key, value in self.options.items():
            if key in whole:
                if not isinstance(value, int) or isinstance(value, bool) or value < whole[key]:
                    raise InputError(f"Calibration source {self.kind} has {key}={value!r}; give a whole number of at least {whole[key]}.")
            elif not isinstance(value, (str, os.PathLike)):
                raise InputError(f"Calibration source {self.kind} has {key}={value!r}; give it as text, in quotes.")


@dataclass(frozen=True)
class CalibrationRecipe:
    """What to calibrate on: validated when built, round-trips through a plain dict."""

    name: str
    sources: tuple[SourceSpec, ...]
    samples: int = 32
    holdout: int = 4
    seed: int = 0
    task: str = "source"
    max_pixels: int | str = "model"
    min_pixels: int | str = "model"
    max_new_tokens: int = 512  # reasoning length cap for --calib-with-reasoning
    description: str = ""
    base_dir: str = "."  # folder relative paths resolve against (the TOML's folder)

    def __post_init__(self) -> None:
        where = f"Calibration recipe {self.name!r}"
        if not self.sources:
            raise InputError(f"{where} lists no [[sources]]; add at least one of: {', '.join(SOURCES)}.")
        for key in ("samples", "max_new_tokens"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InputError(f"{where} has {key}={v!r}; give a positive whole number.")
        if self.max_new_tokens < MIN_NEW_TOKENS:
            raise InputError(f"{where} has max_new_tokens={self.max_new_tokens}; give at least {MIN_NEW_TOKENS} (reasoning plus an answer).")
        if not isinstance(self.holdout, int) or isinstance(self.holdout, bool) or self.holdout < 0:
            raise InputError(f"{where} has holdout={self.holdout!r}; give a whole number >= 0.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise InputError(f"{where} has seed={self.seed!r}; give a whole number.")
        if self.task not in TASKS:
            raise InputError(f"{where} has task={self.task!r}. Choose from: {', '.join(TASKS)}.")
        for key in ("max_pixels", "min_pixels"):
            v = getattr(self, key)
            if v != "model" and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise InputError(f"{where} has {key}={v!r}; give \"model\" or a positive number of pixels.")

    @classmethod
    def from_dict(cls, d: dict[str, Any], base_dir: str | Path | None = None, name: str | None = None) -> "CalibrationRecipe":
        d = dict(d)
        stored_base = d.pop("base_dir", ".")
        base_dir = stored_base if base_dir is None else base_dir
        raw_sources = d.pop("sources", None)
        if not isinstance(raw_sources, list):
            raise InputError(f"Calibration recipe {name or d.get('name')!r} needs a [[sources]] list; add at least one of: {', '.join(SOURCES)}.")
        sources = []
        for s in raw_sources:
            if not isinstance(s, dict) or "kind" not in s:
                raise InputError(f"Every calibration [[sources]] entry needs a kind; choose from: {', '.join(SOURCES)}.")
            s = dict(s)
            sources.append(SourceSpec(s.pop("kind"), s.pop("weight", 1.0), s))
        known = {f for f in cls.__dataclass_fields__} - {"sources", "base_dir"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"Calibration recipe has unknown keys {unknown}; it takes: {', '.join(sorted(known))}, sources.")
        d.setdefault("name", name or "calibration")
        return cls(sources=tuple(sources), base_dir=str(base_dir), **d)

    @classmethod
    def from_toml(cls, path: str | Path) -> "CalibrationRecipe":
        """Read a recipe file; a bare name ("synth") means the shipped recipe of that name."""
        path = recipe_file(path)
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            names = ", ".join(shipped_recipes()) or "none found"
            raise InputError(f"Calibration recipe {path} does not exist; pass your own TOML or a shipped recipe by name ({names}).") from None
        except (OSError, ValueError) as e:
            raise InputError(f"Calibration recipe {path} is not valid TOML ({e}).") from None
        return cls.from_dict(data, base_dir=path.resolve().parent, name=path.stem)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sources"] = [{"kind": s.kind, "weight": s.weight, **s.options} for s in self.sources]
        return d

    def digest(self) -> str:
        """sha256 of the recipe's content (what decides which samples are drawn)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()

    def resolve(self, p: str | None) -> Path | None:
        if p is None:
            return None
        q = Path(str(p)).expanduser()
        return q if q.is_absolute() else Path(self.base_dir) / q


# -- sources --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A registered calibration source: what options it takes and how it yields samples."""

    kind: str
    options: tuple[str, ...]
    load: Callable[["CalibrationRecipe", SourceSpec, Path], list]
    summary: str
    whole: dict[str, int] = field(default_factory=dict, hash=False)  # options that are whole numbers: their least value; the rest are text


def _egm_jsonl(recipe, spec, cache_dir):
    from egm_edge.data import load_samples

    path = _required_path(recipe, spec, "path")
    res = load_samples(path, image_root=recipe.resolve(spec.options.get("image_root")), strict=False,
                       split=spec.options.get("split"), check_images=True)
    return res.samples, res.summary()


def _refer(recipe, spec, cache_dir):
    from egm_edge.data import load_samples

    path = _required_path(recipe, spec, "path")
    res = load_samples(path, image_root=recipe.resolve(spec.options.get("image_root")), strict=False,
                       split=spec.options.get("split", "train"), check_images=True)
    return res.samples, res.summary()


def _coco_instances(recipe, spec, cache_dir):
    from egm_edge.data import load_coco_instances, templated_samples

    path = _required_path(recipe, spec, "path")
    images = load_coco_instances(path, recipe.resolve(spec.options.get("image_root")), strict=False)
    samples = [s for s in templated_samples(images, seed=recipe.seed) if s.image.is_file()]
    return samples, f"{len(samples)} templated expressions over {len(images)} COCO images of {path.name}"


def _synth(recipe, spec, cache_dir):
    from egm_edge.data import load_samples
    from egm_edge.synth import JSONL_NAME, generate

    n = int(spec.options.get("n", max(recipe.samples + recipe.holdout, 8)))
    seed = int(spec.options.get("seed", 1_000_003 + recipe.seed))  # a stream the training never uses by default
    out = Path(cache_dir) / f"synth-{seed}-{n}"
    if not (out / JSONL_NAME).is_file():
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        generate(out, n, seed)
    res = load_samples(out / JSONL_NAME, strict=True)
    return res.samples, f"{len(res.samples)} synthetic samples (seed {seed})"


def _required_path(recipe: CalibrationRecipe, spec: SourceSpec, key: str) -> Path:
    if not spec.options.get(key):
        raise InputError(f"Calibration source {spec.kind} in recipe {recipe.name!r} needs {key} = \"...\".")
    p = recipe.resolve(spec.options[key])
    if not p.exists():
        raise InputError(f"Calibration source {spec.kind} in recipe {recipe.name!r}: {p} does not exist; fix {key} in the recipe.")
    return p


SOURCES: dict[str, Source] = {
    s.kind: s
    for s in (
        Source("egm_jsonl", ("path", "image_root", "split"), _egm_jsonl, "EGM eval JSONL with images"),
        Source("refer", ("path", "image_root", "split"), _refer, "refer-format RefCOCO/+/g (refs(*).p + instances.json)"),
        Source("coco_instances", ("path", "image_root"), _coco_instances, "COCO instances with templated expressions"),
        Source("synth", ("n", "seed"), _synth, "the synthetic shapes world (egm_edge.synth)", whole={"n": 1, "seed": 0}),
    )
}


def _allocate(total: int, weights: list[float]) -> list[int]:
    """Largest-remainder split of `total` by weight."""
    s = sum(weights)
    raw = [total * w / s for w in weights]
    base = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: base[i] - raw[i])[: total - sum(base)]:
        base[i] += 1
    return base


def select_samples(recipe: CalibrationRecipe, cache_dir: str | Path) -> tuple[list, list, list[dict[str, Any]]]:
    """(calibration samples, held-out samples, per-source summary), deterministic for the recipe's seed."""
    want = recipe.samples + recipe.holdout
    counts = _allocate(want, [s.weight for s in recipe.sources])
    rng = random.Random(recipe.seed)
    calib, hold, summary = [], [], []
    for spec, n in zip(recipe.sources, counts):
        pool, text = SOURCES[spec.kind].load(recipe, spec, Path(cache_dir))
        if not pool:
            raise InputError(
                f"Calibration source {spec.kind} of recipe {recipe.name!r} gave no usable samples ({text}); "
                "fix its path/split or remove it from the recipe."
            )
        picked = rng.sample(pool, min(n, len(pool)))
        n_hold = round(len(picked) * recipe.holdout / want) if want else 0
        if recipe.holdout and len(picked) > 1:
            n_hold = max(1, n_hold)
        hold += picked[:n_hold]
        calib += picked[n_hold:]
        summary.append({"kind": spec.kind, "weight": spec.weight, "options": spec.options, "available": len(pool),
                        "calibration": len(picked) - n_hold, "holdout": n_hold, "note": text})
    if not calib:
        raise InputError(f"Calibration recipe {recipe.name!r} gave no calibration samples; raise samples or add a source.")
    return calib, hold, summary


def sample_task(recipe: CalibrationRecipe, sample) -> str:
    return sample.task if recipe.task == "source" else recipe.task


def recipes_dir() -> Path:
    """The shipped calibration recipes: in the wheel (egm_edge/_data/calibration), else the checkout's calibration/."""
    from egm_edge.artifacts import shipped_dir

    return shipped_dir("calibration", "calibration")


def recipe_file(name_or_path: str | Path) -> Path:
    """The recipe file a --calib value names: a path as given, or a bare name ("synth") of a shipped recipe."""
    path = Path(name_or_path)
    if not path.exists() and path.suffix == "" and path.name == str(path):
        shipped = recipes_dir() / f"{path.name}.toml"
        if shipped.is_file():
            return shipped
    return path


def shipped_recipes() -> list[str]:
    d = recipes_dir()
    return sorted(p.stem for p in d.glob("*.toml")) if d.is_dir() else []
