"""Grounding samples and the bookkeeping every loader shares.

Contract: a `Sample` is one (image, referring expression, ground-truth box) triple
with the box as (x1, y1, x2, y2) pixels of the stored image. Loaders turn raw
records into samples through `Collector`, which checks the box against the image
size and either raises (strict: `file:line: reason`) or skips and counts the
record under a short reason (lenient). Nothing is dropped without being counted.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from egm_edge.errors import InputError
from egm_edge.grounding import TASKS

# A box may overshoot the image by this many pixels (COCO boxes often end at W + 0.5).
BOX_TOLERANCE_PX = 1.0


@dataclass(frozen=True)
class Sample:
    """One referring expression with its ground-truth box in pixels of the stored image."""

    image: Path
    expression: str
    bbox: tuple[float, float, float, float]
    width: int
    height: int
    split: str | None = None
    sample_id: str | None = None
    task: str = "vanilla"
    extra: dict[str, Any] = field(default_factory=dict, compare=True, hash=False)


class BadRecord(Exception):
    """A record that cannot become a sample: `reason` is the short counter key, `detail` the sentence."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class LoadResult:
    """Samples plus an account of every record that was not turned into one."""

    path: Path
    format: str
    samples: list[Sample] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_lines: list[tuple[str, str]] = field(default_factory=list)
    filtered: int = 0  # samples (expressions) of other splits when a split was asked for; not errors

    def by_split(self) -> dict[str, int]:
        return dict(Counter(s.split or "-" for s in self.samples))

    def summary(self) -> str:
        splits = ", ".join(f"{k} {v}" for k, v in sorted(self.by_split().items())) or "none"
        text = f"{len(self.samples)} samples from {self.path.name} ({self.format}): {splits}"
        if self.filtered:
            text += f"; {self.filtered} of other splits left out"
        n_skip = sum(self.skipped.values())
        if n_skip:
            reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]))
            text += f"; skipped {n_skip} ({reasons})"
        return text


class Collector:
    """Builds a LoadResult: strict mode raises on the first bad record, lenient mode counts it.

    With check_images, each sample's image must exist and its header size must match
    the record's width and height (EGM's evaluation refuses a mismatch too).
    """

    def __init__(self, path: Path, fmt: str, strict: bool, check_images: bool = False):
        self.result = LoadResult(path=path, format=fmt)
        self.strict = strict
        self.check_images = check_images
        self._sizes: dict[Path, tuple[int, int] | BadRecord] = {}

    def bad(self, where: str, err: BadRecord) -> None:
        if self.strict:
            raise InputError(f"{self.result.path}:{where}: {err.detail}; fix it, or pass --lenient (strict=False) to skip and count bad records.")
        r = self.result
        r.skipped[err.reason] = r.skipped.get(err.reason, 0) + 1
        r.skipped_lines.append((where, err.detail))

    def add(self, sample: Sample, where: str) -> None:
        if self.check_images:
            got = self._image_size(sample.image)
            if isinstance(got, BadRecord):
                return self.bad(where, got)
            if got != (sample.width, sample.height):
                detail = f"image {sample.image} is {got[0]}x{got[1]}, the record says {sample.width}x{sample.height}"
                return self.bad(where, BadRecord("image size mismatch", detail))
        self.result.samples.append(sample)

    def _image_size(self, path: Path) -> tuple[int, int] | BadRecord:
        if path not in self._sizes:
            from PIL import Image, UnidentifiedImageError

            try:
                with Image.open(path) as im:  # header only: no pixel is decoded
                    self._sizes[path] = im.size
            except FileNotFoundError:
                self._sizes[path] = BadRecord("missing image", f"image file {path} does not exist")
            except (UnidentifiedImageError, OSError, ValueError) as e:
                self._sizes[path] = BadRecord("unreadable image", f"image file {path} cannot be read ({e})")
        return self._sizes[path]


def check_size(width: Any, height: Any) -> tuple[int, int]:
    """Image width and height as positive ints, or BadRecord."""
    out = []
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v) or v <= 0:
            raise BadRecord("bad image size", f"{name} {v!r} is not a positive whole number")
        out.append(int(v))
    return out[0], out[1]


def check_box(bbox: Any, width: int, height: int, name: str = "bbox") -> tuple[float, float, float, float]:
    """An (x1, y1, x2, y2) pixel box inside the image (within BOX_TOLERANCE_PX), or BadRecord."""
    if not isinstance(bbox, (list, tuple)):
        raise BadRecord("bbox not a list", f"{name} {_short(bbox)} is not a list of four numbers")
    if len(bbox) != 4:
        raise BadRecord("bbox wrong length", f"{name} {_short(bbox)} has {len(bbox)} values, not 4")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
        raise BadRecord("bbox not numeric", f"{name} {_short(bbox)} holds a value that is not a number")
    x1, y1, x2, y2 = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise BadRecord("bbox not numeric", f"{name} {_short(bbox)} holds a non-finite number")
    if x2 <= x1 or y2 <= y1:
        raise BadRecord("degenerate bbox", f"{name} {_short(bbox)} is degenerate (needs x2 > x1 and y2 > y1)")
    t = BOX_TOLERANCE_PX
    if x1 < -t or y1 < -t or x2 > width + t or y2 > height + t:
        raise BadRecord("bbox outside image", f"{name} {_short(bbox)} lies outside the {width}x{height} image")
    return (x1, y1, x2, y2)


def check_expression(sent: Any) -> str:
    if not isinstance(sent, str):
        raise BadRecord("expression not text", f"expression {_short(sent)} is not text")
    text = " ".join(sent.split())
    if not text:
        raise BadRecord("empty expression", "the expression is empty")
    return text


def check_task(task: Any) -> str:
    if task not in TASKS:
        raise BadRecord("unknown task", f"task {task!r} is not one of {', '.join(TASKS)}")
    return task


def _short(v: Any, n: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= n else text[:n] + "..."
