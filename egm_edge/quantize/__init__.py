"""Quantize stage: ModelOpt PTQ of a Qwen3-VL checkpoint into ModelOpt's unified HF checkpoint.

One public call, `quantize(model_dir, recipe, calibration, out_dir, ...)`; recipes
and calibration recipes are registries of frozen specs. Importing this package is
cheap: torch, transformers and modelopt load inside the calls that need them.
"""

from egm_edge.quantize.recipes import RECIPES, QuantSpec, Recipe, get_recipe

__all__ = ["RECIPES", "QuantSpec", "Recipe", "get_recipe", "quantize", "load_dequantized"]


def __getattr__(name: str):
    if name == "quantize":
        from egm_edge.quantize.api import quantize

        return quantize
    if name == "load_dequantized":
        from egm_edge.quantize.loader import load_dequantized

        return load_dequantized
    raise AttributeError(f"module 'egm_edge.quantize' has no attribute {name!r}")
