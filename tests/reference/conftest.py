"""A tiny random Qwen3-VL checkpoint with the real Qwen tokenizer, built once per session."""

from __future__ import annotations

import pytest
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, qwen_tokenizer_dir):
    from egm_edge.reference.checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-qwen3-vl", qwen_tokenizer_dir, seed=0)


@pytest.fixture(scope="session")
def runner(tiny_checkpoint):
    from egm_edge.reference import ReferenceRunner

    return ReferenceRunner.open(tiny_checkpoint)


@pytest.fixture(scope="session")
def small_image(tmp_path_factory):
    """320x240 with a red square: 64 image tokens at the tiny checkpoint's settings."""
    path = tmp_path_factory.mktemp("img") / "square.png"
    im = Image.new("RGB", (320, 240), (40, 90, 160))
    im.paste((220, 30, 30), (60, 50, 140, 130))
    im.save(path)
    return path
