"""InternVL-3 (EGM-InternVL-3 1B/2B/8B): InternViT + pixel shuffle + a Qwen2.5 language model.

transformers' InternVLForConditionalGeneration loads it; checkpoints in OpenGVLab's original
InternVLChatModel layout are recognised (their config is read as data, never executed).
EGM's evaluation prompts (verl/scripts/sglang_infer.py, templates "grounding" and "amodal"): the
grounding one ends with "</ref> " and a trailing space, the amodal one has none. Answers are
`<box>[x1, y1, x2, y2]</box>` in 0..1000 (verl-internvl). The chat template is transformers'
InternVL one: `<|im_start|>user\n<img>...</img>\n{text}<|im_end|>\n<|im_start|>assistant\n`.
The Qwen2.5 tokenizer has no `<think>` token: the reasoning tags are text.
Stages: the planner only, until the reference runner, quantize, export and runtime read this record.
"""

from egm_edge.models.families.base import Family, FamilyTokens, register
from egm_edge.models.families.qwen3_vl import STOP_THINKING

INTERNVL = register(Family(
    name="internvl",
    title="InternVL-3",
    architectures=("InternVLForConditionalGeneration", "InternVLChatModel"),
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
    stages=frozenset({"plan"}),
    config_writer="egm_edge.models.hf_config:internvl_config",
    vision_params="egm_edge.models.spec:internvl_vision_params",
    config_tokens={"image_token_id": "<IMG_CONTEXT>"},
))
