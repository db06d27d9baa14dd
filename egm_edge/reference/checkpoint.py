"""Tiny random Qwen3-VL checkpoints for tests, built locally from a config (model hubs are unreachable).

Contract: `write_tiny_checkpoint(out_dir, tokenizer_dir, family=...)` writes a directory that
the family's transformers class (`hf_class` of its record, Qwen3VLForConditionalGeneration for
Qwen3-VL) and `egm_edge.reference.ReferenceRunner.open` load like a real EGM checkpoint:
config.json (the record's first architecture, every special-token id its `config_tokens`
name read from the tokenizer), model.safetensors, generation_config.json, the tokenizer
files, the record's chat_template.jinja and preprocessor_config.json. The vocabulary size
is the tokenizer's, so the real 151k-token Qwen tokenizer and small custom tokenizers
that keep Qwen's special tokens by name both work. torch/transformers are imported
inside the function.
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
    """Write a random-weight checkpoint of `family` (a name or a record; the Qwen3-VL layout: its `hf_class`
    built from TINY_TEXT / TINY_VISION, config.json naming the record's first architecture); returns `out_dir`.

    text / vision override keys of TINY_TEXT / TINY_VISION. Image pixels are capped
    at `max_pixels` (256 image tokens at most by default) to keep tests fast. The
    directory is written beside `out_dir` and renamed into place, so a crash leaves
    nothing that looks like a checkpoint.
    """
    import torch
    import transformers

    fam = get_family(family)
    if fam.preprocessor != "smart_resize" or fam.positions != "mrope":
        raise UnsupportedError(f"Tiny test checkpoints are written in the Qwen3-VL layout (smart-resize images, M-RoPE); "
                               f"the {fam.title} family is {fam.preprocessor} / {fam.positions}.")
    model_class = getattr(transformers, fam.hf_class)
    out_dir = Path(out_dir)
    tokenizer_dir = Path(tokenizer_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"Output directory {out_dir} is not empty; choose a new directory.")
    ids = special_token_ids(tokenizer_dir / "tokenizer.json", fam)
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

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        _name_architecture(tmp / "config.json", fam.architectures[0])
        _copy_tokenizer(tokenizer_dir, tmp)
        (tmp / "chat_template.jinja").write_text(fam.chat_template, encoding="utf-8")
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
        (tmp / "preprocessor_config.json").write_text(json.dumps(patch, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
