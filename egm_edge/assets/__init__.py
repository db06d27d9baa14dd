"""Files shipped inside the package: the embedded default model.

`default_model_dir()` is the trained tiny EGM-style grounder (a real
Qwen3VLForConditionalGeneration trained on the synthetic shapes world, see its
README.md), what `egm-edge` uses when no model is given and what accuracy tests
load. Torch-free: this only locates files.
"""

from __future__ import annotations

from pathlib import Path

TINY_GROUNDER = "tiny-grounder"


def default_model_dir() -> Path:
    """The committed checkpoint folder (config.json, model.safetensors, tokenizer, processor config)."""
    return Path(__file__).resolve().parent / TINY_GROUNDER
