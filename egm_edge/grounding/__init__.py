"""The grounding core: EGM prompts, box parsing and metrics. Pure Python, no torch, no numpy needed.

Public API: `parse_box(text, width, height, family="qwen3_vl")` and `iou(a, b)` with
boxes as (x1, y1, x2, y2) pixels of the original image.
"""

from egm_edge.grounding.metrics import REFCOCO_SPLITS, SplitScore, hit, iou, refcoco_average, score, score_by_split
from egm_edge.grounding.parse import ParseResult, find_numbers, parse_box, to_norm1000, to_pixels
from egm_edge.grounding.prompts import (
    FAMILIES,
    GENERATION_PROMPT,
    QWEN_STOP_THINKING,
    TASKS,
    THINK_CLOSE,
    clean_expression,
    format_answer,
    qwen_chat_prompt,
    split_thinking,
    user_text,
)
from egm_edge.grounding.result import GroundingResult

__all__ = [
    "FAMILIES", "GENERATION_PROMPT", "QWEN_STOP_THINKING", "REFCOCO_SPLITS", "TASKS", "THINK_CLOSE",
    "GroundingResult", "ParseResult", "SplitScore",
    "clean_expression", "find_numbers", "format_answer", "hit", "iou", "parse_box", "qwen_chat_prompt",
    "refcoco_average", "score", "score_by_split", "split_thinking", "to_norm1000", "to_pixels", "user_text",
]
