"""Scenes of coloured shapes and their rendering: the synthetic grounding world.

Contract: `make_scene(rng, ...)` draws a `Scene` (image size, background, 3-6
non-overlapping shapes, optionally a grey occluder over one shape) from a numpy
Generator only, so a scene is a pure function of the generator's state;
`render(scene)` turns it into an RGB PIL image, again deterministically. Boxes are
(x1, y1, x2, y2) pixels with x2/y2 exclusive edges, and always the FULL shape
(an occluder never changes a shape's box). Pure numpy + pillow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 60, 180),
    "orange": (245, 135, 20),
}
OCCLUDER_RGB = (105, 105, 105)
MIN_SIDE, MAX_SIDE = 224, 448
MIN_SHAPES, MAX_SHAPES = 3, 6
# Shape sides as a fraction of the image's short side.
MIN_FRAC, MAX_FRAC = 0.14, 0.30


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    box: tuple[int, int, int, int]

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2

    @property
    def cy(self) -> float:
        return (self.box[1] + self.box[3]) / 2

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    texture_seed: int  # 0 = plain background
    shapes: tuple[Shape, ...]
    occluder: tuple[int, int, int, int] | None = None


def _overlaps(a, b, gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def place_boxes(rng: np.random.Generator, width: int, height: int, sides: list[int], gap: int = 6, tries: int = 60):
    """Non-overlapping square boxes of the given sides, or None when they do not fit."""
    boxes: list[tuple[int, int, int, int]] = []
    for s in sides:
        for _ in range(tries):
            x = int(rng.integers(2, width - s - 1))
            y = int(rng.integers(2, height - s - 1))
            box = (x, y, x + s, y + s)
            if not any(_overlaps(box, b, gap) for b in boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def random_size(rng: np.random.Generator) -> tuple[int, int]:
    """Image (width, height) in [224, 448] with varied aspect ratios."""
    w = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    h = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    return w, h


def random_sides(rng: np.random.Generator, n: int, short: int) -> list[int]:
    return [int(round(rng.uniform(MIN_FRAC, MAX_FRAC) * short)) for _ in range(n)]


def random_background(rng: np.random.Generator) -> tuple[tuple[int, int, int], int]:
    base = int(rng.integers(205, 250))
    tint = rng.integers(-8, 9, size=3)
    bg = tuple(int(np.clip(base + t, 0, 255)) for t in tint)
    texture = int(rng.integers(1, 2**31 - 1)) if rng.random() < 0.5 else 0
    return bg, texture


def make_scene(rng: np.random.Generator, attrs: list[tuple[str, str]], sides: list[int] | None = None, size=None):
    """A scene with one shape per (kind, colour) in `attrs`, placed at random; None if it does not fit."""
    width, height = size or random_size(rng)
    if sides is None:
        sides = random_sides(rng, len(attrs), min(width, height))
    # Place the biggest first so they fit; keep the caller's order for the attributes.
    order = sorted(range(len(sides)), key=lambda i: -sides[i])
    placed = place_boxes(rng, width, height, [sides[i] for i in order])
    if placed is None:
        return None
    boxes = [None] * len(sides)
    for i, box in zip(order, placed):
        boxes[i] = box
    bg, texture = random_background(rng)
    shapes = tuple(Shape(k, c, b) for (k, c), b in zip(attrs, boxes))
    return Scene(width, height, bg, texture, shapes)


def add_occluder(rng: np.random.Generator, scene: Scene, target: int) -> Scene | None:
    """Cover 25-50% of the target's box with a grey rectangle that touches no other shape."""
    x1, y1, x2, y2 = scene.shapes[target].box
    s = x2 - x1
    for _ in range(30):
        side = int(rng.integers(0, 4))  # which edge of the target the occluder comes from
        depth = int(round(rng.uniform(0.3, 0.55) * s))
        extra = int(round(rng.uniform(0.1, 0.4) * s))
        along0 = int(round(rng.uniform(-0.2, 0.2) * s))
        if side == 0:  # from the left
            occ = (x1 - extra, y1 + along0, x1 + depth, y2 + along0)
        elif side == 1:  # from the right
            occ = (x2 - depth, y1 + along0, x2 + extra, y2 + along0)
        elif side == 2:  # from the top
            occ = (x1 + along0, y1 - extra, x2 + along0, y1 + depth)
        else:  # from the bottom
            occ = (x1 + along0, y2 - depth, x2 + along0, y2 + extra)
        occ = (max(0, occ[0]), max(0, occ[1]), min(scene.width, occ[2]), min(scene.height, occ[3]))
        others = [sh.box for i, sh in enumerate(scene.shapes) if i != target]
        if any(_overlaps(occ, b, 2) for b in others):
            continue
        return Scene(scene.width, scene.height, scene.background, scene.texture_seed, scene.shapes, occ)
    return None


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    x1, y1, x2, y2 = shape.box
    x2, y2 = x2 - 1, y2 - 1  # PIL's coordinates are inclusive
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    rgb = COLOURS[shape.colour]
    if shape.kind == "circle":
        draw.ellipse((x1, y1, x2, y2), fill=rgb)
    elif shape.kind == "square":
        draw.rectangle((x1, y1, x2, y2), fill=rgb)
    elif shape.kind == "triangle":
        draw.polygon([(x1, y2), (cx, y1), (x2, y2)], fill=rgb)
    elif shape.kind == "diamond":
        draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=rgb)
    else:  # pragma: no cover - KINDS is closed
        raise ValueError(f"unknown shape kind {shape.kind!r}")


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image; identical pixels for an identical scene."""
    arr = np.empty((scene.height, scene.width, 3), dtype=np.uint8)
    arr[:] = scene.background
    if scene.texture_seed:
        noise = np.random.default_rng(scene.texture_seed).integers(-7, 8, size=(scene.height, scene.width, 1))
        arr = np.clip(arr.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    for shape in scene.shapes:
        _draw_shape(draw, shape)
    if scene.occluder is not None:
        ox1, oy1, ox2, oy2 = scene.occluder
        draw.rectangle((ox1, oy1, ox2 - 1, oy2 - 1), fill=OCCLUDER_RGB)
    return img
