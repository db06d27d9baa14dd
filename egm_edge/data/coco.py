"""COCO instance files as calibration sources: images, their objects, and templated referring expressions.

Contract: `load_coco_instances` reads a COCO `instances_*.json` into `CocoImage`s
(boxes converted from xywh to xyxy pixels and checked against the image);
`templated_expressions` writes referring expressions that single out exactly one
object ("the dog", "the person on the left", "the largest car"), and only when
the object really is unique by category, position or size. They stand in for
RefCOCO when calibrating quantization: the activations come from real images and
real-looking prompts. Default image folder: `<root>/images/<split>/` (the coco128
layout) else `<root>/<split>/` (the official one), where `<root>` holds `annotations/`.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from egm_edge.data.samples import BadRecord, Sample, check_box, check_size
from egm_edge.errors import InputError

# An object must cover this fraction of the image to be described (tiny ones make poor calibration).
MIN_AREA_FRACTION = 0.005
# Position words need this gap between centres, as a fraction of the image side.
POSITION_MARGIN = 0.1
# Size words need this ratio between the object and every other of its category.
SIZE_RATIO = 1.5


@dataclass(frozen=True)
class CocoInstance:
    category: str
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 pixels
    area: float
    iscrowd: bool


@dataclass(frozen=True)
class CocoImage:
    image: Path
    width: int
    height: int
    image_id: str
    instances: tuple[CocoInstance, ...]
    dropped: int = 0  # annotations left out in lenient mode (bad boxes); never silently


@dataclass(frozen=True)
class Referring:
    """A templated referring expression and the one object it picks out."""

    expression: str
    bbox: tuple[float, float, float, float]
    category: str
    rule: str  # unique | left | right | top | bottom | largest | smallest


def default_coco_image_root(path: Path) -> Path:
    split = path.stem[len("instances_") :] if path.stem.startswith("instances_") else path.stem
    root = path.parent.parent
    candidates = [root / "images" / split, root / split]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def load_coco_instances(path: str | os.PathLike, image_root: str | os.PathLike | None = None, *, strict: bool = True) -> list[CocoImage]:
    """Every image of a COCO instances file with its objects; bad annotations raise (strict) or are counted."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise InputError(f"COCO instances file {path} does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"COCO instances file {path} is not valid JSON ({e}).") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise InputError(f"{path} lacks the 'images', 'annotations' and 'categories' lists of a COCO instances file.")
    root = Path(image_root) if image_root is not None else default_coco_image_root(path)
    names = {c.get("id"): str(c.get("name")) for c in data["categories"] if isinstance(c, dict)}
    images: dict = {}
    for im in data["images"]:
        try:
            width, height = check_size(im.get("width"), im.get("height"))
            images[im["id"]] = (im, width, height)
        except (BadRecord, KeyError, AttributeError) as e:
            raise InputError(f"{path}: image entry {im!r:.80} is malformed ({e}).") from None
    per_image: dict = {k: [] for k in images}
    dropped: dict = {k: 0 for k in images}
    for ann in data["annotations"]:
        try:
            inst, image_id = _instance(ann, images, names)
        except BadRecord as err:
            where = f"{path}: annotation {ann.get('id') if isinstance(ann, dict) else ann!r}"
            if strict or err.reason == "unknown image":
                raise InputError(f"{where}: {err.detail}; fix it or load with strict=False to leave it out.") from None
            dropped[ann["image_id"]] += 1
            continue
        per_image[image_id].append(inst)
    return [
        CocoImage(
            image=Path(os.path.abspath(root / im.get("file_name", f"{image_id}.jpg"))),
            width=width,
            height=height,
            image_id=str(image_id),
            instances=tuple(per_image[image_id]),
            dropped=dropped[image_id],
        )
        for image_id, (im, width, height) in images.items()
    ]


def _instance(ann, images: dict, names: dict) -> tuple[CocoInstance, object]:
    if not isinstance(ann, dict) or ann.get("image_id") not in images:
        raise BadRecord("unknown image", "it refers to an image that is not in 'images'")
    _, width, height = images[ann["image_id"]]
    if ann.get("category_id") not in names:
        raise BadRecord("unknown category", f"category {ann.get('category_id')!r} is not in 'categories'")
    xywh = ann.get("bbox")
    if not isinstance(xywh, list) or len(xywh) != 4 or not all(isinstance(v, (int, float)) for v in xywh):
        raise BadRecord("bad bbox", f"bbox {xywh!r} is not [x, y, w, h]")
    x, y, w, h = (float(v) for v in xywh)
    bbox = check_box([x, y, x + w, y + h], width, height)
    area = float(ann.get("area") or w * h)
    return CocoInstance(names[ann["category_id"]], bbox, area, bool(ann.get("iscrowd", 0))), ann["image_id"]


