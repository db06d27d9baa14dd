"""Quantization recipes: a registry of frozen specs, and the one request type `QuantSpec`.

Contract: a `Recipe` names the nvidia-modelopt config it is built from (deep-copied
at build time, never mutated) and states what it does in words a planner and a
manifest can use (weight/activation formats, calibration algorithm, weight block
size, whether it needs CUDA, and the `quant_algo` ModelOpt's unified export
writes for it). A `QuantSpec` is a whole quantization request (recipe + KV cache
+ vision policy + calibration mode); it validates when built and round-trips
through versioned JSON. Pure Python: importing this module imports no torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from egm_edge.errors import InputError

SPEC_VERSION = 1


@dataclass(frozen=True)
class Recipe:
    """One post-training quantization recipe, built on one of ModelOpt's own configs."""

    name: str
    modelopt_config: str  # attribute of modelopt.torch.quantization, deep-copied at build time
    weights: str  # "fp8", "int4", "int8", "nvfp4"
    activations: str | None  # same vocabulary, None for weight-only
    algorithm: str  # ModelOpt calibration algorithm: "max", "awq_lite", "smoothquant"
    quant_algo: str  # what export_hf_checkpoint writes as quantization.quant_algo
    block_size: int | None = None  # weight block along input channels (in_features must divide by it)
    needs_cuda: bool = False
    description: str = ""

    @property
    def weight_only(self) -> bool:
        return self.activations is None


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("fp8", "FP8_DEFAULT_CFG", "fp8", "fp8", "max", "FP8",
               description="FP8 e4m3 weights and activations, per-tensor scales (SM 8.9+)."),
        # awq_full (AWQ scaling search, then a clipping search per block), not ModelOpt's awq_lite: on the embedded grounder
        # (200 fresh samples, block 64, benchmarks/README.md "INT4 AWQ variants") it held mean IoU best with and without the
        # model's reasoning in calibration (-1.02 / -0.89 points vs awq_lite's -1.56 / -1.46) and passed the validate gate
        # where awq_lite failed it; paired against awq_lite the gain is +0.54 / +0.67 points, inside noise at that n. Cost:
        # 2.7-5x awq_lite's calibration time there (20 s vs 7.6 s with reasoning), and more at scale: on EGM-InternVL3-1B
        # (2-core CPU) the clip search took ~230 s per calibration sample beside ~34 s for awq_lite's whole pass (~8x).
        # --awq awq_lite restores ModelOpt's default (AWQ_COST_NOTE says so when quantizing).
        Recipe("int4_awq", "INT4_AWQ_CFG", "int4", None, "awq_full", "W4A16_AWQ", block_size=128,
               description="INT4 weights in blocks of 128 with AWQ scaling and clipping (awq_full), 16-bit activations."),
        Recipe("w4a8_awq", "W4A8_AWQ_BETA_CFG", "int4", "fp8", "awq_lite", "W4A8_AWQ", block_size=128,
               description="INT4 AWQ weights (block 128) with FP8 activations (SM 9.0)."),
        Recipe("int8_sq", "INT8_SMOOTHQUANT_CFG", "int8", "int8", "smoothquant", "W8A8_SQ_PER_CHANNEL",
               description="INT8 per-channel weights and per-tensor activations after SmoothQuant."),
        Recipe("nvfp4", "NVFP4_DEFAULT_CFG", "nvfp4", "nvfp4", "max", "NVFP4", block_size=16, needs_cuda=True,
               description="NVFP4 (e2m1, block 16, FP8 block scales) weights and activations (Blackwell)."),
        # Per-layer formats chosen by ModelOpt's AutoQuantize (egm_edge.quantize.auto) among AUTO_FORMATS that the target
        # runs, 16-bit always a choice; no single ModelOpt config of its own (each format's recipe config is a candidate).
        Recipe("auto", "", "mixed", "mixed", "auto_quantize", "MIXED_PRECISION",
               description="Per-layer INT4 AWQ / INT8 SmoothQuant / FP8 / 16-bit chosen by ModelOpt AutoQuantize under a size "
                           "constraint, scored by the loss on the model's own reasoning and answer (box tokens weighted)."),
    )
}
# Formats AutoQuantize may give a layer (those of them the target runs); "do not quantize" (16-bit) is always one.
AUTO_FORMATS = ("int4_awq", "int8_sq", "fp8")
# ModelOpt's AWQ calibration variants for INT4 recipes (--awq): awq_lite searches one smoothing exponent per layer,
# awq_clip a weight clipping ratio per block, awq_full both. Default: the recipe's own (int4_awq: awq_full, chosen from
# the comparison in benchmarks/README.md "INT4 AWQ variants"; w4a8_awq: ModelOpt's awq_lite).
AWQ_ALGORITHMS = ("awq_lite", "awq_clip", "awq_full")
AWQ_COST_NOTE = ("int4_awq calibrates with awq_full (scaling, then a clipping search per block: about 8x awq_lite's time "
                 "on a 1B model on CPU); --awq awq_lite is ModelOpt's faster default")
