"""write_tiny_checkpoint: ids from the tokenizer, the Thinking template, small custom tokenizers."""

from __future__ import annotations

import json

import pytest

from egm_edge.errors import CheckpointError
from egm_edge.models.families import get_family
from egm_edge.reference.checkpoint import special_token_ids, write_tiny_checkpoint

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>", "<think>", "</think>"]


def test_config_ids_come_from_the_tokenizer(tiny_checkpoint):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3VLForConditionalGeneration"] and cfg["model_type"] == "qwen3_vl"
    assert cfg["image_token_id"] == tok.token_to_id("<|image_pad|>")
    assert cfg["video_token_id"] == tok.token_to_id("<|video_pad|>")
    assert cfg["vision_start_token_id"] == tok.token_to_id("<|vision_start|>")
    assert cfg["vision_end_token_id"] == tok.token_to_id("<|vision_end|>")
    assert cfg["eos_token_id"] == tok.token_to_id("<|im_end|>")
    assert cfg["text_config"]["vocab_size"] == tok.get_vocab_size(with_added_tokens=True)
    assert "chat_template" not in json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())
    pre = json.loads((tiny_checkpoint / "preprocessor_config.json").read_text())
    assert pre["size"] == {"shortest_edge": 65536, "longest_edge": 262144} and pre["patch_size"] == 16


def test_chat_template_renders_the_egm_thinking_prompt(tiny_checkpoint):
    jinja2 = pytest.importorskip("jinja2")
    tpl = jinja2.Environment().from_string((tiny_checkpoint / "chat_template.jinja").read_text())
    fam = get_family("qwen3_vl")
    text = fam.user_text("the red square")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    assert tpl.render(messages=msgs, add_generation_prompt=True) == fam.chat_prompt(text, 1)
    done = msgs + [{"role": "assistant", "reasoning_content": "It is red.", "content": "ANSWER"}]
    assert tpl.render(messages=done).endswith("<|im_start|>assistant\n<think>\nIt is red.\n</think>\n\nANSWER<|im_end|>\n")


def test_small_custom_tokenizer_works_end_to_end(tmp_path, small_image):
    """A 400-token BPE that keeps Qwen's special tokens by name gives a small, working checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=QWEN_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Locate the red square, output its bbox coordinates using JSON format"] * 20, trainer)
    tdir = tmp_path / "tok"
    tdir.mkdir()
    tok.save(str(tdir / "tokenizer.json"))
    ids = special_token_ids(tdir / "tokenizer.json")
    assert ids["vocab_size"] <= 400 and ids["image_token_id"] == tok.token_to_id("<|image_pad|>")

    from egm_edge.reference import ReferenceRunner

    ck = write_tiny_checkpoint(tmp_path / "ck", tdir, seed=1)
    runner = ReferenceRunner.open(ck)
    res = runner.ground(small_image, "the red square", think_budget=3, max_new_tokens=24, max_answer_tokens=8)
    assert res.think_tokens <= 3 and res.image_size == (320, 240)


def test_tokenizer_without_qwen_specials_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    tdir = tmp_path / "tok"
    tdir.mkdir()
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tdir / "tokenizer.json"))
    with pytest.raises(CheckpointError, match="<\\|image_pad\\|>"):
        write_tiny_checkpoint(tmp_path / "ck", tdir)
    assert not (tmp_path / "ck").exists()


def test_non_empty_output_dir_is_refused(tmp_path, qwen_tokenizer_dir):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "x").write_text("x")
    with pytest.raises(CheckpointError, match="not empty"):
        write_tiny_checkpoint(tmp_path / "ck", qwen_tokenizer_dir)
