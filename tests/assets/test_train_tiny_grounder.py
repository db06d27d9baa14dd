"""scripts/train_tiny_grounder.py: reproducible from its seed, and what it writes is a checkpoint the package loads.

The full training runs are far too long for a test (the card gives their commands and
times); these run the real script for a few steps with every training signal the
committed checkpoint used.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from egm_edge.assets import default_model_dir

REPO = Path(__file__).resolve().parents[2]

pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_tiny_grounder", REPO / "scripts" / "train_tiny_grounder.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _batcher(script, seed):
    from tokenizers import Tokenizer

    from egm_edge.models.families import get_family
    from egm_edge.reference.runner import _image_config, read_model_config

    d = default_model_dir()
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    return script.Batcher(tok, _image_config(d, read_model_config(d), get_family("qwen3_vl")), seed, truncate_fraction=0.35,
                          amodal_fraction=0.15, easy=0.3, easy_until=300, cut_answers="reasoned")


def test_batches_depend_only_on_seed_and_step(script):
    import torch

    batcher = _batcher(script, 0)
    a = batcher.batch(40, 4, "cpu", 5)
    b = _batcher(script, 0).batch(40, 4, "cpu", 5)
    c = _batcher(script, 1).batch(40, 4, "cpu", 5)
    for key in ("input_ids", "labels", "pixel_values", "image_grid_thw"):
        assert torch.equal(a[key], b[key]), key
    assert a["aux"] and a["lm_aux"] == b["lm_aux"]
    assert a["input_ids"].tolist() != c["input_ids"].tolist()
    # Loss only on the assistant's tokens: every labelled position holds the input token.
    lab, ids = a["labels"], a["input_ids"]
    assert torch.equal(lab[lab != -100], ids[lab != -100])
    assert (lab != -100).sum() < (ids != batcher.pad).sum()


def test_a_short_run_writes_a_loadable_checkpoint_and_resumes(script, tmp_path):
    from egm_edge.reference import ReferenceRunner
    from egm_edge.synth import draw, render

    out = tmp_path / "run"
    common = ["--out", str(out), "--seed", "0", "--batch", "2", "--lr", "1e-3", "--warmup", "1", "--colour-code",
              "--freeze-vision-until", "0", "--aux-weight", "1", "--aux-places", "2", "--lm-aux-weight", "1",
              "--attn-weight", "1", "--attn-layer", "1,2", "--attn-span", "--digit-weight", "3",
              "--truncate-fraction", "0.35", "--cut-answers", "reasoned", "--eval-every", "0", "--eval-n", "0",
              "--probe-every", "0", "--ckpt-every", "1"]
    assert script.main(common + ["--steps", "2"]) == 0
    final = out / "final"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "preprocessor_config.json"):
        assert (final / name).is_file(), name
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert cfg["text_config"]["dtype"] == "bfloat16"

    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses and all(v == v and v > 0 for v in losses)  # finite, positive

    runner = ReferenceRunner.open(final)
    s = draw(7, 0)
    res = runner.ground(render(s.scene), s.expr.sent, think_budget=0, max_new_tokens=24, max_answer_tokens=16)
    assert res.think_tokens == 0 and res.answer_tokens >= 1  # an untrained model answers; no box is expected

    assert script.main(common + ["--steps", "3", "--resume"]) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    starts = [r for r in log if r.get("event") == "start"]
    assert [r["start_step"] for r in starts] == [0, 2]
    assert [r for r in log if r.get("event") == "done"][-1]["steps"] == 3
