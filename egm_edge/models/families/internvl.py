"""InternVL-3 (EGM-InternVL-3 1B/2B/8B): InternViT + pixel shuffle + a Qwen2.5 language model.

transformers' InternVLForConditionalGeneration loads it; checkpoints in OpenGVLab's original
InternVLChatModel layout are recognised (their config is read as data, never executed).
EGM's evaluation prompts (verl/scripts/sglang_infer.py, templates "grounding" and "amodal"): the
grounding one ends with "</ref> " and a trailing space, the amodal one has none. Answers are
`<box>[x1, y1, x2, y2]</box>` in 0..1000 (verl-internvl). The chat template is transformers'
InternVL one: `<|im_start|>user\n<img>...</img>\n{text}<|im_end|>\n<|im_start|>assistant\n`.
The Qwen2.5 tokenizer has no `<think>` token: the reasoning tags are text.
Stages: all of them (plan, reference, quantize, export, runtime); OpenGVLab-layout checkpoints go through
`egm-edge convert` first.
"""

from egm_edge.models.families.base import STAGES, Family, FamilyTokens, register
from egm_edge.models.families.qwen3_vl import ADDED_TOKENS as QWEN3_ADDED_TOKENS
from egm_edge.models.families.qwen3_vl import STOP_THINKING

# The InternVL-3 tokenizer: Qwen2.5's 22 added tokens (Qwen3's list up to <|file_sep|>, same order and
# flags), then the 9 InternVL added as special tokens (ids 151665.. in the real one; <IMG_CONTEXT> is 151667).
ADDED_TOKENS = QWEN3_ADDED_TOKENS[: [t for t, _ in QWEN3_ADDED_TOKENS].index("<|file_sep|>") + 1] + tuple(
    (t, True) for t in ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
)

# transformers' InternVL chat template (an image part renders as <IMG_CONTEXT> and a newline, which the
# processor expands to <img>...</img>); system turns as Qwen's; no system prompt unless one is given.
CHAT_TEMPLATE = r"""{%- for message in messages -%}
{%- if message.role == 'system' -%}
{{- '<|im_start|>system\n' + (message.content if message.content is string else message.content | map(attribute='text') | join('')) + '<|im_end|>\n' -}}
{%- elif message.role == 'user' -%}
{{- '<|im_start|>user\n' -}}
{%- if message.content is string -%}
{{- message.content -}}
{%- else -%}
{%- for part in message.content -%}
{%- if part.type == 'image' or 'image' in part or 'image_url' in part -%}
{{- '<IMG_CONTEXT>\n' -}}
{%- elif 'text' in part -%}
{{- part.text -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- elif message.role == 'assistant' -%}
{{- '<|im_start|>assistant\n' + (message.content if message.content is string else message.content | map(attribute='text') | join('')) + '<|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""

# OpenGVLab's original layout (InternVLChatModel, remote code) -> transformers' names, as transformers' own
# converter (models/internvl/convert_internvl_weights_to_hf.py) renames them; egm_edge.reference.convert applies
# these in order, vision rules to `vision_model.*` names only, and splits the vision attention's fused `qkv`.
ORIGINAL_ARCHITECTURE = "InternVLChatModel"
ORIGINAL_VISION_PREFIX = "vision_model."
ORIGINAL_VISION_RULES = (
    (r"^vision_model\.", "model.vision_tower."),
    (r"\.layers\.", ".layer."),
    (r"\.class_embedding$", ".cls_token"),
    (r"\.position_embedding$", ".position_embeddings"),
    (r"\.patch_embedding\.", ".patch_embeddings.projection."),
    (r"\.ls(\d)$", r".lambda_\1"),
    (r"\.attn\.proj\.", ".attention.projection_layer."),
    (r"\.attn\.", ".attention."),
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
)
ORIGINAL_OTHER_RULES = (
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^mlp1\.0\.", "model.multi_modal_projector.layer_norm."),
    (r"^mlp1\.1\.", "model.multi_modal_projector.linear_1."),
    (r"^mlp1\.3\.", "model.multi_modal_projector.linear_2."),
)
ORIGINAL_FUSED_QKV = ".attention.qkv."  # after renaming: split in q_proj, k_proj, v_proj rows

INTERNVL = register(Family(
    name="internvl",
    title="InternVL-3",
    architectures=("InternVLForConditionalGeneration", ORIGINAL_ARCHITECTURE),
    model_types=("internvl", "internvl_chat"),
    hf_class="InternVLForConditionalGeneration",
    templates={
        "vanilla": "Please provide the bounding box coordinate of the region this sentence describes: <ref>{expr}</ref> ",
        "amodal": "Please provide the amodal bounding box coordinate of the region this sentence describes: <ref>{expr}</ref>",
    },
    user_turn="<|im_start|>user\n{image}\n{text}<|im_end|>\n",
    image_placeholder="<img>{tokens}</img>",
    generation_prompt="<|im_start|>assistant\n",
    tokens=FamilyTokens(
        think_open="<think>", think_close="</think>", stop=("<|im_end|>", "<|endoftext|>"),
        image="<IMG_CONTEXT>", image_start="<img>", image_end="</img>",
        stop_thinking=STOP_THINKING, extra=("<|im_start|>", "<ref>", "</ref>", "<box>", "</box>"),
    ),
    box_tag=("<box>", "</box>"),
    ref_tag=("<ref>", "</ref>"),
    language_prefix="model.language_model.",
    vision_prefixes=("model.vision_tower.", "model.multi_modal_projector."),
    vision_stem="model.vision_tower.embeddings",
    preprocessor="tiling",
    positions="rope1d",
    config_reader="egm_edge.models.hf_config:internvl_spec",
    graphs="egm_edge.export.graphs_internvl",
    stages=frozenset(STAGES),
    chat_template=CHAT_TEMPLATE,
    added_tokens=ADDED_TOKENS,
    config_writer="egm_edge.models.hf_config:internvl_config",
    vision_params="egm_edge.models.spec:internvl_vision_params",
    config_tokens={"image_token_id": "<IMG_CONTEXT>"},
))
