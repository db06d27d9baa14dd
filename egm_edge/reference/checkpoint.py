"""Tiny random checkpoints for tests, built locally from a config (model hubs are unreachable).

Contract: `write_tiny_checkpoint(out_dir, tokenizer_dir, family=...)` writes a directory that
the family's transformers class (`hf_class` of its record: Qwen3VLForConditionalGeneration,
InternVLForConditionalGeneration) and `egm_edge.reference.ReferenceRunner.open` load like a
real EGM checkpoint: config.json (the record's first architecture, every special-token id its
`config_tokens` name read from the tokenizer), model.safetensors, generation_config.json, the
tokenizer files, the record's chat_template.jinja and preprocessor_config.json (Qwen3-VL's
smart-resize processor, or InternVL's GotOcr2 tiling one from `TilingConfig.to_dict`). The
vocabulary size is the tokenizer's, so the real 151k-token Qwen tokenizer and small custom
tokenizers that keep the family's special tokens by name both work. torch/transformers are
imported inside the function.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from egm_edge.errors import CheckpointError, UnsupportedError
from egm_edge.models.families import get_family
from egm_edge.runtime.preprocess import ImageProcessorConfig

# Shapes of the test model: small enough to build, load and decode in well under a second.
TINY_TEXT: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    # head_dim 16 has 8 rotary frequencies: split T/H/W 4/2/2, interleaved as in Qwen3-VL.
    "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [4, 2, 2], "mrope_interleaved": True},
}
TINY_VISION: dict[str, Any] = {
    "depth": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_heads": 2,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "out_hidden_size": 64,
    "num_position_embeddings": 576,
    "deepstack_visual_indexes": [0],
    "hidden_act": "gelu_pytorch_tanh",
}

# InternVL-3 test shape (HF config keys): a Qwen2 language model and an InternViT over 112-px tiles of
# 14-px patches, so 16 <IMG_CONTEXT> tokens per tile; at most 4 tiles (+ thumbnail) per image.
TINY_INTERNVL_TEXT: dict[str, Any] = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "intermediate_size": 128, "max_position_embeddings": 4096, "initializer_range": 0.2,
}
TINY_INTERNVL_VISION: dict[str, Any] = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
    "image_size": [112, 112], "patch_size": [14, 14], "initializer_range": 0.1,
}
TINY_INTERNVL_MAX_TILES = 4

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")


def special_token_ids(tokenizer_json: str | Path, family="qwen3_vl") -> dict[str, int]:
    """Vocabulary size and the special-token ids the family's config.json names (its record's `config_tokens`),
    eos (the first stop token) and pad (the last one), read from tokenizer.json."""
    from tokenizers import Tokenizer

    fam = get_family(family)
    tok = Tokenizer.from_file(str(tokenizer_json))
    ids: dict[str, int] = {"vocab_size": tok.get_vocab_size(with_added_tokens=True)}
    missing = []
    for key, token in {**fam.config_tokens, "eos_token_id": fam.tokens.stop[0]}.items():
        tid = tok.token_to_id(token)
        if tid is None:
            missing.append(token)
        else:
            ids[key] = tid
    if missing:
        raise CheckpointError(
            f"Tokenizer {tokenizer_json} lacks the {fam.title} special tokens {', '.join(missing)}; "
            f"use a tokenizer that keeps {fam.title}'s special tokens by name."
        )
    pad = tok.token_to_id(fam.tokens.stop[-1])
    ids["pad_token_id"] = ids["eos_token_id"] if pad is None else pad
    # Ids are dense from 0 in a tokenizers vocabulary, but a sparse custom one must still fit the embedding.
    ids["vocab_size"] = max(ids["vocab_size"], max(v for k, v in ids.items() if k != "vocab_size") + 1)
    return ids


def _copy_tokenizer(tokenizer_dir: Path, dst: Path) -> None:
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"Tokenizer directory {tokenizer_dir} has no tokenizer.json; pass a directory holding the model's tokenizer files.")
    for name in TOKENIZER_FILES:
        src = tokenizer_dir / name
        if not src.is_file():
            continue
        if name == "tokenizer_config.json":
            cfg = json.loads(src.read_text(encoding="utf-8"))
            # chat_template.jinja is the single source of the template; an embedded one would shadow it.
            cfg.pop("chat_template", None)
            (dst / name).write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(src, dst / name)


def _name_architecture(config_json: Path, architecture: str) -> None:
    """transformers names the class it saved; a family whose architecture is another name gets its own."""
    cfg = json.loads(config_json.read_text(encoding="utf-8"))
    if cfg.get("architectures") != [architecture]:
        cfg["architectures"] = [architecture]
        config_json.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_tiny_checkpoint(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    *,
    seed: int = 0,
    text: dict[str, Any] | None = None,
    vision: dict[str, Any] | None = None,
    tie_word_embeddings: bool = False,
    dtype: str = "float32",
    min_pixels: int = 65536,
    max_pixels: int = 262144,
    family="qwen3_vl",
) -> Path:
    """Write a random-weight checkpoint of `family` (a name or a record: its `hf_class` built from TINY_TEXT /
    TINY_VISION in the Qwen3-VL layout, TINY_INTERNVL_* in the InternVL one, config.json naming the record's
    first architecture); returns `out_dir`.

    text / vision override keys of those dicts. Qwen3-VL image pixels are capped at
    `max_pixels` (256 image tokens at most by default) to keep tests fast; InternVL
    images take at most TINY_INTERNVL_MAX_TILES 112-px tiles (+ thumbnail). The
    directory is written beside `out_dir` and renamed into place, so a crash leaves
    nothing that looks like a checkpoint.
    """
    import torch
    import transformers

    fam = get_family(family)
    layout = (fam.preprocessor, fam.positions)
    if layout not in (("smart_resize", "mrope"), ("tiling", "rope1d")):
        raise UnsupportedError(f"Tiny test checkpoints are written in the Qwen3-VL (smart-resize images, M-RoPE) or InternVL "
                               f"(tiles, 1-D RoPE) layout; the {fam.title} family is {fam.preprocessor} / {fam.positions}.")
    model_class = getattr(transformers, fam.hf_class)
    out_dir = Path(out_dir)
    tokenizer_dir = Path(tokenizer_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"Output directory {out_dir} is not empty; choose a new directory.")
    ids = special_token_ids(tokenizer_dir / "tokenizer.json", fam)
    if layout == ("tiling", "rope1d"):
        return _write_tiled(out_dir, tokenizer_dir, fam, ids, seed=seed, text=text, vision=vision,
                            tie_word_embeddings=tie_word_embeddings, dtype=dtype)
    text_cfg = {**TINY_TEXT, **(text or {}), "vocab_size": ids["vocab_size"], "pad_token_id": ids["pad_token_id"]}
    vision_cfg = {**TINY_VISION, **(vision or {})}
    vision_cfg.setdefault("out_hidden_size", text_cfg["hidden_size"])
    if vision_cfg["out_hidden_size"] != text_cfg["hidden_size"]:
        raise CheckpointError(
            f"vision out_hidden_size={vision_cfg['out_hidden_size']} must equal text hidden_size={text_cfg['hidden_size']}."
        )
    config = model_class.config_class(
        text_config=text_cfg,
        vision_config=vision_cfg,
        **{key: ids[key] for key in fam.config_tokens},
        tie_word_embeddings=tie_word_embeddings,
    )
    config.eos_token_id = ids["eos_token_id"]
    config.pad_token_id = ids["pad_token_id"]

    torch.manual_seed(seed)
    model = model_class(config).to(getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = sorted({ids["eos_token_id"], ids["pad_token_id"]})
    model.generation_config.pad_token_id = ids["pad_token_id"]
    model.generation_config.do_sample = False

    patch = ImageProcessorConfig(
        patch_size=vision_cfg["patch_size"],
        merge_size=vision_cfg["spatial_merge_size"],
        temporal_patch_size=vision_cfg["temporal_patch_size"],
        min_pixels=min_pixels,
        max_pixels=max_pixels,
    ).to_dict()
    patch.update(
        do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True,
        image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen3VLProcessor",
    )
    return _save(model, out_dir, tokenizer_dir, fam, patch)


def _save(model, out_dir: Path, tokenizer_dir: Path, fam, preprocessor: dict[str, Any]) -> Path:
    """The model, tokenizer, chat template and preprocessor config, written beside `out_dir` and renamed into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        _name_architecture(tmp / "config.json", fam.architectures[0])
        _copy_tokenizer(tokenizer_dir, tmp)
        (tmp / "chat_template.jinja").write_text(fam.chat_template, encoding="utf-8")
        (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_tiled(out_dir: Path, tokenizer_dir: Path, fam, ids: dict[str, int], *, seed: int, text, vision,
                 tie_word_embeddings: bool, dtype: str) -> Path:
    """The InternVL layout: the record's config writer for TINY_INTERNVL_* (overridden by `text` / `vision`), random
    weights (the CLS token, position table and layer scales too, which transformers initialises to constants), and
    the GotOcr2 preprocessor_config.json of the tiles the vision config implies."""
    import torch
    import transformers

    from egm_edge.models.hf_config import internvl_spec
    from egm_edge.runtime.tiling import TilingConfig  # numpy + pillow only

    model_class = getattr(transformers, fam.hf_class)
    text_cfg = {**TINY_INTERNVL_TEXT, **(text or {}), "vocab_size": ids["vocab_size"]}
    vision_cfg = {**TINY_INTERNVL_VISION, **(vision or {})}
    spec = internvl_spec({"architectures": [fam.hf_class], "text_config": text_cfg, "vision_config": vision_cfg, "downsample_ratio": 0.5,
                          "max_dynamic_patch": TINY_INTERNVL_MAX_TILES, "tie_word_embeddings": tie_word_embeddings},
                         "the tiny InternVL config", "tiny-internvl")
    d = fam.code("config_writer")(spec)
    d["text_config"].update(text_cfg, pad_token_id=ids["pad_token_id"], eos_token_id=ids["eos_token_id"])
    d["vision_config"].update(vision_cfg)
    d.update({key: ids[key] for key in fam.config_tokens}, eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"])
    config = model_class.config_class(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})

    torch.manual_seed(seed)
    model = model_class(config).to(getattr(torch, dtype)).eval()
    emb = model.model.vision_tower.embeddings
    with torch.no_grad():
        emb.position_embeddings.normal_(0.0, 0.5)
        emb.cls_token.normal_(0.0, 0.5)
        for layer in model.model.vision_tower.encoder.layer:
            layer.lambda_1.uniform_(0.5, 1.5)
            layer.lambda_2.uniform_(0.5, 1.5)
    model.generation_config.eos_token_id = sorted({ids["eos_token_id"], ids["pad_token_id"]})
    model.generation_config.pad_token_id = ids["pad_token_id"]
    model.generation_config.do_sample = False
    v = spec.vision
    tiles = TilingConfig(tile_size=v.image_size, max_patches=v.max_tiles, use_thumbnail=v.thumbnail, patch_size=v.patch,
                         downsample_ratio=1 / v.merge).to_dict()
    tiles.update(do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True, processor_class="InternVLProcessor")
    return _save(model, out_dir, tokenizer_dir, fam, tiles)
