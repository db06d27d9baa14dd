"""A third family registered only through its record goes through quantize, export and a CPU build.

The toy is a Qwen3-VL network under another architecture name, with its own user-text
templates and user turn (text before the image): every stage must take its prompt,
tokens, module prefixes, transformers class and graph builders from the record, so
nothing here passes a family-specific argument to a stage.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("modelopt")
pytest.importorskip("onnxruntime")

from egm_edge.models.families import QWEN3_VL, STAGES, register, unregister  # noqa: E402

TOY = dataclasses.replace(
    QWEN3_VL,
    name="toy_vl",
    title="Toy-VL",
    architectures=("ToyVLForConditionalGeneration",),
    model_types=(),
    templates={"vanilla": "Find {expr} and give its box as JSON", "amodal": "Find all of {expr} and give its box as JSON"},
    user_turn="<|im_start|>user\n{text}\n{image}<|im_end|>\n",
    stages=frozenset(STAGES),
)
TEXT_128 = {
    "hidden_size": 128, "intermediate_size": 256, "head_dim": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
    "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [8, 4, 4], "mrope_interleaved": True},
}


@pytest.fixture(scope="module")
def toy_family():
    register(TOY)
    yield TOY
    unregister(TOY.name)


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory, toy_family):
    from egm_edge.reference.checkpoint import write_tiny_checkpoint
    from egm_edge.synth.tokenizer import build_tokenizer, write_tokenizer_files

    corpus = ["Find the red circle and give its box as JSON", "The left one is red. </think> ```json [] ```"] * 20
    tok_dir = tmp_path_factory.mktemp("toy-tok")
    write_tokenizer_files(build_tokenizer(corpus, vocab_size=320), tok_dir, TOY.chat_template)
    return write_tiny_checkpoint(tmp_path_factory.mktemp("toy") / "ckpt", tok_dir, seed=0, text=TEXT_128,
                                 vision={"out_hidden_size": 128}, min_pixels=16384, max_pixels=16384, family=TOY)


def test_the_checkpoint_and_its_spec_are_the_toys(toy_ckpt):
    from egm_edge.models import spec_from_config, to_hf_config

    cfg = json.loads((toy_ckpt / "config.json").read_text())
    assert cfg["architectures"] == ["ToyVLForConditionalGeneration"]
    spec = spec_from_config(toy_ckpt)
    assert spec.family == "toy_vl" and spec.name == "ckpt"
    assert to_hf_config(spec)["architectures"] == ["ToyVLForConditionalGeneration"] and spec.total_params() > 0


def test_the_reference_runner_renders_the_toys_prompt(toy_ckpt, scene):
    from egm_edge.reference import ReferenceRunner

    runner = ReferenceRunner.open(toy_ckpt)
    assert runner.family is TOY
    prompt = runner.build_prompt(scene, "the red circle")
    text = runner.tokenizer.decode(prompt.ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>user\nFind the red circle and give its box as JSON\n<|vision_start|>")
    assert text.endswith(TOY.generation_prompt)


def test_quantize_export_and_cpu_build_from_the_record_alone(toy_ckpt, tmp_path, make_calib_toy):
    from egm_edge.builder import build_cpu
    from egm_edge.builder.pipeline import preflight
    from egm_edge.export.pipeline import export
    from egm_edge.quantize.api import quantize

    assert preflight(toy_ckpt, "int8_sq", "cpu", calib="synth").precision == "int8_sq"  # every gate reads the record
    q = quantize(toy_ckpt, "int8_sq", make_calib_toy(), tmp_path / "q", cache_dir=tmp_path / "cache", progress=False)
    m = json.loads((q / "manifest.json").read_text())
    assert m["family"] == "toy_vl" and m["quantizers"]["enabled"]["language_model"]["weight"] > 0
    assert m["quantizers"]["enabled"]["vision"]["weight"] == 0  # the record's vision prefixes stayed 16-bit

    ex = export(q, tmp_path / "export", decode_steps=2)
    em = json.loads((ex / "manifest.json").read_text())
    assert em["family"] == "toy_vl" and em["architecture"] == "ToyVLForConditionalGeneration" and em["validation"]["passed"]

    bundle = build_cpu(ex, tmp_path / "bundle", max_answer_tokens=16, max_seq_len=1024)
    gen = json.loads((bundle / "generation_config.json").read_text())
    assert gen["family"] == "toy_vl" and gen["think_close"] == TOY.tokens.think_close and gen["stop_tokens"] == list(TOY.tokens.stop)
    assert json.loads((bundle / "manifest.json").read_text())["smoke_test"]["think_tokens"] <= 8


def test_a_stage_the_record_leaves_out_is_refused_in_one_sentence(toy_ckpt, tmp_path):
    from egm_edge.errors import UnsupportedError
    from egm_edge.export.pipeline import export

    register(dataclasses.replace(TOY, stages=frozenset(STAGES) - {"export"}), replace=True)
    try:
        with pytest.raises(UnsupportedError, match="Toy-VL family, which egm-edge's export stage does not run yet"):
            export(toy_ckpt, tmp_path / "ex")
    finally:
        register(TOY, replace=True)
    assert not (tmp_path / "ex").exists()


@pytest.fixture(scope="module")
def make_calib_toy():
    from egm_edge.quantize.calibration import CalibrationRecipe

    def make():
        return CalibrationRecipe.from_dict({"samples": 2, "holdout": 1, "seed": 0, "max_pixels": 16384, "max_new_tokens": 64,
                                            "sources": [{"kind": "synth", "n": 4, "seed": 11}]}, name="toy")

    return make
