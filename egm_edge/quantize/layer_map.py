"""Which format each language-model Linear of a quantized checkpoint holds, how many decoder bytes it stores, and the picture.

Contract (pure Python apart from `draw`, which imports matplotlib when called):
- `layer_formats(hf_quant, names=())`: {module name: recipe name} from ModelOpt's `hf_quant_config.json`: the per-layer
  `quantized_layers` of a MIXED_PRECISION checkpoint; for a single-format one, that format for each of `names` its
  `exclude_modules` patterns leave quantized ({} without names).
- `full_map(formats, linears)`: every Linear name of `linears` -> its format, "16-bit" where the search left it.
- `decoder_bytes(model_dir, family)`: bytes the checkpoint's safetensors store under the family's language-model
  prefix, plus an untied lm_head: what "the full model's decoder bytes" compares (read from the headers only).
- `summary(layer_map)`: counts per format, and the same per block kind (attention / MLP) for the report.
- `draw(layer_map, path, title)`: a layers x projections grid coloured by format (PNG).
"""

from __future__ import annotations

import re
from pathlib import Path

SIXTEEN = "16-bit"
# ModelOpt's per-layer quant_algo -> the recipe that writes it (egm_edge.quantize.recipes).
ALGO_FORMATS = {"W4A16_AWQ": "int4_awq", "W8A8_SQ_PER_CHANNEL": "int8_sq", "FP8": "fp8", "W4A8_AWQ": "w4a8_awq", "NVFP4": "nvfp4"}
COLOURS = {"int4_awq": "#d95f02", "int8_sq": "#7570b3", "fp8": "#1b9e77", "w4a8_awq": "#e7298a", "nvfp4": "#66a61e", SIXTEEN: "#d9d9d9"}
_LAYER = re.compile(r"\.layers\.(\d+)\.(.+)$")


def layer_formats(hf_quant: dict, names=()) -> dict[str, str]:
    """{module: recipe name} of the checkpoint's quantized layers (module docstring)."""
    import fnmatch

    q = (hf_quant or {}).get("quantization") or {}
    layers = q.get("quantized_layers") or {}
    if not layers and q.get("quant_algo") in ALGO_FORMATS:
        skip = [str(p) for p in q.get("exclude_modules") or ()]
        return {n: ALGO_FORMATS[q["quant_algo"]] for n in names if not any(fnmatch.fnmatch(n, p) for p in skip)}
    out = {}
    for name, entry in layers.items():
        algo = (entry or {}).get("quant_algo") if isinstance(entry, dict) else None
        out[name] = ALGO_FORMATS.get(str(algo), str(algo).lower())
    return out


def full_map(formats: dict[str, str], linears) -> dict[str, str]:
    """Every name of `linears` with its format, 16-bit where `formats` has none."""
    return {name: formats.get(name, SIXTEEN) for name in linears}


def decoder_bytes(model_dir, family) -> int:
    """Stored bytes of the language model (and an untied lm_head) in `model_dir`'s safetensors."""
    from egm_edge.artifacts import safetensors_entries
    from egm_edge.models.families import get_family

    lp = get_family(family).language_prefix
    # The record names modules as the model does ("model.language_model."); transformers saves some families one level
    # up (InternVL: "language_model.model.*", its head "language_model.lm_head.*"), others as named, head "lm_head.".
    prefixes = (lp, lp.partition(".")[2], "lm_head.")
    return sum(int(v["data_offsets"][1]) - int(v["data_offsets"][0]) for k, v in safetensors_entries(model_dir)
               if k.startswith(prefixes))


def summary(layer_map: dict[str, str]) -> dict:
    """{"formats": {format: n}, "by_kind": {"attention"|"mlp": {format: n}}, "layers": n}."""
    formats: dict[str, int] = {}
    kinds: dict[str, dict[str, int]] = {}
    for name, fmt in layer_map.items():
        formats[fmt] = formats.get(fmt, 0) + 1
        kind = "attention" if ".self_attn." in name or ".attn." in name else "mlp" if ".mlp." in name else "other"
        kinds.setdefault(kind, {})
        kinds[kind][fmt] = kinds[kind].get(fmt, 0) + 1
    return {"layers": len(layer_map), "formats": dict(sorted(formats.items())), "by_kind": kinds}


def grid(layer_map: dict[str, str]) -> tuple[list[int], list[str], dict[tuple[int, str], str]]:
    """(decoder layer indices, projection names in first-seen order, {(layer, projection): format})."""
    cells, layers, projs = {}, set(), []
    for name, fmt in layer_map.items():
        m = _LAYER.search(name)
        if not m:
            continue
        i, proj = int(m.group(1)), m.group(2)
        layers.add(i)
        if proj not in projs:
            projs.append(proj)
        cells[(i, proj)] = fmt
    return sorted(layers), projs, cells


def draw(layer_map: dict[str, str], path, title: str = "") -> Path:
    """The layer map as a PNG: one row per decoder layer, one column per projection, coloured by format."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    layers, projs, cells = grid(layer_map)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * max(len(projs), 1), 1.2 + 0.28 * max(len(layers), 1)))
    for r, i in enumerate(layers):
        for c, p in enumerate(projs):
            fmt = cells.get((i, p))
            if fmt is not None:
                ax.add_patch(plt.Rectangle((c, r), 0.95, 0.9, color=COLOURS.get(fmt, "#000000")))
    ax.set_xlim(0, max(len(projs), 1))
    ax.set_ylim(max(len(layers), 1), 0)
    ax.set_xticks([c + 0.47 for c in range(len(projs))], [p.split(".")[-1] for p in projs], rotation=45, ha="right", fontsize=8)
    ax.set_yticks([r + 0.45 for r in range(len(layers))], [str(i) for i in layers], fontsize=7)
    ax.set_ylabel("decoder layer")
    used = sorted({f for f in cells.values()}, key=lambda f: list(COLOURS).index(f) if f in COLOURS else 99)
    ax.legend(handles=[Patch(color=COLOURS.get(f, "#000000"), label=f) for f in used], loc="upper left",
              bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title(title or "per-layer formats", fontsize=9)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