# The default AutoQuantize constraint: effective bits over the language model's Linear weights (16 = unquantized).
AUTO_EFFECTIVE_BITS = 6.0

SERVING_NOTE = ("vLLM's ModelOpt loader takes only the FP8/NVFP4 families: int4_awq, w4a8_awq, int8_sq and auto (per-layer mixed) checkpoints "
                "are for TensorRT-LLM only; w4a8_awq and nvfp4 are checkpoint only (no egm-edge bundle can hold them)")

# KV-cache options: name -> ModelOpt config attribute and the export's kv_cache_quant_algo.
KV_CACHE: dict[str, tuple[str, str]] = {"fp8": ("FP8_KV_CFG", "FP8")}
# Vision-tower policy: "16bit" keeps the tower (blocks, merger, deepstack mergers) unquantized.
VISION_MODES = ("16bit", "fp8")
INT4_BLOCK_SIZES = (64, 128)


def choose_int4_block(recipe: str, widths, block_size: int | None = None) -> tuple[int | None, str | None]:
    """`QuantSpec.block_size` for `recipe` on a model whose quantized Linears have these input widths, and the
    sentence to print about it.

    A given `block_size` is kept (QuantSpec checks it). Otherwise an INT4 recipe gets the largest of
    INT4_BLOCK_SIZES (128, then 64) that divides every width: the tiny grounder (hidden 192) takes 64, real EGM
    models their recipe's 128, which is returned as None so their specs and stage keys stay as they were.
    Recipes without INT4 blocks, and models no block divides (quantize then refuses naming a width), get None.
    """
    if block_size is not None or recipe not in RECIPES or RECIPES[recipe].weights not in ("int4", "mixed"):
        return block_size, None
    widths = [int(w) for w in widths if w]
    order = sorted(INT4_BLOCK_SIZES, reverse=True)
    block = next((b for b in order if all(w % b == 0 for w in widths)), None)
    if block is None:
        return None, None
    note = f"{recipe} block size {block} (the largest of {', '.join(map(str, order))} that divides every layer width)"
    return (None if block == (RECIPES[recipe].block_size or RECIPES["int4_awq"].block_size) else block), note


def recipe_names() -> list[str]:
    return list(RECIPES)


def get_recipe(name: str) -> Recipe:
    """The registered recipe, or an InputError listing the valid ones."""
    try:
        return RECIPES[name]
    except (KeyError, TypeError):
        raise InputError(f"Unknown quantization recipe {name!r}. Choose from: {', '.join(RECIPES)}.") from None


