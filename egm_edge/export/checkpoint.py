"""What export reads from a checkpoint directory: its config, precision, graph configs and weights.

`inspect_checkpoint(dir)` checks the directory before anything heavy happens
(config.json present and readable, of a family whose record runs the export stage,
weights present, quantized or not) and returns a frozen `CheckpointInfo`.
`load_reference(info)` loads the PyTorch reference the graphs are exported from and
validated against (the family record's transformers class, `hf_class`, in float32). Precision comes
from metadata (`manifest.json` of the quantize stage, `hf_quant_config.json`),
never from file names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from egm_edge.errors import CheckpointError
from egm_edge.runtime.vision_inputs import VisionGridConfig

WEIGHT_SUFFIXES = (".safetensors",)
# What the host side of an export drives, as (preprocessor, positions) of the family record: the Qwen3-VL
# processor's patches with M-RoPE, or InternVL's 448 px tiles with 1-D RoPE.
# Small files a later stage (build) needs next to the graphs; copied into the export directory.
SIDE_FILES = (
    "config.json", "generation_config.json", "preprocessor_config.json", "chat_template.jinja",
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
)


@dataclass(frozen=True)
class CheckpointInfo:
    """A checked checkpoint directory: config, precision and the files export hashes."""

    path: Path
    config: dict
    precision: str  # "full" for an unquantized checkpoint, else the quantize recipe's name
    weight_files: tuple[str, ...]
    weight_bytes: int
    quant_config: dict = field(default_factory=dict)
    family: str = ""  # the family registry's name for the checkpoint (`family_of_config`)

    @property
    def record(self):
        """The family's record (`egm_edge.models.families.Family`)."""
        from egm_edge.models.families import family_of_config, get_family

        return get_family(self.family) if self.family else family_of_config(self.config, str(self.path / "config.json"))

    @property
    def architecture(self) -> str:
        """config.json's architecture, as the checkpoint names it."""
        return (self.config.get("architectures") or [self.record.architectures[0]])[0]

    @property
    def layer_formats(self) -> dict[str, str]:
        """{module: recipe name} of a per-layer mixed checkpoint (recipe auto; {"*": format} where its search gave every
        quantized layer one format); {} for a single-recipe one."""
        from egm_edge.quantize.layer_map import layer_formats

        return layer_formats(self.quant_config, ["*"] if self.precision == "auto" else ())

    @property
    def lowered_as(self) -> str:
        """The precision whose export threshold and ONNX Runtime settings apply: the checkpoint's own, or for a
        per-layer mixed one the loosest of its layers' formats (INT8 activations, then FP8, then weight-only INT4)."""
        if self.precision != "auto":
            return self.precision
        used = set(self.layer_formats.values())
        return next((p for p in ("int8_sq", "fp8", "int4_awq") if p in used), "full")

    @property
    def text(self) -> dict:
        return self.config.get("text_config") or {}

    @property
    def vision(self) -> dict:
        return self.config.get("vision_config") or {}


def _read_json(path: Path, what: str) -> dict:
    from egm_edge.artifacts import read_json

    return read_json(path, missing=f"Checkpoint {path.parent} has no {path.name}; pass a Hugging Face checkpoint directory ({what}).",
                     restore=f"restore the checkpoint's {path.name}")


def _precision(path: Path) -> tuple[str, dict]:
    manifest = path / "manifest.json"
    quant = path / "hf_quant_config.json"
    if manifest.is_file():
        m = _read_json(manifest, "the quantize stage's manifest")
        if m.get("stage") == "quantize":
            q = _read_json(quant, "ModelOpt's quantization config") if quant.is_file() else {}
            recipe = m.get("recipe") or {}
            name = recipe.get("name") if isinstance(recipe, dict) else recipe
            return str(name or m.get("precision") or "quantized"), q
    if quant.is_file():
        from egm_edge.quantize.recipes import RECIPES

        q = _read_json(quant, "ModelOpt's quantization config")
        algo = str((q.get("quantization") or {}).get("quant_algo") or "quantized")
        names = [r.name for r in RECIPES.values() if r.quant_algo == algo]
        return (names[0] if names else algo.lower()), q
    return "full", {}


