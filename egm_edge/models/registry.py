"""Registry of the real EGM architectures (and a tiny one for tests), with their aliases.

Contract: `get_spec(name)` returns the `ModelSpec` for a registry name or alias
(case-insensitive) or raises `InputError` listing the choices; `list_specs()`
gives the registry names in a stable order. The numbers are the published
`config.json` values of the base checkpoints EGM fine-tunes (fine-tuning keeps the
architecture), so the planner can size a model before its weights are at hand.
"""

from __future__ import annotations

from egm_edge.errors import InputError
from egm_edge.models.spec import ModelSpec, TextSpec, VisionSpec

# Qwen3-VL: text and vision numbers from the Hugging Face configs of
# Qwen/Qwen3-VL-{2B,4B,8B}-Thinking (https://huggingface.co/Qwen/Qwen3-VL-8B-Thinking/blob/main/config.json
# and siblings; the Instruct and Thinking variants share the architecture). EGM-Qwen3-VL-*B is
# fine-tuned from these (DESIGN.md). Cross-checked against public code quoting the same configs
# (sgl-jax Qwen3VLVisionConfig defaults = 2B vision; a Qwen3-VL-4B-Instruct config dict in a
# musubi-tuner port; the 8B vision block in several Qwen3-VL ports: depth 27, hidden 1152,
# intermediate 4304, deepstack 8/16/24).
_QWEN_ROPE = dict(rope_theta=5_000_000.0, mrope_section=(24, 20, 20), mrope_interleaved=True, max_positions=262_144)
_QWEN_VIT_SMALL = dict(depth=24, hidden=1024, heads=16, intermediate=4096, deepstack=(5, 11, 17))  # 2B and 4B
_QWEN_VIT_LARGE = dict(depth=27, hidden=1152, heads=16, intermediate=4304, deepstack=(8, 16, 24))  # 8B
_QWEN_VIT_COMMON = dict(patch=16, merge=2, temporal_patch=2, num_position_embeddings=2304)


def _qwen(name: str, source: str, params_b: float, vit: dict, **text) -> ModelSpec:
    t = TextSpec(head_dim=128, kv_heads=8, vocab=151_936, qk_norm=True, qkv_bias=False, **_QWEN_ROPE, **text)
    return ModelSpec("qwen3_vl", name, t, VisionSpec(out_hidden=t.hidden, **vit, **_QWEN_VIT_COMMON), source, params_b)


# InternVL3: InternViT-300M-448px-V2_5 (24 layers, hidden 1024, 16 heads, MLP 4096, patch 14,
# 448-px tiles, pixel shuffle 0.5 = 256 tokens per tile, up to 12 tiles + thumbnail) + a Qwen2.5
# LLM with a 151674-token vocabulary and an untied lm_head. Numbers from the configs of
# OpenGVLab/InternVL3-{1B,2B,8B} (https://huggingface.co/OpenGVLab/InternVL3-1B/blob/main/config.json,
# llm_config/vision_config; the 1B config and module tree are quoted verbatim in public code) and the
# Qwen2.5-{0.5B,1.5B,7B} configs their llm_config copies.
_INTERNVIT = dict(
    depth=24, hidden=1024, heads=16, intermediate=4096, patch=14, merge=2, image_size=448,
    class_token=True, layer_scale=True, max_tiles=12, thumbnail=True,
)


def _internvl(name: str, source: str, params_b: float, **text) -> ModelSpec:
    t = TextSpec(
        vocab=151_674, tied_embeddings=False, qkv_bias=True, qk_norm=False, head_dim=text["hidden"] // text["heads"],
        rope_theta=1_000_000.0, max_positions=32_768, **text,
    )
    return ModelSpec("internvl", name, t, VisionSpec(out_hidden=t.hidden, **_INTERNVIT), source, params_b)


_SPECS: tuple[ModelSpec, ...] = (
    # Qwen3-VL-2B: text = Qwen3-1.7B dims; 2.13B parameters in all.
    _qwen("EGM-Qwen3-VL-2B", "Qwen/Qwen3-VL-2B-Thinking", 2.1, _QWEN_VIT_SMALL,
          layers=28, hidden=2048, heads=16, intermediate=6144, tied_embeddings=True),
    # Qwen3-VL-4B: text = Qwen3-4B dims; 4.44B.
    _qwen("EGM-Qwen3-VL-4B", "Qwen/Qwen3-VL-4B-Thinking", 4.4, _QWEN_VIT_SMALL,
          layers=36, hidden=2560, heads=32, intermediate=9728, tied_embeddings=True),
    # Qwen3-VL-8B: text = Qwen3-8B dims, untied lm_head; 8.77B.
    _qwen("EGM-Qwen3-VL-8B", "Qwen/Qwen3-VL-8B-Thinking", 8.8, _QWEN_VIT_LARGE,
          layers=36, hidden=4096, heads=32, intermediate=12288, tied_embeddings=False),
    # InternVL3-1B: Qwen2.5-0.5B (hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864); 0.94B.
    _internvl("EGM-InternVL3-1B", "OpenGVLab/InternVL3-1B", 0.9, hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864),
    # InternVL3-2B: Qwen2.5-1.5B (hidden 1536, 28 layers, 12 heads, 2 KV heads, MLP 8960); 2.09B.
    _internvl("EGM-InternVL3-2B", "OpenGVLab/InternVL3-2B", 2.1, hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960),
    # InternVL3-8B: Qwen2.5-7B (hidden 3584, 28 layers, 28 heads, 4 KV heads, MLP 18944); 7.94B.
    _internvl("EGM-InternVL3-8B", "OpenGVLab/InternVL3-8B", 7.9, hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944),
    # The test model: the shapes egm_edge.reference.checkpoint builds (text 64 x 2 layers, ViT 64 x 2).
    ModelSpec(
        "qwen3_vl", "tiny",
        TextSpec(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=151_936, tied_embeddings=False,
                 rope_theta=5_000_000.0, mrope_section=(4, 2, 2), mrope_interleaved=True, max_positions=4096),
        VisionSpec(depth=2, hidden=64, heads=2, intermediate=128, patch=16, merge=2, temporal_patch=2, out_hidden=64,
                   deepstack=(0,), num_position_embeddings=576),
        source="egm_edge.reference.checkpoint (random weights)",
    ),
)

REGISTRY: dict[str, ModelSpec] = {s.name.lower(): s for s in _SPECS}
ALIASES: dict[str, str] = {
    "egm-2b": "egm-qwen3-vl-2b",
    "egm-4b": "egm-qwen3-vl-4b",
    "egm-8b": "egm-qwen3-vl-8b",
}


def list_specs() -> list[str]:
    """Registry names (lower case), real models first, `tiny` last."""
    return list(REGISTRY)


def choices() -> list[str]:
    """Every name the CLI accepts: aliases first, then the registry names."""
    return list(ALIASES) + list_specs()


def get_spec(name: str) -> ModelSpec:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in REGISTRY:
        raise InputError(f"Unknown model {name!r}; pass a checkpoint directory or one of: {', '.join(choices())}.")
    return REGISTRY[key]


def alias_of(spec: ModelSpec) -> str:
    """The shortest CLI name for a registry spec (its alias when it has one)."""
    key = spec.name.lower()
    return next((a for a, k in ALIASES.items() if k == key), key)


def same_architecture(a: ModelSpec, b: ModelSpec) -> bool:
    """True when two specs describe the same network (names and sources aside)."""
    return a.family == b.family and a.text == b.text and a.vision == b.vision
