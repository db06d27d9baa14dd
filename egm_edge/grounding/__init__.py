"""The grounding core: EGM prompts, box parsing and metrics. Pure Python, no torch, no numpy needed.

Public API: `parse_box(text, width, height, family="qwen3_vl")` and `iou(a, b)` with
boxes as (x1, y1, x2, y2) pixels of the original image; `user_text` and `chat_prompt`
build a family's prompt from its record (egm_edge.models.families).
"""

from egm_edge.grounding.metrics import REFCOCO_SPLITS, SplitScore, hit, iou, refcoco_average, score, score_by_split
from egm_edge.grounding.parse import ParseResult, find_numbers, parse_box, to_norm1000, to_pixels
from egm_edge.grounding.prompts import (
    TASKS,
    chat_prompt,
    clean_expression,
    format_answer,
    split_thinking,
    user_text,
)
from egm_edge.grounding.result import GroundingResult

__all__ = [
    "REFCOCO_SPLITS", "TASKS",
    "GroundingResult", "ParseResult", "SplitScore",
    "chat_prompt", "clean_expression", "find_numbers", "format_answer", "hit", "iou", "parse_box",
    "refcoco_average", "score", "score_by_split", "split_thinking", "to_norm1000", "to_pixels", "user_text",
]
