"""Box parsing in EGM's order, with explicit coordinate frames.

Order (EGM's evaluation script): the first `"bbox_2d": [n, n, n, n]`; else the
first bare `[n, n, n, n]`; else the last four numbers; else no box (IoU 0, kept
in the average). A family whose record has a `box_tag` has it tried first (InternVL:
`<box>[x1, y1, x2, y2]</box>`, the list also doubled). Model coordinates are in the
`norm1000` frame (0..1000 of the original image); `to_pixels` maps them as EGM does:
clip to [0, 1000], round(v * W / 1000), clip to the image, and widen a zero-width box
by one pixel.

When the output has the family's closing think tag, only the answer after it is parsed
(a reasoning-aware server returns that as `content`); an output whose thinking never
closed is parsed whole, as EGM parses raw text, and says so in `closed`.
The parser never raises on any text.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

from egm_edge.grounding.prompts import check_choice, split_thinking
from egm_edge.models.families import get_family

_NUM = r"[+-]?(?:\d*\.\d+|\d+)(?:[eE][+-]?\d+)?"
_LIST4 = r"\[\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*\]"
_BBOX2D = re.compile(r'"bbox_2d"\s*:\s*' + _LIST4, re.S)
_BARE = re.compile(_LIST4, re.S)
_NUMS = re.compile(_NUM, re.S)

FRAMES = ("norm1000", "pixels")
METHODS = ("box_tag", "bbox_2d", "bare_list", "last_four_numbers")


@lru_cache(maxsize=None)
def _box_tag(tag: tuple[str, str]) -> re.Pattern:
    """`open [n, n, n, n] close` for a family's answer tag; the list may be doubled (`[[...]]`)."""
    start, end = tag
    return re.compile(re.escape(start) + r"\s*(?:\[\s*)?" + _LIST4 + r"(?:\s*\])?\s*" + re.escape(end), re.S)


@dataclass(frozen=True)
class ParseResult:
    """A parsed box, or the reason there is none.

    box: (x1, y1, x2, y2) in pixels of the original image, or None.
    raw: the four numbers as the model wrote them (frame `frame`).
    """

    box: tuple[float, float, float, float] | None
    raw: tuple[float, float, float, float] | None
    frame: str
    method: str | None
    reason: str | None
    closed: bool

    @property
    def box_norm1000(self) -> tuple[float, float, float, float] | None:
        if self.raw is None:
            return None
        return tuple(min(max(v, 0.0), 1000.0) for v in self.raw)

    @property
    def ok(self) -> bool:
        return self.box is not None


def _floats(groups) -> tuple[float, float, float, float] | None:
    try:
        vals = tuple(float(g) for g in groups)
    except (TypeError, ValueError, OverflowError):
        return None
    return vals if len(vals) == 4 else None


def find_numbers(text: str, family="qwen3_vl") -> tuple[tuple[float, float, float, float] | None, str | None]:
    """The four numbers EGM's order picks from `text`, and which rule picked them."""
    tag = get_family(family).box_tag
    if tag:
        m = _box_tag(tag).search(text)
        if m:
            return _floats(m.groups()), "box_tag"
    m = _BBOX2D.search(text)
    if m:
        return _floats(m.groups()), "bbox_2d"
    m = _BARE.search(text)
    if m:
        return _floats(m.groups()), "bare_list"
    nums = _NUMS.findall(text)
    if len(nums) >= 4:
        return _floats(nums[-4:]), "last_four_numbers"
    return None, None


def to_pixels(raw, width: int, height: int) -> tuple[float, float, float, float]:
    """norm1000 -> pixels exactly as EGM's `scale_bbox` (clip, round, clip, widen by one)."""
    cleaned = []
    for v in raw:
        v = float(v)
        if not math.isfinite(v):
            v = 0.0
        cleaned.append(min(max(v, 0.0), 1000.0))
    x1, y1, x2, y2 = cleaned
    x1, x2 = round(x1 * width / 1000.0), round(x2 * width / 1000.0)
    y1, y2 = round(y1 * height / 1000.0), round(y2 * height / 1000.0)
    x1, x2 = max(0, min(x1, width - 1)), max(0, min(x2, width - 1))
    y1, y2 = max(0, min(y1, height - 1)), max(0, min(y2, height - 1))
    if x1 == x2 and width > 1:
        x2 = min(x1 + 1, width - 1)
    if y1 == y2 and height > 1:
        y2 = min(y1 + 1, height - 1)
    return (float(x1), float(y1), float(x2), float(y2))


def to_norm1000(box, width: int, height: int) -> tuple[int, int, int, int]:
    """Pixels -> the 0..1000 frame of the original image (what EGM's targets use)."""
    x1, y1, x2, y2 = box
    vals = (x1 * 1000.0 / width, y1 * 1000.0 / height, x2 * 1000.0 / width, y2 * 1000.0 / height)
    return tuple(max(0, min(1000, int(round(v)))) for v in vals)


def parse_box(text, width: int, height: int, family="qwen3_vl", frame: str = "norm1000") -> ParseResult:
    """Parse a model output into a pixel box on a `width` x `height` image; never raises on text.

    `frame` says what the numbers in the text mean: `norm1000` (EGM and Qwen3-VL) or
    `pixels` (models that answer in absolute pixels of the original image).
    """
    fam = get_family(family)
    check_choice(frame, FRAMES, "coordinate frame")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not isinstance(text, str):
        return ParseResult(None, None, frame, None, f"output is {type(text).__name__}, not text", False)
    _, answer, closed = split_thinking(text, fam)
    target = answer if closed else text
    raw, method = find_numbers(target, fam)
    if raw is None:
        if closed and not answer:
            reason = f"the answer after {fam.tokens.think_close} is empty"
        elif not target.strip():
            reason = "the output is empty"
        else:
            reason = "no box: no bbox_2d, no [x1, y1, x2, y2] list and fewer than four numbers"
        return ParseResult(None, None, frame, None, reason, closed)
    if frame == "norm1000":
        box = to_pixels(raw, width, height)
    else:
        x1, y1, x2, y2 = (v if math.isfinite(v) else 0.0 for v in raw)
        box = (
            float(min(max(x1, 0), width)),
            float(min(max(y1, 0), height)),
            float(min(max(x2, 0), width)),
            float(min(max(y2, 0), height)),
        )
    return ParseResult(box, raw, frame, method, None, closed)
