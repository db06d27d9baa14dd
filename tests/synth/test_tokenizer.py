"""The small BPE tokenizer: Qwen3's special tokens by name, digits one per token, any text encodes."""

from __future__ import annotations

import json

import pytest

from egm_edge.models.families import QWEN3_VL
from egm_edge.synth.tokenizer import build_tokenizer, thinking_template, write_tokenizer_files

CORPUS = ["Locate the red circle, output its bbox coordinates using JSON format", "The red circle is at [12, 345, 678, 900]."] * 20


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(CORPUS, 300)


def test_special_tokens_by_name_and_roundtrip(tok):
    for name, _ in QWEN3_VL.added_tokens:
        tid = tok.token_to_id(name)
        assert tid is not None
        assert tok.encode(name, add_special_tokens=False).ids == [tid]
    text = "<|im_start|>user\nhéllo 世界 🙂 [1000, 7]</think>\n\n<|im_end|>"
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


def test_digits_are_single_tokens(tok):
    enc = tok.encode("[123, 4567]", add_special_tokens=False)
    digits = [t for t in enc.tokens if any(c.isdigit() for c in t)]
    assert digits == list("1234567")


def test_think_tags_survive_skip_special_tokens(tok):
    ids = tok.encode("a</think>b<|im_end|>", add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=True) == "a</think>b"


def test_written_files(tmp_path, tok, qwen_tokenizer_dir):
    template = thinking_template((qwen_tokenizer_dir / "chat_template.instruct.jinja").read_text())
    write_tokenizer_files(tok, tmp_path, template)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|endoftext|>"
    assert (tmp_path / "chat_template.jinja").read_text().count("<|im_start|>assistant\\n<think>\\n") == 1
    with pytest.raises(ValueError):
        thinking_template("no generation prompt here")


def test_the_record_matches_the_committed_tiny_grounder():
    """The committed checkpoint's added tokens (order, special flags) and eos/pad are the Qwen3-VL record's:
    rebuilding its tokenizer from the record changes nothing."""
    from egm_edge.assets import default_model_dir

    d = default_model_dir()
    shipped = json.loads((d / "tokenizer.json").read_text())["added_tokens"]
    assert [(t["content"], t["special"]) for t in shipped] == list(QWEN3_VL.added_tokens)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == QWEN3_VL.tokens.stop[0] and cfg["pad_token"] == QWEN3_VL.tokens.stop[-1]
    ids = [t["id"] for t in shipped]
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # appended after the merges, in the record's order


def test_default_template_is_the_records(tmp_path, tok):
    write_tokenizer_files(tok, tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == QWEN3_VL.chat_template
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["additional_special_tokens"] == [n for n, s in QWEN3_VL.added_tokens if s][1:]
