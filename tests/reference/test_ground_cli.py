"""`egm-edge ground --model` end to end on the tiny random checkpoint, and its bad-input exits."""

from __future__ import annotations

import json

import pytest

from egm_edge.cli import main

FAST = ["--max-new-tokens", "48", "--max-answer-tokens", "8"]


def _ground(capsys, *args):
    rc = main(["ground", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_json_result(capsys, tiny_checkpoint, small_image):
    rc, out, err = _ground(capsys, "--model", str(tiny_checkpoint), "--image", str(small_image),
                           "--expr", "the red square", "--think-budget", "6", "--json", *FAST)
    assert rc == 0, err
    d = json.loads(out)
    assert set(d) >= {"box", "box_norm1000", "text", "reasoning", "answer", "think_tokens", "answer_tokens",
                      "budget_forced", "parse_reason", "timings", "image_size"}
    assert d["image_size"] == [320, 240] and d["think_tokens"] <= 6
    assert (d["box"] is None) == (d["parse_reason"] is not None)
    assert set(d["timings"]) >= {"preprocess", "vision", "prefill", "decode", "total"}


@pytest.mark.parametrize("mode", ["hard", "qwen"])
def test_budget_zero_answers_at_once(capsys, tiny_checkpoint, small_image, mode):
    rc, out, err = _ground(capsys, "--model", str(tiny_checkpoint), "--image", str(small_image), "--expr", "the red square",
                           "--think-budget", "0", "--budget-mode", mode, "--task", "amodal", "--json", *FAST)
    assert rc == 0, err
    d = json.loads(out)
    assert d["think_tokens"] == 0 and d["budget_forced"] and d["text"].startswith("</think>")


def test_human_output(capsys, tiny_checkpoint, small_image):
    rc, out, err = _ground(capsys, "--model", str(tiny_checkpoint), "--image", str(small_image),
                           "--expr", "the red square", "--think-budget", "4", *FAST)
    assert rc == 0, err
    assert out.startswith("box: ")
    assert "think tokens: 4" in out and "budget forced: yes" in out and "timings (ms): preprocess" in out


def _one_sentence_error(rc, err):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("egm-edge ground: error: "), err
    return lines[0]


def test_wrong_architecture_exits_2(capsys, tmp_path, small_image):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    rc, _, err = _ground(capsys, "--model", str(tmp_path), "--image", str(small_image), "--expr", "a cat")
    assert "LlamaForCausalLM" in _one_sentence_error(rc, err)


@pytest.mark.parametrize("case", ["missing", "corrupt", "empty_expr", "huge_expr", "negative_budget"])
def test_bad_input_exits_2(capsys, tmp_path, tiny_checkpoint, small_image, case):
    image, expr, extra = str(small_image), "the red square", []
    if case == "missing":
        image = str(tmp_path / "missing.jpg")
    elif case == "corrupt":
        bad = tmp_path / "corrupt.jpg"
        bad.write_bytes(small_image.read_bytes()[:200])
        image = str(bad)
    elif case == "empty_expr":
        expr = "  "
    elif case == "huge_expr":
        expr = "the red square " * 100
    else:
        extra = ["--think-budget", "-3"]
    rc, _, err = _ground(capsys, "--model", str(tiny_checkpoint), "--image", image, "--expr", expr, *extra)
    _one_sentence_error(rc, err)


def test_missing_default_model_exits_2(capsys, small_image, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "egm_edge.assets", None)  # no embedded model in this install
    rc, _, err = _ground(capsys, "--image", str(small_image), "--expr", "a cat")
    assert "--model" in _one_sentence_error(rc, err)


def test_cuda_without_cuda_exits_2(capsys, tiny_checkpoint, small_image):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc, _, err = _ground(capsys, "--model", str(tiny_checkpoint), "--image", str(small_image), "--expr", "a", "--device", "cuda")
    assert "no CUDA" in _one_sentence_error(rc, err)
