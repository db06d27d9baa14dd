"""Target device profiles (build/targets/*.toml) and the registry of precisions.

Contract: `load_target(name_or_path)` returns a frozen, validated `TargetProfile`
(compute capability, memory and whether the CPU shares it, bandwidth, dense peak
rates per compute format, the precisions a bundle can be built in, the precisions
that are checkpoint only (`serving_precisions`: a TensorRT-LLM serving config for
the quantized checkpoint, no bundle, because the ONNX/TensorRT lowering has no path
for them), software versions the build notes assume, optional calibration of the
planner's efficiency factors);
`list_targets()` lists the shipped profiles. `PRECISIONS` is the one registry of
precisions (fp32, fp16, bf16 and the quantize stage's recipes, whose names,
weight formats and block sizes it takes from `egm_edge.quantize.recipes`), with
bytes per weight including block scales. `check_precision(target, precision)`
(what a bundle build asks) raises `UnsupportedError` naming why and the
alternatives, for a checkpoint-only precision too; `check_servable` (what the
planner asks) also accepts the checkpoint-only ones. Pure Python.

Profiles are found in `$EGM_EDGE_TARGETS` if set, else in the installed package
(`egm_edge/_data/targets`, shipped from build/targets by the wheel), else in the
repository's build/targets.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from egm_edge.errors import CheckpointError, InputError, UnsupportedError
from egm_edge.quantize.recipes import AUTO_EFFECTIVE_BITS, AUTO_FORMATS, RECIPES

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 needs the tomli backport
    import tomli as tomllib

KINDS = ("cpu", "gpu", "jetson")
COMPUTE_FORMATS = ("fp32", "fp16", "bf16", "fp8", "int8", "fp4")
KV_DTYPES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}


@dataclass(frozen=True)
class Precision:
    """How one precision stores weights and which tensor-core format its GEMMs run in."""

    name: str
    label: str  # how error messages name the format ("FP8", "NVFP4")
    bytes_per_weight: float  # including block scales
    compute: str | None  # key of TargetProfile.peak_tflops for GEMMs; None = weight-only, the target's 16-bit (fp32 on CPU)
    min_sm: tuple[int, int] | None = None  # hardware floor on NVIDIA GPUs
    description: str = ""

    @property
    def quantized(self) -> bool:
        return self.name in RECIPES


_WEIGHT_BYTES = {"fp8": 1.0, "int8": 1.0, "int4": 0.5, "nvfp4": 0.5}
_SCALE_BYTES = {"int4": 2.0, "nvfp4": 1.0}  # per block: an FP16 scale (INT4 AWQ), an FP8 e4m3 scale (NVFP4)
_COMPUTE = {None: None, "fp8": "fp8", "int8": "int8", "nvfp4": "fp4"}  # activation format -> GEMM format
_LABELS = {"fp8": "FP8", "int8_sq": "INT8 SmoothQuant", "int4_awq": "INT4 AWQ", "w4a8_awq": "W4A8 AWQ", "nvfp4": "NVFP4"}
# FP8 tensor cores arrive with Ada (SM 8.9); NVFP4 with Blackwell (SM 10.0). W4A8 runs FP8 activations.
_MIN_SM = {"fp8": (8, 9), "w4a8_awq": (8, 9), "nvfp4": (10, 0)}
# Recipes egm_edge/export/lowering.py refuses (no ONNX/TensorRT path): checkpoint only, never in a profile's precisions.
NO_BUNDLE_LOWERING = ("w4a8_awq", "nvfp4")


def _from_recipe(name: str) -> Precision:
    r = RECIPES[name]
    per_weight = _WEIGHT_BYTES[r.weights]
    if r.weights in _SCALE_BYTES:
        per_weight += _SCALE_BYTES[r.weights] / (r.block_size or 1)
    return Precision(name, _LABELS.get(name, name.upper()), per_weight, _COMPUTE[r.activations], _MIN_SM.get(name), r.description)


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", "FP32", 4.0, "fp32", description="32-bit float weights and activations (CPU reference)."),
    "fp16": Precision("fp16", "FP16", 2.0, "fp16", description="16-bit float weights and activations."),
    "bf16": Precision("bf16", "BF16", 2.0, "bf16", (8, 0), description="bfloat16 weights and activations (SM 8.0+)."),
    **{name: _from_recipe(name) for name in ("fp8", "int8_sq", "int4_awq", "w4a8_awq", "nvfp4")},
    # Per-layer formats (egm_edge.quantize.auto): planned at the default constraint, weight-only compute (the
    # conservative reading: INT8/FP8 layers run faster than that). A checkpoint's own bytes replace this once it exists.
    "auto": Precision("auto", "mixed per-layer (AutoQuantize)", AUTO_EFFECTIVE_BITS / 8, None,
                      description=RECIPES["auto"].description),
}


def auto_formats(target: "TargetProfile") -> tuple[str, ...]:
    """The per-layer formats recipe auto may give a layer on `target`: those of AUTO_FORMATS its bundles run."""
    return tuple(f for f in AUTO_FORMATS if f in target.precisions)


def get_precision(name: str) -> Precision:
    if name not in PRECISIONS:
        raise InputError(f"Unknown precision {name!r}. Choose from: {', '.join(PRECISIONS)}.")
    return PRECISIONS[name]


@dataclass(frozen=True)
class TargetProfile:
    """One deployment target, as its TOML file describes it (units in the field names)."""

    name: str
    kind: str
    description: str
    memory_gib: float
    shared_memory: bool
    usable_fraction: float
    runtime_overhead_gib: float
    memory_bandwidth_gbs: float
    precisions: tuple[str, ...]
    peak_tflops: dict[str, float]
    compute_capability: str | None = None
    software: dict[str, str] = field(default_factory=dict)
    calibration: dict[str, float] = field(default_factory=dict)
    serving_precisions: tuple[str, ...] = ()  # checkpoint only: TensorRT-LLM serves them, no bundle can hold them

    def __post_init__(self) -> None:
        where = f"target {self.name!r}"
        if self.kind not in KINDS:
            raise CheckpointError(f"{where}: kind={self.kind!r} must be one of {', '.join(KINDS)}; fix its TOML file.")
        for name in ("memory_gib", "memory_bandwidth_gbs", "usable_fraction"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise CheckpointError(f"{where}: {name}={v!r} must be a positive number; fix its TOML file.")
        if self.usable_fraction > 1:
            raise CheckpointError(f"{where}: usable_fraction={self.usable_fraction} must be at most 1; fix its TOML file.")
        object.__setattr__(self, "precisions", tuple(self.precisions))
        object.__setattr__(self, "serving_precisions", tuple(self.serving_precisions))
        unknown = [p for p in self.precisions + self.serving_precisions if p not in PRECISIONS]
        if unknown or not self.precisions:
            raise CheckpointError(f"{where}: precisions {unknown or '[]'} are not in {', '.join(PRECISIONS)}; fix its TOML file.")
        lowered = [p for p in self.precisions if p in NO_BUNDLE_LOWERING]
        if lowered:
            raise CheckpointError(f"{where}: precisions lists {lowered}, which no bundle can hold (no ONNX/TensorRT lowering); "
                                  "move them to serving_precisions in its TOML file.")
        both = sorted(set(self.precisions) & set(self.serving_precisions))
        if both or (self.serving_precisions and not (self.software or {}).get("tensorrt_llm")):
            raise CheckpointError(f"{where}: serving_precisions {list(self.serving_precisions)} must not repeat precisions ({both}) "
                                  "and need software.tensorrt_llm to serve them; fix its TOML file.")
        if self.kind != "cpu":
            if self.sm is None:
                raise CheckpointError(f"{where}: compute_capability={self.compute_capability!r} should look like \"8.7\"; fix its TOML file.")
            for p in self.precisions + self.serving_precisions:
                floor = PRECISIONS[p].min_sm
                if floor and self.sm < floor:
                    raise CheckpointError(f"{where}: lists {p} but SM {self.sm_text} is below its SM {floor[0]}.{floor[1]}; fix its TOML file.")
        bad = [k for k in self.peak_tflops if k not in COMPUTE_FORMATS]
        missing = sorted({self.compute_format(p) for p in self.precisions + self.serving_precisions} - set(self.peak_tflops))
        if bad or missing:
            raise CheckpointError(f"{where}: peak_tflops lacks {missing} or has unknown formats {bad}; fix its TOML file.")

    @property
    def sm(self) -> tuple[int, int] | None:
        """Compute capability as (major, minor), None for CPUs or a malformed value."""
        try:
            major, minor = str(self.compute_capability).split(".")
            return int(major), int(minor)
        except (ValueError, AttributeError):
            return None

    @property
    def sm_text(self) -> str:
        return f"{self.sm[0]}.{self.sm[1]}" if self.sm else "-"

    @property
    def usable_gib(self) -> float:
        return self.memory_gib * self.usable_fraction

    def compute_format(self, precision: str) -> str:
        """The tensor format `precision`'s GEMMs run in on this target (weight-only ones dequantize to 16-bit)."""
        return PRECISIONS[precision].compute or self.unquantized_dtype

    def peak(self, compute: str) -> float:
        """Dense peak TFLOPS (TOPS for int8) of a compute format this target supports."""
        return float(self.peak_tflops[compute])

    @property
    def unquantized_dtype(self) -> str:
        """What stays unquantized (embeddings, lm_head, the vision tower) is stored in."""
        return "fp32" if self.kind == "cpu" else "fp16"

    def kv_dtypes(self) -> tuple[str, ...]:
        return ("fp32",) if self.kind == "cpu" else ("fp16", "bf16", "fp8") if "fp8" in self.precisions else ("fp16", "bf16")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["precisions"] = list(self.precisions)
        d["serving_precisions"] = list(self.serving_precisions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TargetProfile":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = required - set(d)
        if unknown or missing:
            raise CheckpointError(
                f"Target profile {d.get('name', '?')!r} has unknown keys {sorted(unknown)} or lacks {sorted(missing)}; fix its TOML file."
            )
        return cls(**d)


def targets_dir() -> Path:
    """Where the shipped profiles live (see the module docstring)."""
    env = os.environ.get("EGM_EDGE_TARGETS")
    if env:
        return Path(env)
    from egm_edge.artifacts import shipped_dir

    return shipped_dir("targets", "build/targets")


def list_targets() -> list[str]:
    d = targets_dir()
    return sorted(p.stem for p in d.glob("*.toml")) if d.is_dir() else []


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise CheckpointError(f"Cannot read target profile {path} ({e}); fix or remove the file.") from None


def load_target(name: str | Path) -> TargetProfile:
    """A shipped target by name, or any profile by the path of its .toml file."""
    path = Path(name)
    if path.suffix == ".toml" and path.is_file():
        return TargetProfile.from_dict(_read_toml(path))
    file = targets_dir() / f"{name}.toml"
    if not file.is_file():
        raise InputError(f"Unknown target {str(name)!r}. Choose from: {', '.join(list_targets())} (or pass a .toml file).")
    profile = TargetProfile.from_dict(_read_toml(file))
    if profile.name != file.stem:
        raise CheckpointError(f"Target profile {file} names itself {profile.name!r}; make name match the file name.")
    return profile


def _why_not(target: TargetProfile, p: Precision) -> str:
    if target.kind == "cpu":
        return f"ONNX Runtime's x86 CPU kernels have no fast {p.label} path"
    if p.min_sm and target.sm and target.sm < p.min_sm:
        return f"SM {target.sm_text} has no {p.label}"
    if p.name in NO_BUNDLE_LOWERING:
        return f"egm-edge has no ONNX/TensorRT lowering for {p.label}"
    return f"its profile does not offer {p.label}"


CHECKPOINT_ONLY = "checkpoint only (TensorRT-LLM serving config), no bundle"


def check_precision(target: TargetProfile, precision: str) -> Precision:
    """The `Precision` if a bundle for `target` can be built in it, else `UnsupportedError` with the reason and the choices."""
    p = get_precision(precision)
    if precision == "auto":
        if not auto_formats(target):
            raise UnsupportedError(f"Recipe auto mixes {', '.join(AUTO_FORMATS)} per layer and target {target.name} runs none of "
                                   f"them; choose from: {', '.join(n for n in PRECISIONS if n in target.precisions)}.")
        return p
    if precision in target.serving_precisions:
        choices = ", ".join(n for n in PRECISIONS if n in target.precisions)
        raise UnsupportedError(
            f"Precision {precision!r} on target {target.name} is {CHECKPOINT_ONLY}: the ONNX/TensorRT lowering has no "
            f"{p.label} path, so quantize it with `egm-edge quantize --recipe {precision}` and serve the checkpoint with "
            f"TensorRT-LLM, or build a bundle in one of: {choices}.")
    if precision not in target.precisions:
        choices = ", ".join(n for n in PRECISIONS if n in target.precisions)
        raise UnsupportedError(f"Unsupported precision {precision!r} for target {target.name} ({_why_not(target, p)}). Choose from: {choices}.")
    return p


def check_layer_formats(target: TargetProfile, formats, what: str) -> None:
    """A per-layer mixed artifact (recipe auto) runs on `target` only if every layer's format does."""
    bad = sorted({f for f in formats if f != "16-bit" and f not in target.precisions})
    if bad:
        raise UnsupportedError(f"{what} has {', '.join(bad)} layers, which target {target.name} cannot run ({_why_not(target, get_precision(bad[0]))}); "
                               f"re-quantize with --recipe auto --target {target.name}.")


def check_servable(target: TargetProfile, precision: str) -> Precision:
    """Like `check_precision`, but a checkpoint-only precision passes: the planner predicts TensorRT-LLM serving too."""
    if precision in target.serving_precisions:
        return get_precision(precision)
    return check_precision(target, precision)


def check_kv_dtype(target: TargetProfile, kv_dtype: str) -> int:
    """Bytes per cached element for `kv_dtype` on `target`, or `UnsupportedError`."""
    if kv_dtype not in target.kv_dtypes():
        raise UnsupportedError(
            f"Unsupported KV-cache dtype {kv_dtype!r} for target {target.name}. Choose from: {', '.join(target.kv_dtypes())}."
        )
    return KV_DTYPES[kv_dtype]