_PHRASES = {
    # rule -> (phrases when the category has two objects, phrases when it has more)
    "left": (("the {c} on the left", "left {c}"), ("the leftmost {c}", "the {c} furthest to the left")),
    "right": (("the {c} on the right", "right {c}"), ("the rightmost {c}", "the {c} furthest to the right")),
    "top": (("the upper {c}", "the {c} at the top"), ("the topmost {c}", "the highest {c}")),
    "bottom": (("the lower {c}", "the {c} at the bottom"), ("the bottommost {c}", "the lowest {c}")),
    "largest": (("the bigger {c}", "the larger {c}"), ("the largest {c}", "the biggest {c}")),
    "smallest": (("the smaller {c}",), ("the smallest {c}",)),
}
_UNIQUE = ("the {c}", "{c}")


def templated_expressions(image: CocoImage, rng: random.Random) -> list[Referring]:
    """Expressions that each pick out exactly one object of `image`; phrasing drawn from `rng`."""
    min_area = MIN_AREA_FRACTION * image.width * image.height
    by_cat: dict[str, list[CocoInstance]] = {}
    crowded = {i.category for i in image.instances if i.iscrowd}
    for inst in image.instances:
        if not inst.iscrowd:
            by_cat.setdefault(inst.category, []).append(inst)
    out = []
    for cat, group in by_cat.items():
        if cat in crowded:
            continue  # a crowd region hides unannotated objects of the same kind: nothing is unique
        for inst in group:
            if _box_area(inst.bbox) < min_area:
                continue
            if len(group) == 1:
                out.append(Referring(rng.choice(_UNIQUE).format(c=cat), inst.bbox, cat, "unique"))
                continue
            others = [o for o in group if o is not inst]
            rules = _distinguishing_rules(inst, others, image.width, image.height)
            if rules:
                rule = rng.choice(rules)
                phrases = _PHRASES[rule][0 if len(group) == 2 else 1]
                out.append(Referring(rng.choice(phrases).format(c=cat), inst.bbox, cat, rule))
    return out


def _distinguishing_rules(inst: CocoInstance, others: list[CocoInstance], width: int, height: int) -> list[str]:
    cx, cy = _centre(inst.bbox)
    mx, my = POSITION_MARGIN * width, POSITION_MARGIN * height
    centres = [_centre(o.bbox) for o in others]
    area = _box_area(inst.bbox)
    areas = [_box_area(o.bbox) for o in others]
    tests = {
        "left": all(cx + mx < ox for ox, _ in centres),
        "right": all(cx - mx > ox for ox, _ in centres),
        "top": all(cy + my < oy for _, oy in centres),
        "bottom": all(cy - my > oy for _, oy in centres),
        "largest": all(area >= SIZE_RATIO * a for a in areas),
        "smallest": all(area * SIZE_RATIO <= a for a in areas),
    }
    return [rule for rule, ok in tests.items() if ok]


def templated_samples(images: list[CocoImage], seed: int = 0, split: str = "coco_templated") -> list[Sample]:
    """Templated expressions of many images as Samples (for calibration), deterministic for a seed."""
    rng = random.Random(seed)
    out = []
    for im in images:
        for k, ref in enumerate(templated_expressions(im, rng)):
            out.append(
                Sample(
                    image=im.image,
                    expression=ref.expression,
                    bbox=ref.bbox,
                    width=im.width,
                    height=im.height,
                    split=split,
                    sample_id=f"{im.image_id}:{k}",
                    extra={"category": ref.category, "rule": ref.rule},
                )
            )
    return out


def _centre(b: tuple[float, float, float, float]) -> tuple[float, float]:
    return (b[0] + b[2]) / 2, (b[1] + b[3]) / 2


def _box_area(b: tuple[float, float, float, float]) -> float:
    return (b[2] - b[0]) * (b[3] - b[1])
