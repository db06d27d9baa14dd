"""The result every runner returns (reference, runtime, remote endpoint): one shape for all."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class GroundingResult:
    """One grounding: the box in pixels of the original image (or why there is none) and how it was made.

    timings holds milliseconds: preprocess, vision, prefill, decode, total, ms_per_token.
    """

    box: tuple[float, float, float, float] | None
    box_norm1000: tuple[float, float, float, float] | None
    text: str
    reasoning: str
    answer: str
    think_tokens: int
    answer_tokens: int
    budget_forced: bool
    parse_reason: str | None = None
    parse_method: str | None = None
    image_size: tuple[int, int] | None = None  # (width, height)
    timings: dict = field(default_factory=dict)
    truncated: bool = False  # the output hit a length cap before the model stopped
    # The model wrote x2 < x1 or y2 < y1. `box` keeps its order: EGM's IoU scores such a box as having no
    # area, and changing it here would change the metric; drawings show the rectangle it spans.
    corners_swapped: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("box", "box_norm1000", "image_size"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_output(cls, text: str, width: int, height: int, *, think_tokens: int, answer_tokens: int,
                    budget_forced: bool, family="qwen3_vl", timings: dict | None = None,
                    truncated: bool = False) -> "GroundingResult":
        """Build a result from a model's decoded output text (parsing as EGM does, with `family`'s tags)."""
        from egm_edge.grounding.parse import parse_box
        from egm_edge.grounding.prompts import split_thinking

        parsed = parse_box(text, width, height, family=family)
        reasoning, answer, _ = split_thinking(text, family)
        return cls(
            box=parsed.box,
            box_norm1000=parsed.box_norm1000,
            text=text,
            reasoning=reasoning,
            answer=answer,
            think_tokens=think_tokens,
            answer_tokens=answer_tokens,
            budget_forced=budget_forced,
            parse_reason=parsed.reason,
            parse_method=parsed.method,
            image_size=(width, height),
            timings=dict(timings or {}),
            truncated=truncated,
            corners_swapped=parsed.box is not None and (parsed.box[2] < parsed.box[0] or parsed.box[3] < parsed.box[1]),
        )
