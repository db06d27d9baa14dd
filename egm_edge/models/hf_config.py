"""Hugging Face `config.json` <-> `ModelSpec`.

Contract: `spec_from_config(config_dict | path)` reads a checkpoint's config
(a directory holding config.json, the file itself, or the parsed dict), finds its
family in the registry (`family_of_config`: by architecture, else model_type) and
returns what the family's `config_reader` makes of it: the same `ModelSpec` type as
the registry, missing keys taking the transformers defaults. The readers here are
`qwen3_vl_spec` (Qwen3VLForConditionalGeneration) and `internvl_spec` (transformers'
InternVLForConditionalGeneration layout, or OpenGVLab's remote-code InternVLChatModel
layout, read as data, never executed). When the architecture equals a registry
model, the registry's name and source are kept. Anything else raises
`CheckpointError` with one sentence naming what was found and what is supported.
`to_hf_config(spec)` writes the transformers config dict back through the family's
`config_writer` (used to build tiny test checkpoints and to check the parameter
counts against real modules).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from egm_edge.errors import CheckpointError
from egm_edge.models.families import families, family_of_config, get_family
from egm_edge.models.registry import REGISTRY, same_architecture
from egm_edge.models.spec import ModelSpec, TextSpec, VisionSpec


def supported_architectures() -> tuple[str, ...]:
    """Every config.json architecture a registered family accepts."""
    return tuple(a for f in families() for a in f.architectures)


SUPPORTED = supported_architectures()  # the built-in families' architectures


def _supported_text() -> str:
    return f"egm-edge supports {', '.join(supported_architectures())} (InternVL with a Qwen2 language model)"


# The ids of the Qwen3-VL tokenizer's special tokens that a Qwen3-VL config.json names (the keys of the
# family record's `config_tokens`); identical in every Qwen3-VL checkpoint and the shared tokenizer.
QWEN_TOKEN_IDS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653}


def _load(config: dict[str, Any] | str | Path) -> tuple[dict[str, Any], str, str]:
    """(config dict, where it came from for messages, a fallback model name)."""
    if isinstance(config, dict):
        return config, "the given config", "custom"
    path = Path(config)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"No config.json at {file}; pass a Hugging Face checkpoint directory.")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"Cannot read {file} as JSON ({e}); the checkpoint's config.json is corrupt.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} holds a JSON {type(data).__name__}, not an object; the checkpoint's config.json is corrupt.")
    return data, str(file), (file.parent.name or "custom")


def _get(cfg: dict[str, Any], key: str, default: Any, where: str, kind: type = int) -> Any:
    v = cfg.get(key, default)
    if v is None:
        v = default
    ok = isinstance(v, kind) and not (kind is not bool and isinstance(v, bool))
    if kind is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if not ok:
        raise CheckpointError(f"{where}: {key}={v!r} should be {kind.__name__}; the checkpoint's config.json is malformed.")
    return float(v) if kind is float else v


def _sub(cfg: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    v = cfg.get(key) or {}
    if not isinstance(v, dict):
        raise CheckpointError(f"{where}: {key} should be an object, not {type(v).__name__}; the checkpoint's config.json is malformed.")
    return v


def _side(v: Any) -> Any:
    """InternVL's HF format stores patch/image sizes as [h, w]; egm-edge needs square ones."""
    if isinstance(v, (list, tuple)) and len(v) == 2 and v[0] == v[1]:
        return v[0]
    return v


def _tied(cfg: dict[str, Any], text: dict[str, Any], where: str) -> bool:
    if "tie_word_embeddings" in cfg:
        return _get(cfg, "tie_word_embeddings", False, where, bool)
    return _get(text, "tie_word_embeddings", False, where, bool)


