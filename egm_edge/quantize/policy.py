"""The project's quantization policy on top of ModelOpt's configs, and the quantizer census that enforces it.

Contract:
- `build_modelopt_config(spec, family)` = deep copy of the recipe's ModelOpt config, then
  the KV-cache entries (ModelOpt's own KV config), then `policy_entries(spec, family)` LAST,
  so no earlier pattern can re-enable a quantizer the policy turned off. ModelOpt
  applies `quant_cfg` entries in list order, later ones winning.
- Policy: the vision tower and projector (the family record's `vision_prefixes`; for
  Qwen3-VL `model.visual.*`: patch embed, blocks, merger and deepstack mergers) stay
  16-bit unless `vision="fp8"` (then their Linear layers get the FP8 weight/input
  formats of FP8_DEFAULT_CFG, the record's `vision_stem` staying off); `lm_head` and
  every embedding stay unquantized.
- `count_quantizers(model, family)` counts enabled quantizers per group (language_model,
  vision, lm_head, embeddings, kv_cache) and kind (weight, input, output, kv, attn);
  `check_counts` raises an EgmError when the census contradicts the spec.
Module names are those of the family's transformers class (the record's `language_prefix`,
`vision_prefixes`); `family` is a registry name or a `Family` record.
"""

from __future__ import annotations

import copy
from typing import Any

from egm_edge.errors import EgmError, UnsupportedError
from egm_edge.models.families import get_family
from egm_edge.quantize.recipes import AWQ_ALGORITHMS, KV_CACHE, QuantSpec

GROUPS = ("language_model", "vision", "lm_head", "embeddings", "kv_cache")
KINDS = ("weight", "input", "output", "kv", "attn")


def policy_entries(spec: QuantSpec, family, fp8_weight: Any = None, fp8_input: Any = None) -> list[dict[str, Any]]:
    """The project's entries, appended after ModelOpt's and the KV config's (see module docstring)."""
    fam = get_family(family)
    entries: list[dict[str, Any]] = []
    if spec.vision == "fp8":
        if fp8_weight is None or fp8_input is None:
            raise ValueError("vision='fp8' needs the FP8 weight and input quantizer formats")
        for prefix in fam.vision_prefixes:
            entries += [
                {"quantizer_name": f"{prefix}*weight_quantizer", "parent_class": "nn.Linear", "cfg": copy.deepcopy(fp8_weight)},
                {"quantizer_name": f"{prefix}*input_quantizer", "parent_class": "nn.Linear", "cfg": copy.deepcopy(fp8_input)},
                # Attention BMM quantizers of the vision tower are not a KV cache: keep them off.
                {"quantizer_name": f"{prefix}*_bmm_quantizer", "enable": False},
                {"quantizer_name": f"{prefix}*output_quantizer", "enable": False},
            ]
        entries.append({"quantizer_name": f"{fam.vision_stem}*", "enable": False})
    else:
        entries += [{"quantizer_name": f"{prefix}*", "enable": False} for prefix in fam.vision_prefixes]
    entries += [
        {"quantizer_name": "lm_head*", "enable": False},
        {"quantizer_name": "*lm_head*", "enable": False},
        {"quantizer_name": "*embed_tokens*", "enable": False},
        {"quantizer_name": "*", "parent_class": "nn.Embedding", "enable": False},
    ]
    return entries