def inspect_checkpoint(checkpoint_dir: str | Path) -> CheckpointInfo:
    """Check that `checkpoint_dir` is a checkpoint export can read; raise one clear sentence if not."""
    path = Path(checkpoint_dir)
    if not path.is_dir():
        raise CheckpointError(f"Checkpoint directory {path} does not exist; pass --checkpoint DIR holding config.json and *.safetensors.")
    config = _read_json(path / "config.json", "config.json with the model architecture")
    from egm_edge.models import spec_from_config
    from egm_edge.models.families import get_family

    spec = spec_from_config(path)  # one sentence for an unknown architecture
    family = get_family(spec.family)
    family.require("export", f"Checkpoint {path}")
    family.require_layout(f"Checkpoint {path}", "export")
    for key in ("text_config", "vision_config"):
        if not isinstance(config.get(key), dict):
            raise CheckpointError(f"{path / 'config.json'} has no {key}; it is not a complete {family.title} config.")
    weights = sorted(p.name for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not weights:
        raise CheckpointError(f"Checkpoint {path} has no *.safetensors weights; export reads safetensors only.")
    precision, quant = _precision(path)
    size = sum((path / w).stat().st_size for w in weights)
    return CheckpointInfo(path, config, precision, tuple(weights), size, quant, family.name)


def host_configs(model, info: CheckpointInfo) -> tuple:
    """(vision config, decoder config) the host needs to drive the graphs, chosen by the family's preprocessor:
    a `VisionGridConfig` (smart_resize) or a `TilingConfig` (tiling), and the decoder facts dict."""
    if info.record.preprocessor == "tiling":
        from egm_edge.export.graphs_internvl import internvl_decoder_config

        return tiling_config(model, info.path), internvl_decoder_config(model)
    return vision_grid_config(model), decoder_config(model)


def tiling_config(model, checkpoint: Path):
    """The runtime's `TilingConfig`: the checkpoint's GotOcr2 preprocessor_config.json (defaults without one) with the
    tile, patch and pixel-shuffle geometry of the loaded model, which the vision graph is exported for."""
    from dataclasses import replace

    from egm_edge.export.graphs_internvl import tile_geometry
    from egm_edge.runtime.tiling import TilingConfig

    pre = checkpoint / "preprocessor_config.json"
    base = TilingConfig.from_json(pre) if pre.is_file() else TilingConfig()
    tile, side, shuffle = tile_geometry(model.config)
    if pre.is_file() and base.tile_size != tile:
        raise CheckpointError(f"{pre} tiles images at {base.tile_size} px but the vision tower takes {tile} px tiles; "
                              "restore the model's preprocessor_config.json.")
    return replace(base, tile_size=tile, patch_size=tile // side, downsample_ratio=1.0 / shuffle)


def vision_grid_config(model) -> VisionGridConfig:
    """The host-side config of vision.onnx, read from the loaded model's vision config (what transformers runs)."""
    v = model.config.vision_config
    return VisionGridConfig(
        head_dim=v.hidden_size // v.num_heads,
        rope_theta=float(v.rope_parameters["rope_theta"]),
        num_grid_per_side=int(v.num_position_embeddings**0.5),
        spatial_merge_size=int(v.spatial_merge_size),
        patch_size=int(v.patch_size),
        temporal_patch_size=int(v.temporal_patch_size),
        in_channels=int(v.in_channels),
    )


def text_facts(t) -> dict:
    """The language model's cache and output shapes (from a transformers text config), as the runtime reads them."""
    return {
        "num_layers": int(t.num_hidden_layers),
        "num_kv_heads": int(t.num_key_value_heads),
        "head_dim": int(getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads),
        "hidden_size": int(t.hidden_size),
        "vocab_size": int(t.vocab_size),
    }


def decoder_config(model) -> dict:
    """Facts the runtime needs to drive decoder.onnx (cache shapes, special ids), read from the loaded model."""
    cfg = model.config
    return {
        **text_facts(cfg.text_config),
        "num_deepstack": len(cfg.vision_config.deepstack_visual_indexes),
        "image_token_id": int(cfg.image_token_id),
        "vision_start_token_id": int(cfg.vision_start_token_id),
        "vision_end_token_id": int(cfg.vision_end_token_id),
        "spatial_merge_size": int(cfg.vision_config.spatial_merge_size),
        "cache_dtype": "float32",
    }


def load_reference(info: CheckpointInfo):
    """The float32 PyTorch reference model (eval mode): transformers' own, or the dequantizing loader's."""
    import torch

    if info.precision != "full":
        from egm_edge.quantize.loader import load_dequantized

        return load_dequantized(info.path, dtype=torch.float32, activations=True)
    import transformers

    try:
        model = getattr(transformers, info.record.hf_class).from_pretrained(info.path, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"transformers could not load {info.path} ({e}); check that the checkpoint is complete.") from None
    return model.eval()