def qwen3_vl_spec(cfg: dict[str, Any], where: str, name: str) -> ModelSpec:
    """The spec of a Qwen3-VL config (text_config with M-RoPE, vision_config with deepstack)."""
    tc, vc = _sub(cfg, "text_config", where), _sub(cfg, "vision_config", where)
    w = f"{where} text_config"
    # transformers 5 keeps rope settings in rope_parameters; older files in rope_scaling + rope_theta.
    rope = {**_sub(tc, "rope_scaling", w), **_sub(tc, "rope_parameters", w)}
    section = rope.get("mrope_section") or ()
    if not isinstance(section, (list, tuple)) or not all(isinstance(s, int) for s in section):
        raise CheckpointError(f"{w}: mrope_section={section!r} should be a list of integers; the checkpoint's config.json is malformed.")
    heads = _get(tc, "num_attention_heads", 32, w)
    text = TextSpec(
        layers=_get(tc, "num_hidden_layers", 32, w),
        hidden=_get(tc, "hidden_size", 4096, w),
        heads=heads,
        kv_heads=_get(tc, "num_key_value_heads", heads, w),
        head_dim=_get(tc, "head_dim", 128, w),
        intermediate=_get(tc, "intermediate_size", 22016, w),
        vocab=_get(tc, "vocab_size", 151936, w),
        tied_embeddings=_tied(cfg, tc, where),
        qkv_bias=_get(tc, "attention_bias", False, w, bool),
        qk_norm=True,
        rope_theta=_get(rope, "rope_theta", tc.get("rope_theta", 500_000.0), w, float),
        mrope_section=tuple(section),
        mrope_interleaved=_get(rope, "mrope_interleaved", False, w, bool),
        max_positions=_get(tc, "max_position_embeddings", 128_000, w),
    )
    w = f"{where} vision_config"
    deepstack = vc.get("deepstack_visual_indexes", (8, 16, 24))
    if not isinstance(deepstack, (list, tuple)) or not all(isinstance(i, int) for i in deepstack):
        raise CheckpointError(f"{w}: deepstack_visual_indexes={deepstack!r} should be a list of integers; the checkpoint's config.json is malformed.")
    vision = VisionSpec(
        depth=_get(vc, "depth", 27, w),
        hidden=_get(vc, "hidden_size", 1152, w),
        heads=_get(vc, "num_heads", 16, w),
        intermediate=_get(vc, "intermediate_size", 4304, w),
        patch=_get(vc, "patch_size", 16, w),
        merge=_get(vc, "spatial_merge_size", 2, w),
        out_hidden=_get(vc, "out_hidden_size", 3584, w),
        temporal_patch=_get(vc, "temporal_patch_size", 2, w),
        deepstack=tuple(deepstack),
        num_position_embeddings=_get(vc, "num_position_embeddings", 2304, w),
        in_channels=_get(vc, "in_channels", 3, w),
    )
    return ModelSpec(family_of_config(cfg, where).name, name, text, vision)