def build_modelopt_config(spec: QuantSpec, family) -> dict[str, Any]:
    """The full ModelOpt config for `spec` on a model of `family`: recipe config, KV entries, then the policy (last)."""
    import modelopt.torch.quantization as mtq

    recipe = spec.recipe_spec
    if recipe.name == "auto":
        raise ValueError("recipe auto has no single ModelOpt config; egm_edge.quantize.auto builds one per candidate format")
    base = getattr(mtq, recipe.modelopt_config, None)
    if base is None:
        raise UnsupportedError(
            f"The installed nvidia-modelopt has no {recipe.modelopt_config} (needed by recipe {recipe.name}); install nvidia-modelopt 0.47."
        )
    cfg = copy.deepcopy(base)
    entries = list(cfg.get("quant_cfg") or [{"quantizer_name": "*", "enable": False}])
    if spec.block_size is not None:
        _set_int4_block(entries, spec.block_size)
    method = spec.awq or recipe.algorithm
    if method in AWQ_ALGORITHMS and method != _method(cfg.get("algorithm")):
        cfg["algorithm"] = {"method": method}  # ModelOpt's AWQ{Lite,Clip,Full}CalibConfig with its own defaults
    if spec.kv_cache:
        kv = copy.deepcopy(getattr(mtq, KV_CACHE[spec.kv_cache][0]))
        entries += list(kv["quant_cfg"])
    fp8_w = fp8_i = None
    if spec.vision == "fp8":
        fp8 = mtq.FP8_DEFAULT_CFG["quant_cfg"]
        fp8_w = _last_entry(fp8, "*weight_quantizer")["cfg"]
        fp8_i = _last_entry(fp8, "*input_quantizer")["cfg"]
    entries += policy_entries(spec, family, fp8_w, fp8_i)
    cfg["quant_cfg"] = entries
    return cfg


def _method(algorithm) -> str | None:
    return algorithm.get("method") if isinstance(algorithm, dict) else algorithm


def _set_int4_block(entries: list[dict[str, Any]], block: int) -> None:
    """Resize the INT4 weight blocks of the (deep-copied) recipe entries."""
    for e in entries:
        cfgs = e.get("cfg")
        for c in cfgs if isinstance(cfgs, list) else [cfgs] if isinstance(cfgs, dict) else []:
            if c.get("num_bits") == 4 and isinstance(c.get("block_sizes"), dict):
                c["block_sizes"] = {**c["block_sizes"], -1: block}


def _last_entry(entries: list[dict[str, Any]], name: str) -> dict[str, Any]:
    for e in reversed(entries):
        if e.get("quantizer_name") == name and "cfg" in e:
            return e
    raise UnsupportedError(f"ModelOpt's FP8_DEFAULT_CFG has no {name!r} entry; install nvidia-modelopt 0.47.")


def quantizer_group(name: str, family) -> str:
    """Which census group a quantizer (by its full module name) of a `family` model belongs to."""
    fam = get_family(family)
    if name.startswith("lm_head.") or ".lm_head." in name:
        return "lm_head"
    if name.startswith(fam.vision_prefixes):
        return "vision"
    if "embed_tokens" in name or "pos_embed" in name:
        return "embeddings"
    if name.startswith(fam.language_prefix):
        if name.endswith(("k_bmm_quantizer", "v_bmm_quantizer")):
            return "kv_cache"
        return "language_model"
    return "other"


