"""A tiny random Qwen3-VL checkpoint with a small word-level tokenizer, exported once per session.

The tokenizer keeps Qwen's special tokens by name, so the checkpoint behaves like a
real one while its 300-token vocabulary keeps export and validation fast (the real
151k-token vocabulary alone costs ~20 s of export here). Needs no ../shared data.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>", "<think>", "</think>"]


def write_small_tokenizer(out_dir, n_words: int = 290):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[unk]", "Locate", "output", "its", "bbox", "coordinates", "using", "JSON", "format", "the", "red", "circle",
             "user", "assistant", "\n", ",", "."] + [f"w{i}" for i in range(n_words)]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[unk]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    return out_dir


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory):
    return write_small_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory, small_tokenizer):
    from egm_edge.reference.checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-qwen3-vl", small_tokenizer, seed=0)


@pytest.fixture(scope="session")
def exported(tmp_path_factory, small_checkpoint):
    from egm_edge.export.pipeline import export

    return export(small_checkpoint, tmp_path_factory.mktemp("export") / "ir", decode_steps=4)


@pytest.fixture(scope="session")
def exported_trt(tmp_path_factory, small_checkpoint):
    """The same checkpoint exported for TensorRT: plain ONNX attention, a growing KV cache."""
    from egm_edge.export.pipeline import export

    return export(small_checkpoint, tmp_path_factory.mktemp("export-trt") / "ir", lowering="tensorrt", decode_steps=4)
