"""Qwen3-VL (EGM-Qwen3-VL 2B/4B/8B): transformers' Qwen3VLForConditionalGeneration, Thinking chat template.

EGM's evaluation prompt (verl/scripts/sglang_infer.py, templates "qwen3" and "qwen3_amodal"): one user
turn, image first, then the text; no system prompt. The Thinking template's generation prompt
opens the reasoning, so outputs hold only `</think>`; the answer is a fenced JSON list with
`bbox_2d` in 0..1000 of the original image. Qwen's own budget method forces STOP_THINKING.
"""

from egm_edge.models.families.base import STAGES, Family, FamilyTokens, register

STOP_THINKING = (
    "Considering the limited time by the user, I have to give the solution based on the thinking directly now.\n"
    "</think>\n\n"
)

# Qwen3's added tokens in Qwen's order; True = "special" (skipped by skip_special_tokens).
ADDED_TOKENS = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
)

# EGM's Thinking template: one user turn (images and text in order), assistant turns with
# their reasoning, and a generation prompt that opens the thinking.
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
{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
{%- elif 'text' in part -%}
{{- part.text -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- elif message.role == 'assistant' -%}
{%- set content = message.content if message.content is string else message.content | map(attribute='text') | join('') -%}
{%- if message.reasoning_content is string -%}
{{- '<|im_start|>assistant\n<think>\n' + message.reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') + '<|im_end|>\n' -}}
{%- else -%}
{{- '<|im_start|>assistant\n' + content + '<|im_end|>\n' -}}
{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n<think>\n' -}}
{%- endif -%}
"""

QWEN3_VL = register(Family(
    name="qwen3_vl",
    title="Qwen3-VL",
    architectures=("Qwen3VLForConditionalGeneration",),
    model_types=("qwen3_vl",),
    hf_class="Qwen3VLForConditionalGeneration",
    templates={
        "vanilla": "Locate {expr}, output its bbox coordinates using JSON format",
        "amodal": "Locate {expr} amodally, output its bbox coordinates using JSON format",
    },
    user_turn="<|im_start|>user\n{image}{text}<|im_end|>\n",
    image_placeholder="<|vision_start|>{tokens}<|vision_end|>",
    generation_prompt="<|im_start|>assistant\n<think>\n",
    tokens=FamilyTokens(
        think_open="<think>", think_close="</think>", stop=("<|im_end|>", "<|endoftext|>"),
        image="<|image_pad|>", image_start="<|vision_start|>", image_end="<|vision_end|>",
        stop_thinking=STOP_THINKING, extra=("<|im_start|>", "<|video_pad|>"),
    ),
    box_tag=None,
    language_prefix="model.language_model.",
    vision_prefixes=("model.visual.",),
    vision_stem="model.visual.patch_embed",
    preprocessor="smart_resize",
    positions="mrope",
    config_reader="egm_edge.models.hf_config:qwen3_vl_spec",
    graphs="egm_edge.export.graphs",
    stages=frozenset(STAGES),
    chat_template=CHAT_TEMPLATE,
    added_tokens=ADDED_TOKENS,
    config_writer="egm_edge.models.hf_config:qwen3_vl_config",
    vision_params="egm_edge.models.spec:qwen3_vl_vision_params",
    config_tokens={
        "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
    },
))
