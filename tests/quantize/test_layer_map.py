"""The per-layer format map of a mixed checkpoint: read from ModelOpt's config, counted, drawn."""

from __future__ import annotations

from egm_edge.quantize import layer_map as lm

HF = {"quantization": {"quant_algo": "MIXED_PRECISION", "quantized_layers": {
    "model.language_model.layers.0.self_attn.q_proj": {"quant_algo": "W8A8_SQ_PER_CHANNEL"},
    "model.language_model.layers.0.mlp.down_proj": {"quant_algo": "W4A16_AWQ", "group_size": 64},
    "model.language_model.layers.1.mlp.down_proj": {"quant_algo": "FP8"},
}}}
NAMES = ["model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.0.mlp.down_proj",
         "model.language_model.layers.1.self_attn.q_proj", "model.language_model.layers.1.mlp.down_proj"]


def test_formats_map_summary_and_grid():
    formats = lm.layer_formats(HF)
    assert formats["model.language_model.layers.0.mlp.down_proj"] == "int4_awq" and len(formats) == 3
    assert lm.layer_formats({"quantization": {"quant_algo": "W4A16_AWQ"}}) == {}
    single = {"quantization": {"quant_algo": "W4A16_AWQ", "exclude_modules": ["lm_head", "*layers.1.self_attn*"]}}
    assert lm.layer_formats(single, NAMES) == {n: "int4_awq" for n in NAMES if "layers.1.self_attn" not in n}
    full = lm.full_map(formats, NAMES)
    assert full["model.language_model.layers.1.self_attn.q_proj"] == lm.SIXTEEN
    s = lm.summary(full)
    assert s["formats"] == {"16-bit": 1, "fp8": 1, "int4_awq": 1, "int8_sq": 1} and s["layers"] == 4
    assert s["by_kind"]["attention"] == {"int8_sq": 1, "16-bit": 1}
    layers, projs, cells = lm.grid(full)
    assert layers == [0, 1] and projs == ["self_attn.q_proj", "mlp.down_proj"] and cells[(1, "mlp.down_proj")] == "fp8"


def test_picture(tmp_path):
    png = lm.draw(lm.full_map(lm.layer_formats(HF), NAMES), tmp_path / "map.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mixed_checkpoint_is_validated_as_its_loosest_layer():
    from pathlib import Path

    from egm_edge.export.checkpoint import CheckpointInfo

    info = CheckpointInfo(Path("x"), {}, "auto", (), 0, HF, "qwen3_vl")
    assert info.lowered_as == "int8_sq" and set(info.layer_formats.values()) == {"int8_sq", "int4_awq", "fp8"}
    only4 = {"quantization": {"quant_algo": "MIXED_PRECISION", "quantized_layers": {"a": {"quant_algo": "W4A16_AWQ"}}}}
    assert CheckpointInfo(Path("x"), {}, "auto", (), 0, only4, "qwen3_vl").lowered_as == "int4_awq"
    single = {"quantization": {"quant_algo": "W8A8_SQ_PER_CHANNEL"}}  # every searched layer took one format
    assert CheckpointInfo(Path("x"), {}, "auto", (), 0, single, "qwen3_vl").lowered_as == "int8_sq"
    assert CheckpointInfo(Path("x"), {}, "fp8", (), 0, {}, "qwen3_vl").lowered_as == "fp8"
