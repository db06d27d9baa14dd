"""Quantize stage: ModelOpt PTQ of a checkpoint (a family whose record runs quantize) into ModelOpt's unified HF checkpoint.

Public call: `egm_edge.quantize(model_dir, recipe, calibration, out_dir, *, kv_cache=None,
vision="16bit", calib_with_reasoning=False, force=False)`, the same as
`egm_edge.quantize.quantize(...)` (see `egm_edge.quantize.api`). As with
`egm_edge.export`, the package is callable because its name is also the stage's
function. `load_dequantized(model_dir)` runs a quantized checkpoint in PyTorch.
Recipe "auto" (`egm_edge.quantize.auto`, with `target=`/`formats=` and `effective_bits=`/`max_bytes=`) picks
each language-model Linear's format with ModelOpt's AutoQuantize and writes a MIXED_PRECISION checkpoint.
Recipes and calibration recipes are registries of frozen specs. Importing this
package is cheap: torch, transformers and modelopt load inside the calls.
"""

import sys
import types

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


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from egm_edge.quantize.api import quantize

        return quantize(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