def quantizer_kind(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if leaf.endswith("weight_quantizer"):
        return "weight"
    if leaf.endswith("input_quantizer"):
        return "input"
    if leaf.endswith("output_quantizer"):
        return "output"
    if leaf in ("k_bmm_quantizer", "v_bmm_quantizer"):
        return "kv"
    return "attn"


def empty_census() -> dict[str, dict[str, int]]:
    return {g: {k: 0 for k in KINDS} for g in (*GROUPS, "other")}


def count_quantizers(model, family) -> dict[str, dict[str, int]]:
    """Enabled quantizers per group and kind (a SequentialQuantizer counts once if any stage is on)."""
    from modelopt.torch.quantization.nn import SequentialQuantizer, TensorQuantizer

    census = empty_census()
    for name, mod in model.named_modules():
        if isinstance(mod, SequentialQuantizer):
            on = any(q.is_enabled for q in mod)
        elif isinstance(mod, TensorQuantizer):
            if ".weight_quantizer." in name or ".input_quantizer." in name:
                continue  # a stage inside a SequentialQuantizer, counted with its parent
            on = mod.is_enabled
        else:
            continue
        if on:
            census[quantizer_group(name, family)][quantizer_kind(name)] += 1
    return census


def linear_counts(model, family) -> dict[str, int]:
    """nn.Linear modules per group: what a recipe is expected to quantize."""
    import torch

    out = {"language_model": 0, "vision": 0, "lm_head": 0, "layers": 0}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            g = quantizer_group(name + ".weight_quantizer", family)
            if g in out:
                out[g] += 1
    out["layers"] = int(model.config.text_config.num_hidden_layers)
    return out


def expected_census(spec: QuantSpec, linears: dict[str, int]) -> dict[str, dict[str, int]]:
    """What `count_quantizers` must find after quantizing with `spec` (zeros where not listed)."""
    recipe = spec.recipe_spec
    want = empty_census()
    n = linears["language_model"]
    want["language_model"]["weight"] = n
    want["language_model"]["input"] = 0 if recipe.weight_only or recipe.name == "auto" else n
    if spec.vision == "fp8":
        want["vision"]["weight"] = want["vision"]["input"] = linears["vision"]
    if spec.kv_cache:
        want["kv_cache"]["kv"] = 2 * linears["layers"]
    return want


def check_counts(census: dict[str, dict[str, int]], spec: QuantSpec, linears: dict[str, int]) -> None:
    """Raise EgmError naming every group whose enabled-quantizer count contradicts the spec.

    Recipe auto: the search decides how many language-model Linears are quantized (at most all of them); every other
    group must stay off, as the policy says."""
    want = expected_census(spec, linears)
    problems = []
    for group, kinds in want.items():
        for kind, n in kinds.items():
            got = census.get(group, {}).get(kind, 0)
            if spec.recipe == "auto" and group == "language_model" and kind in ("weight", "input"):
                if got > linears["language_model"]:
                    problems.append(f"{group} {kind} quantizers: {got}, more than its {linears['language_model']} Linear layers")
            elif got != n:
                problems.append(f"{group} {kind} quantizers: {got}, expected {n}")
    if census["language_model"]["weight"] == 0:
        problems.insert(0, "no language-model weight is quantized")
    if problems:
        raise EgmError(
            f"Quantizing with {spec.describe()} gave a quantizer census that contradicts the recipe ({'; '.join(problems)}); "
            "the checkpoint was not written, report this with the model's config.json."
        )


def linear_widths(model, family) -> dict[str, int]:
    """Input width of every language-model Linear, by module name."""
    import torch

    return {name: mod.in_features for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and quantizer_group(name + ".weight_quantizer", family) == "language_model"}


def config_widths(cfg: dict[str, Any]) -> dict[str, int]:
    """The same widths read from config.json (checked before the model is loaded)."""
    t = cfg.get("text_config") or {}
    hidden = int(t.get("hidden_size", 0))
    heads = int(t.get("num_attention_heads", 1))
    head_dim = int(t.get("head_dim") or hidden // max(heads, 1))
    return {"hidden_size": hidden, "intermediate_size": int(t.get("intermediate_size", 0)),
            "num_attention_heads*head_dim": heads * head_dim}


def check_block_sizes(widths: dict[str, int], spec: QuantSpec) -> None:
    """Block-quantized recipes need every quantized Linear's input width to be a multiple of the block."""
    block = spec.weight_block_size
    if not block:
        return
    bad = [f"{name} ({w})" for name, w in widths.items() if w % block]
    if bad:
        raise UnsupportedError(
            f"Recipe {spec.recipe} quantizes weights in blocks of {block} input channels, but {len(bad)} widths "
            f"are not multiples of {block}, e.g. {bad[0]}; "
            + ("try --block-size 64, or " if spec.recipe_spec.weights == "int4" and block != 64
               and all(w % 64 == 0 for w in widths.values()) else "")
            + "choose fp8 or int8_sq for this model."
        )