@dataclass(frozen=True)
class QuantSpec:
    """A whole quantization request; validated when built, versioned JSON round-trip."""

    recipe: str
    kv_cache: str | None = None
    vision: str = "16bit"
    calib_with_reasoning: bool = False
    block_size: int | None = None  # INT4 block override (TensorRT-LLM's AWQ kernels take 64 or 128); None = recipe's
    awq: str | None = None  # AWQ variant of INT4 recipes (AWQ_ALGORITHMS); None = the recipe's algorithm
    formats: tuple[str, ...] = ()  # auto only: the per-layer candidates (AUTO_FORMATS the target runs)
    effective_bits: float | None = None  # auto only: AutoQuantize's constraint over the language model's Linear weights

    def __post_init__(self) -> None:
        recipe = get_recipe(self.recipe)
        self._check_auto(recipe)
        if self.awq is not None:
            if self.awq not in AWQ_ALGORITHMS:
                raise InputError(f"Unknown AWQ variant {self.awq!r}. Choose from: {', '.join(AWQ_ALGORITHMS)}.")
            if recipe.weights not in ("int4", "mixed") or (recipe.name == "auto" and "int4_awq" not in self.formats):
                raise InputError(f"--awq {self.awq} sets how INT4 AWQ weights are calibrated and {self.describe_recipe()} has none; "
                                 "drop it, or choose int4_awq.")
        if self.block_size is not None:
            if recipe.weights not in ("int4", "mixed") or (recipe.name == "auto" and "int4_awq" not in self.formats):
                raise InputError(f"Recipe {self.recipe} has no INT4 weight blocks to resize; drop the block size (it applies to int4_awq and w4a8_awq).")
            if self.block_size not in INT4_BLOCK_SIZES:
                raise InputError(f"INT4 block size {self.block_size!r} is not supported. Choose from: {', '.join(map(str, INT4_BLOCK_SIZES))}.")
        if self.kv_cache is not None and self.kv_cache not in KV_CACHE:
            raise InputError(f"Unknown KV-cache quantization {self.kv_cache!r}. Choose from: {', '.join(KV_CACHE)} (or leave it off).")
        if self.vision not in VISION_MODES:
            raise InputError(f"Unknown vision policy {self.vision!r}. Choose from: {', '.join(VISION_MODES)}.")
        if not isinstance(self.calib_with_reasoning, bool):
            raise InputError(f"calib_with_reasoning must be true or false, got {self.calib_with_reasoning!r}.")

    def _check_auto(self, recipe: Recipe) -> None:
        if recipe.name != "auto":
            if self.formats or self.effective_bits is not None:
                raise InputError(f"Per-layer formats and effective bits are AutoQuantize settings and recipe {recipe.name} is one format; "
                                 "drop them, or choose --recipe auto.")
            return
        object.__setattr__(self, "formats", tuple(self.formats))
        if self.kv_cache is not None or self.vision != "16bit":
            raise InputError("Recipe auto searches the language model's Linear layers only; drop --kv-cache and --vision "
                             "(the KV cache and the vision tower stay 16-bit).")
        if not self.formats:
            raise InputError("Recipe auto searches per-layer formats among those a target runs; pass --target "
                             f"(e.g. cpu, jetson-orin-nano-8gb) or formats from: {', '.join(AUTO_FORMATS)}.")
        bad = [f for f in self.formats if f not in AUTO_FORMATS]
        if bad or len(set(self.formats)) != len(self.formats):
            raise InputError(f"AutoQuantize formats {list(self.formats)} must be distinct names from: {', '.join(AUTO_FORMATS)}.")
        bits = AUTO_EFFECTIVE_BITS if self.effective_bits is None else self.effective_bits
        if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not 4.0 <= float(bits) <= 16.0:
            raise InputError(f"Effective bits {self.effective_bits!r} must be a number from 4 (all INT4) to 16 (nothing quantized).")
        object.__setattr__(self, "effective_bits", float(bits))
        # The score is the loss on the model's own reasoning and answer: the calibration set must hold them.
        object.__setattr__(self, "calib_with_reasoning", True)

    def describe_recipe(self) -> str:
        return f"recipe {self.recipe}" + (f" (formats {', '.join(self.formats)})" if self.formats else "")

    @property
    def recipe_spec(self) -> Recipe:
        return RECIPES[self.recipe]

    @property
    def weight_block_size(self) -> int | None:
        if self.recipe == "auto":
            return (self.block_size or RECIPES["int4_awq"].block_size) if "int4_awq" in self.formats else None
        return self.block_size or self.recipe_spec.block_size

    @property
    def kv_cache_quant_algo(self) -> str | None:
        return KV_CACHE[self.kv_cache][1] if self.kv_cache else None

    def to_dict(self) -> dict[str, Any]:
        d = {"version": SPEC_VERSION, **asdict(self), "recipe_spec": asdict(self.recipe_spec)}
        d["formats"] = list(self.formats)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantSpec":
        if not isinstance(d, dict):
            raise InputError(f"A quantization spec must be a JSON object, got {type(d).__name__}.")
        version = d.get("version", SPEC_VERSION)
        if version != SPEC_VERSION:
            raise InputError(f"Quantization spec version {version!r} is not supported (this egm-edge reads version {SPEC_VERSION}).")
        unknown = set(d) - {"version", "recipe", "kv_cache", "vision", "calib_with_reasoning", "block_size", "awq", "formats",
                            "effective_bits", "recipe_spec"}
        if unknown:
            raise InputError(f"Quantization spec has unknown keys {sorted(unknown)}; remove them.")
        if "recipe" not in d:
            raise InputError("Quantization spec lacks 'recipe'; add one of: " + ", ".join(RECIPES) + ".")
        formats = d.get("formats") or ()
        if not isinstance(formats, (list, tuple)):
            raise InputError(f"Quantization spec 'formats' must be a list of format names, got {formats!r}.")
        spec = cls(d["recipe"], d.get("kv_cache"), d.get("vision", "16bit"), d.get("calib_with_reasoning", False), d.get("block_size"),
                   d.get("awq"), tuple(formats), d.get("effective_bits"))
        stored = d.get("recipe_spec")
        if stored is not None and stored != asdict(spec.recipe_spec):
            raise InputError(
                f"Recipe {spec.recipe!r} was written with a different definition than this egm-edge has; "
                "re-quantize with this version."
            )
        return spec

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "QuantSpec":
        try:
            d = json.loads(text)
        except ValueError as e:
            raise InputError(f"Quantization spec is not valid JSON ({e}).") from None
        return cls.from_dict(d)

    def describe(self) -> str:
        parts = [self.recipe if self.block_size is None else f"{self.recipe} (block {self.block_size})"]
        if self.recipe == "auto":
            parts.append(f"{self.effective_bits:g} effective bits over {'/'.join(self.formats)}/16-bit")
        if self.awq:
            parts.append(self.awq)
        if self.kv_cache:
            parts.append(f"kv {self.kv_cache}")
        parts.append(f"vision {self.vision}")
        if self.calib_with_reasoning:
            parts.append("calibrated with reasoning")
        return ", ".join(parts)
