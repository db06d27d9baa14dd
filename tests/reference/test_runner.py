"""ReferenceRunner: inputs identical to the HF processor's, greedy tokens identical to HF generate, exact budgets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from egm_edge.errors import CheckpointError, InputError
from egm_edge.reference import ReferenceRunner


def _hf_inputs(checkpoint, image_path, text):
    """What transformers' processor produces: chat template, placeholder expansion, PIL image processor."""
    from PIL import Image
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pre = json.loads((checkpoint / "preprocessor_config.json").read_text())
    for k in ("image_processor_type", "processor_class"):
        pre.pop(k)
    images = Qwen2VLImageProcessorPil(**pre)(images=Image.open(image_path).convert("RGB"), return_tensors="pt")
    tok = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    n = int(images["image_grid_thw"][0].prod()) // 4
    ids = tok(prompt.replace("<|image_pad|>", "<|image_pad|>" * n), return_tensors="pt")["input_ids"]
    return ids, images


def test_inputs_and_greedy_tokens_match_transformers(runner, tiny_checkpoint, small_image):
    import torch

    from egm_edge.grounding import user_text

    ids, images = _hf_inputs(tiny_checkpoint, small_image, user_text("the red square"))
    prompt = runner.build_prompt(small_image, "the red square")
    assert prompt.ids == ids[0].tolist()
    assert tuple(images["image_grid_thw"][0].tolist()) == prompt.image.grid_thw
    np.testing.assert_array_equal(images["pixel_values"].numpy(), prompt.image.pixel_values)

    n = 16
    hf = runner.model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=images["pixel_values"],
        image_grid_thw=images["image_grid_thw"], mm_token_type_ids=(ids == runner.image_token_id).int(),
        max_new_tokens=n, do_sample=False,
    )[0, ids.shape[1]:].tolist()
    gen = runner.generate_ids(prompt.ids, prompt.image.pixel_values, prompt.image.grid_thw, max_new_tokens=64, max_answer_tokens=8)
    assert not gen.budget_forced or gen.think_tokens >= n  # the first n tokens were chosen by the model
    assert gen.tokens[:n] == hf


@pytest.mark.parametrize("mode", ["hard", "qwen"])
@pytest.mark.parametrize("budget", [0, 1, 5, 30])
def test_think_budget_is_exact(runner, small_image, mode, budget):
    res = runner.ground(small_image, "the red square", think_budget=budget, budget_mode=mode,
                        max_new_tokens=80, max_answer_tokens=6)
    assert res.think_tokens <= budget
    assert res.budget_forced  # a random model does not close its reasoning this early by itself
    assert res.think_tokens == budget  # forced tokens fill the budget exactly
    assert "</think>" in res.text and res.answer_tokens <= 6
    if budget == 0:
        assert res.text.startswith("</think>") and res.reasoning == ""
    if mode == "qwen" and budget == 30:
        assert "Considering the limited time by the user" in res.reasoning
    assert set(res.timings) >= {"preprocess", "vision", "prefill", "decode", "total", "ms_per_token"}


def test_ground_many_accepts_samples_and_pairs(runner, small_image):
    from types import SimpleNamespace

    samples = [(small_image, "the red square"), SimpleNamespace(image=small_image, expression="the blue part", task="amodal")]
    out = runner.ground_many(samples, progress=False, think_budget=0, max_new_tokens=16, max_answer_tokens=4)
    assert [r.think_tokens for r in out] == [0, 0]


def test_bad_requests_are_input_errors(runner, small_image, tmp_path):
    with pytest.raises(InputError, match="empty"):
        runner.ground(small_image, "   ")
    with pytest.raises(InputError, match="limit"):
        runner.ground(small_image, "x" * 1001)
    with pytest.raises(InputError, match="budget mode"):
        runner.ground(small_image, "a", budget_mode="soft")
    with pytest.raises(InputError, match="think budget"):
        runner.ground(small_image, "a", think_budget=-1)
    with pytest.raises(InputError):
        runner.ground(tmp_path / "missing.png", "a")


def test_unsupported_checkpoints_are_refused(tmp_path, tiny_checkpoint, monkeypatch, limit_family):
    import shutil
    import sys

    with pytest.raises(CheckpointError, match="does not exist"):
        ReferenceRunner.open(tmp_path / "nope")
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="LlamaForCausalLM.*supports Qwen3VLForConditionalGeneration"):
        ReferenceRunner.open(llama)
    from egm_edge.errors import UnsupportedError
    from egm_edge.models import get_spec, to_hf_config

    internvl = tmp_path / "internvl"  # the registry knows the family; here its record lists no reference stage
    internvl.mkdir()
    (internvl / "config.json").write_text(json.dumps(to_hf_config(get_spec("egm-internvl3-1b"))))
    limit_family("internvl", "plan")
    with pytest.raises(UnsupportedError, match="InternVL-3 family, which egm-edge's reference stage does not run yet"):
        ReferenceRunner.open(internvl)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "tokenizer.json", "preprocessor_config.json"):
        shutil.copy(tiny_checkpoint / name, pickled / name)
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="no .safetensors.*pytorch_model.bin"):
        ReferenceRunner.open(pickled)

    (pickled / "hf_quant_config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "egm_edge.quantize.loader", None)  # the loader is not importable
    with pytest.raises(CheckpointError, match="ModelOpt-quantized"):
        ReferenceRunner.open(pickled)


def test_importing_the_package_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, egm_edge.reference, egm_edge.reference.runner, egm_edge.commands.ground; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
