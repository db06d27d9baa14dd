"""Model specs: registry numbers, parameter counts, config.json round trips, clear errors."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest

from egm_edge.errors import CheckpointError, InputError
from egm_edge.models import (
    PARTS,
    ModelSpec,
    VisionSpec,
    get_spec,
    list_specs,
    spec_from_config,
    to_hf_config,
)

HAS_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None


@pytest.mark.parametrize(
    "name, billions, tolerance",
    [
        ("egm-2b", 2.13, 0.01),  # Qwen3-VL-2B model card: 2B (2.13B in safetensors)
        ("egm-4b", 4.44, 0.01),  # Qwen3-VL-4B: 4.44B
        ("egm-8b", 8.77, 0.01),  # Qwen3-VL-8B: 8.77B
        ("egm-internvl3-1b", 0.938, 0.01),  # InternVL3-1B model card: 0.9B (938M)
        ("egm-internvl3-2b", 2.09, 0.01),  # InternVL3-2B: 2.09B
        ("egm-internvl3-8b", 7.94, 0.01),  # InternVL3-8B: 7.94B
    ],
)
def test_real_specs_land_on_published_sizes(name, billions, tolerance):
    spec = get_spec(name)
    total = spec.total_params() / 1e9
    assert abs(total - billions) / billions < tolerance, f"{name}: {total:.3f}B vs published {billions}B"
    assert abs(total - spec.published_params_b) / spec.published_params_b < 0.05


def test_qwen3_vl_2b_numbers_from_config_json():
    s = get_spec("egm-2b")
    t, v = s.text, s.vision
    assert (t.hidden, t.layers, t.heads, t.kv_heads, t.head_dim, t.intermediate, t.vocab, t.tied_embeddings) == (
        2048, 28, 16, 8, 128, 6144, 151936, True)
    assert (v.depth, v.hidden, v.intermediate, v.patch, v.merge, v.out_hidden, v.deepstack) == (24, 1024, 4096, 16, 2, 2048, (5, 11, 17))
    assert t.mrope_section == (24, 20, 20) and t.mrope_interleaved
    assert s.params()["lm_head"].total == 0  # tied: the embedding table is the head


def test_aliases_and_unknown_names():
    assert get_spec("EGM-8B") is get_spec("egm-qwen3-vl-8b")
    assert list_specs()[-1] == "tiny"
    with pytest.raises(InputError, match="egm-2b, egm-4b, egm-8b"):
        get_spec("egm-70b")


@pytest.mark.parametrize("name", list_specs())
def test_dict_round_trip(name):
    spec = get_spec(name)
    d = json.loads(json.dumps(spec.to_dict()))
    assert ModelSpec.from_dict(d) == spec
    assert set(spec.params()) == set(PARTS)


@pytest.mark.parametrize("name", list_specs())
def test_hf_config_round_trip(name, tmp_path):
    spec = get_spec(name)
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(spec)))
    assert spec_from_config(tmp_path) == spec
    assert spec_from_config(tmp_path / "config.json") == spec


def test_unknown_architecture_is_one_clear_sentence(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlavaForConditionalGeneration"]}))
    with pytest.raises(CheckpointError) as e:
        spec_from_config(tmp_path)
    msg = str(e.value)
    assert "LlavaForConditionalGeneration" in msg and "Qwen3VLForConditionalGeneration" in msg and msg.count(". ") == 0


def test_bad_configs(tmp_path):
    with pytest.raises(CheckpointError, match="No config.json"):
        spec_from_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        spec_from_config(tmp_path)
    cfg = to_hf_config(get_spec("tiny"))
    cfg["text_config"]["hidden_size"] = "64"
    with pytest.raises(CheckpointError, match="hidden_size"):
        spec_from_config(cfg)
    cfg = to_hf_config(get_spec("egm-internvl3-1b"))
    cfg["text_config"].update(model_type="internlm2", architectures=["InternLM2ForCausalLM"])
    with pytest.raises(CheckpointError, match="InternLM2ForCausalLM"):
        spec_from_config(cfg)


def test_original_internvl_chat_format_reads_as_registry_spec():
    # The layout of OpenGVLab/InternVL3-1B/config.json (remote-code format), trimmed to what matters.
    cfg = {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "downsample_ratio": 0.5,
        "force_image_size": 448, "max_dynamic_patch": 12, "use_thumbnail": True, "tie_word_embeddings": False,
        "llm_config": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
                       "intermediate_size": 4864, "num_attention_heads": 14, "num_hidden_layers": 24,
                       "num_key_value_heads": 2, "vocab_size": 151674, "rope_theta": 1000000.0,
                       "max_position_embeddings": 32768},
        "vision_config": {"architectures": ["InternVisionModel"], "hidden_size": 1024, "image_size": 448,
                          "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
                          "patch_size": 14, "qkv_bias": True, "qk_normalization": False},
    }
    assert spec_from_config(cfg) is get_spec("egm-internvl3-1b")


def test_spec_validation():
    v = get_spec("tiny").vision
    with pytest.raises(CheckpointError, match="deepstack"):
        dataclasses.replace(v, deepstack=(5,))
    with pytest.raises(CheckpointError, match="out_hidden"):
        dataclasses.replace(get_spec("tiny"), vision=dataclasses.replace(v, out_hidden=32))
    with pytest.raises(CheckpointError, match="positive integer"):
        VisionSpec(depth=0, hidden=8, heads=1, intermediate=8, patch=2, merge=2, out_hidden=8)


def _torch_counts(model) -> dict[str, tuple[int, int]]:
    """(matmul, other) parameters per part of a real transformers model, by module path."""
    import torch

    def part(name: str) -> str:
        if "embed_tokens" in name:
            return "embeddings"
        if name.startswith("lm_head"):
            return "lm_head"
        if "merger" in name or "multi_modal_projector" in name:
            return "mergers"
        if "visual" in name or "vision_tower" in name:
            return "vision_blocks"
        return "language_blocks"

    linear = {f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    out: dict[str, list[int]] = {p: [0, 0] for p in PARTS}
    for name, p in model.named_parameters():  # shared (tied) tensors are listed once
        out[part(name)][0 if name in linear else 1] += p.numel()
    return {k: tuple(v) for k, v in out.items()}


@pytest.mark.skipif(not HAS_TORCH, reason="torch/transformers not installed (the compiler extra)")
@pytest.mark.parametrize("tied", [False, True])
def test_param_counts_match_transformers_qwen3_vl(tied):
    import transformers

    spec = get_spec("tiny")
    spec = dataclasses.replace(spec, text=dataclasses.replace(spec.text, tied_embeddings=tied, vocab=512))
    model = transformers.Qwen3VLForConditionalGeneration(transformers.Qwen3VLConfig(**to_hf_config(spec)))
    assert _torch_counts(model) == {k: (v.matmul, v.other) for k, v in spec.params().items()}


@pytest.mark.skipif(not HAS_TORCH, reason="torch/transformers not installed (the compiler extra)")
def test_param_counts_match_transformers_internvl():
    import transformers

    base = get_spec("egm-internvl3-1b")
    spec = dataclasses.replace(
        base,
        text=dataclasses.replace(base.text, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=96, vocab=512),
        vision=dataclasses.replace(base.vision, depth=2, hidden=32, heads=2, intermediate=48, image_size=56, out_hidden=64),
    )
    model = transformers.InternVLForConditionalGeneration(transformers.InternVLConfig(**to_hf_config(spec)))
    assert _torch_counts(model) == {k: (v.matmul, v.other) for k, v in spec.params().items()}


def test_families_and_supported_architectures_come_from_the_registry():
    from egm_edge.models import FAMILIES, SUPPORTED
    from egm_edge.models.families import families, family_names

    assert FAMILIES == family_names() == ("qwen3_vl", "internvl")
    assert set(SUPPORTED) == {a for f in families() for a in f.architectures}
    with pytest.raises(CheckpointError, match="Unknown model family 'llava'"):
        dataclasses.replace(get_spec("tiny"), family="llava")


def test_a_registered_family_is_read_written_and_counted_through_its_record():
    """A Qwen3-VL clone under another architecture name: its config reader, writer and vision count are the record's."""
    from egm_edge.models.families import QWEN3_VL, register, unregister

    toy = register(dataclasses.replace(QWEN3_VL, name="toy_vl", title="Toy-VL", architectures=("ToyVLForConditionalGeneration",),
                                       model_types=()))
    try:
        spec = dataclasses.replace(get_spec("egm-2b"), family="toy_vl", name="toy")
        cfg = to_hf_config(spec)
        assert cfg["architectures"] == list(toy.architectures)
        back = spec_from_config(cfg)
        assert back.family == "toy_vl" and back.text == spec.text and back.vision == spec.vision
        assert back is not get_spec("egm-2b")  # same numbers, another family: not the registry's model
        assert spec.params() == get_spec("egm-2b").params()
    finally:
        unregister("toy_vl")
    with pytest.raises(CheckpointError, match="ToyVLForConditionalGeneration"):
        spec_from_config(cfg)