def _qwen2_text(tc: dict[str, Any], cfg: dict[str, Any], where: str) -> TextSpec:
    arch = (tc.get("architectures") or [None])[0]
    if tc.get("model_type", "qwen2") != "qwen2" or arch not in (None, "Qwen2ForCausalLM"):
        found = arch or tc.get("model_type")
        raise CheckpointError(f"Unsupported InternVL language model {found!r} in {where}; {_supported_text()}.")
    hidden = _get(tc, "hidden_size", 896, where)
    heads = _get(tc, "num_attention_heads", 14, where)
    return TextSpec(
        layers=_get(tc, "num_hidden_layers", 24, where),
        hidden=hidden,
        heads=heads,
        kv_heads=_get(tc, "num_key_value_heads", heads, where),
        head_dim=_get(tc, "head_dim", hidden // heads, where),
        intermediate=_get(tc, "intermediate_size", 4864, where),
        vocab=_get(tc, "vocab_size", 151674, where),
        tied_embeddings=_tied(cfg, tc, where),
        qkv_bias=True,
        qk_norm=False,
        rope_theta=_get(tc, "rope_theta", 1_000_000.0, where, float),
        max_positions=_get(tc, "max_position_embeddings", 32768, where),
    )


def internvl_spec(cfg: dict[str, Any], where: str, name: str) -> ModelSpec:
    """The spec of an InternVL-3 config: transformers' layout (text_config) when the architecture is the class
    that loads it (the record's hf_class), else OpenGVLab's remote-code layout (llm_config); without an
    architecture, the layout its keys show."""
    family = family_of_config(cfg, where)
    archs = cfg.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    hf_format = arch == family.hf_class if arch else "llm_config" not in cfg
    tc = _sub(cfg, "text_config" if hf_format else "llm_config", where)
    vc = dict(_sub(cfg, "vision_config", where))
    text = _qwen2_text(tc, cfg, f"{where} {'text_config' if hf_format else 'llm_config'}")
    w = f"{where} vision_config"
    vc["patch_size"], vc["image_size"] = _side(vc.get("patch_size", 14)), _side(vc.get("image_size", 448))
    ratio = _get(cfg, "downsample_ratio", 0.5, where, float)
    if not 0 < ratio <= 1 or abs(round(1 / ratio) - 1 / ratio) > 1e-6:
        raise CheckpointError(f"{where}: downsample_ratio={ratio!r} should be 1/n; the checkpoint's config.json is malformed.")
    qkv_bias = _get(vc, "attention_bias" if hf_format else "qkv_bias", True, w, bool)
    if not qkv_bias or vc.get("use_qk_norm") or vc.get("qk_normalization"):
        raise CheckpointError(f"Unsupported InternViT variant in {w} (qkv bias off or QK norm on, as in InternViT-6B); {_supported_text()}.")
    vision = VisionSpec(
        depth=_get(vc, "num_hidden_layers", 24, w),
        hidden=_get(vc, "hidden_size", 1024, w),
        heads=_get(vc, "num_attention_heads", 16, w),
        intermediate=_get(vc, "intermediate_size", 4096, w),
        patch=_get(vc, "patch_size", 14, w),
        merge=round(1 / ratio),
        out_hidden=text.hidden,
        image_size=_get(cfg, "force_image_size", vc["image_size"], where),
        class_token=True,
        layer_scale=True,
        max_tiles=_get(cfg, "max_dynamic_patch", 12, where),
        thumbnail=_get(cfg, "use_thumbnail", True, where, bool),
        in_channels=_get(vc, "num_channels", 3, w),
    )
    return ModelSpec(family.name, name, text, vision)


def spec_from_config(config: dict[str, Any] | str | Path) -> ModelSpec:
    """The `ModelSpec` of a Hugging Face checkpoint config (see the module docstring)."""
    cfg, where, name = _load(config)
    spec = family_of_config(cfg, where).code("config_reader")(cfg, where, name)
    for known in REGISTRY.values():
        if same_architecture(spec, known):
            return known
    return spec


def to_hf_config(spec: ModelSpec) -> dict[str, Any]:
    """The transformers config dict for `spec`, written by its family's `config_writer`."""
    return get_family(spec.family).code("config_writer")(spec)


def _text_config(t: TextSpec) -> dict[str, Any]:
    return {
        "hidden_size": t.hidden, "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
        "num_key_value_heads": t.kv_heads, "head_dim": t.head_dim, "intermediate_size": t.intermediate,
        "vocab_size": t.vocab, "max_position_embeddings": t.max_positions, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "tie_word_embeddings": t.tied_embeddings,
    }


def qwen3_vl_config(spec: ModelSpec) -> dict[str, Any]:
    """Qwen3VLForConditionalGeneration's config layout, under the family's first architecture name."""
    t, v = spec.text, spec.vision
    text = _text_config(t)
    rope = {"rope_type": "default", "rope_theta": t.rope_theta}
    if t.mrope_section:
        rope.update(mrope_section=list(t.mrope_section), mrope_interleaved=t.mrope_interleaved)
    text.update(model_type="qwen3_vl_text", attention_bias=t.qkv_bias, rope_parameters=rope)
    vision = {
        "model_type": "qwen3_vl_vision", "depth": v.depth, "hidden_size": v.hidden, "num_heads": v.heads,
        "intermediate_size": v.intermediate, "patch_size": v.patch, "spatial_merge_size": v.merge,
        "temporal_patch_size": v.temporal_patch, "out_hidden_size": v.out_hidden, "in_channels": v.in_channels,
        "num_position_embeddings": v.num_position_embeddings, "deepstack_visual_indexes": list(v.deepstack),
        "hidden_act": "gelu_pytorch_tanh",
    }
    return {"architectures": [get_family(spec.family).architectures[0]], "model_type": "qwen3_vl", "text_config": text,
            "vision_config": vision, "tie_word_embeddings": t.tied_embeddings, **QWEN_TOKEN_IDS}


def internvl_config(spec: ModelSpec) -> dict[str, Any]:
    """transformers' InternVLForConditionalGeneration config layout (Qwen2 text), under the family's first architecture."""
    t, v = spec.text, spec.vision
    text = _text_config(t)
    text.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], rope_theta=t.rope_theta,
                rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta})
    vision = {
        "model_type": "internvl_vision", "hidden_size": v.hidden, "num_hidden_layers": v.depth,
        "num_attention_heads": v.heads, "intermediate_size": v.intermediate, "patch_size": [v.patch, v.patch],
        "image_size": [v.image_size, v.image_size], "attention_bias": True, "use_qk_norm": False,
        "num_channels": v.in_channels, "layer_scale_init_value": 0.1, "use_mean_pooling": True,
    }
    return {"architectures": [get_family(spec.family).architectures[0]], "model_type": "internvl", "text_config": text,
            "vision_config": vision, "downsample_ratio": 1 / v.merge, "tie_word_embeddings": t.tied_embeddings,
            "image_seq_length": (v.image_size // v.patch // v.merge) ** 2, "max_dynamic_patch": v.max_tiles,
            "use_thumbnail": v.thumbnail}