def test_a_record_without_its_readers_is_one_sentence():
    from egm_edge.errors import UnsupportedError
    from egm_edge.models.families import QWEN3_VL, register, unregister

    register(dataclasses.replace(QWEN3_VL, name="bare", title="Bare", architectures=("BareForConditionalGeneration",),
                                 model_types=(), config_writer="", vision_params=""))
    try:
        spec = dataclasses.replace(get_spec("tiny"), family="bare")
        with pytest.raises(UnsupportedError, match="Bare family's record names no config_writer"):
            to_hf_config(spec)
        with pytest.raises(UnsupportedError, match="no vision_params"):
            spec.params()
    finally:
        unregister("bare")


def test_internvl_layout_follows_the_architecture():
    """transformers' layout (text_config) for the record's hf_class, OpenGVLab's (llm_config) for the other name."""
    cfg = to_hf_config(get_spec("egm-internvl3-1b"))
    assert cfg["architectures"] == ["InternVLForConditionalGeneration"]
    chat = {**{k: v for k, v in cfg.items() if k != "text_config"}, "architectures": ["InternVLChatModel"],
            "llm_config": cfg["text_config"]}
    chat["vision_config"] = {**cfg["vision_config"], "qkv_bias": True}
    assert spec_from_config(chat) is get_spec("egm-internvl3-1b")
    del chat["architectures"]
    assert spec_from_config(chat) is get_spec("egm-internvl3-1b")  # no architecture: the keys show the layout
