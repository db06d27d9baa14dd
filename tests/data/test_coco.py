"""COCO instances as a calibration source: loading, and templated expressions that pick out one object."""

from __future__ import annotations

import json
import random

import pytest

from egm_edge.data import CocoImage, CocoInstance, load_coco_instances, load_samples, templated_expressions, templated_samples
from egm_edge.data.coco import MIN_AREA_FRACTION, _distinguishing_rules
from egm_edge.errors import InputError


def _img(*insts, w=1000, h=800):
    return CocoImage(image=None, width=w, height=h, image_id="1", instances=tuple(CocoInstance(*i) for i in insts))


def _box(x, y, s=100):
    return (float(x), float(y), float(x + s), float(y + s))


def test_unique_category_is_named():
    refs = templated_expressions(_img(("dog", _box(10, 10), 1.0, False)), random.Random(0))
    assert len(refs) == 1 and refs[0].expression in ("the dog", "dog") and refs[0].rule == "unique"


def test_two_of_a_kind_left_and_right():
    refs = templated_expressions(_img(("car", _box(10, 300), 1, False), ("car", _box(700, 300), 1, False)), random.Random(0))
    assert {r.rule for r in refs} == {"left", "right"}
    left = next(r for r in refs if r.rule == "left")
    assert left.bbox == _box(10, 300) and "left" in left.expression


def test_three_of_a_kind_rules_and_phrases():
    big, mid, small = _box(10, 10, 300), _box(450, 400), _box(800, 10)
    insts = [("person", big, 1, False), ("person", mid, 1, False), ("person", small, 1, False)]
    image = _img(*insts)
    objs = {i.bbox: i for i in image.instances}
    # centres: big (160, 160), mid (500, 450), small (850, 60); margins 100 px in x, 80 px in y
    assert _distinguishing_rules(objs[big], [objs[mid], objs[small]], 1000, 800) == ["left", "largest"]
    assert _distinguishing_rules(objs[mid], [objs[big], objs[small]], 1000, 800) == ["bottom"]
    assert _distinguishing_rules(objs[small], [objs[big], objs[mid]], 1000, 800) == ["right", "top"]
    refs = templated_expressions(image, random.Random(1))
    assert len(refs) == 3
    for r in refs:  # three of a kind: superlatives, never "the person on the left"
        assert any(w in r.expression for w in ("most", "furthest", "highest", "lowest", "largest", "biggest"))


def test_ambiguous_objects_get_no_expression():
    # side by side within the margin, same size: nothing tells them apart
    insts = [("cup", _box(400, 400), 1, False), ("cup", _box(450, 400), 1, False)]
    assert templated_expressions(_img(*insts), random.Random(0)) == []


def test_crowd_and_tiny_objects_are_left_out():
    crowd = [("person", _box(10, 10), 1, False), ("person", _box(500, 500), 1, True)]
    assert templated_expressions(_img(*crowd), random.Random(0)) == []
    side = (MIN_AREA_FRACTION * 1000 * 800) ** 0.5 * 0.9
    assert templated_expressions(_img(("kite", _box(5, 5, side), 1, False)), random.Random(0)) == []


def test_deterministic_for_a_seed():
    insts = [("car", _box(10, 300), 1, False), ("car", _box(700, 300), 1, False), ("dog", _box(300, 10), 1, False)]
    a = [r.expression for r in templated_expressions(_img(*insts), random.Random(5))]
    b = [r.expression for r in templated_expressions(_img(*insts), random.Random(5))]
    assert a == b


def _coco_file(tmp_path, annotations):
    p = tmp_path / "annotations" / "instances_val.json"
    p.parent.mkdir()
    p.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 50}],
        "annotations": annotations,
        "categories": [{"id": 3, "name": "car"}],
    }))
    return p


def test_load_small_file_and_bad_annotation(tmp_path):
    good = {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 5, 20, 10], "area": 150, "iscrowd": 0}
    bad = {"id": 2, "image_id": 1, "category_id": 3, "bbox": [90, 5, 20, 10], "area": 150, "iscrowd": 0}
    p = _coco_file(tmp_path, [good, bad])
    with pytest.raises(InputError, match="annotation 2: bbox .* outside the 100x50 image"):
        load_coco_instances(p)
    (im,) = load_coco_instances(p, strict=False)
    assert im.instances == (CocoInstance("car", (10.0, 5.0, 30.0, 15.0), 150.0, False),) and im.dropped == 1
    assert im.image == tmp_path / "images" / "val" / "a.jpg"  # the coco128 layout unless another exists
    (tmp_path / "val").mkdir()
    assert load_coco_instances(p, strict=False)[0].image == tmp_path / "val" / "a.jpg"  # the official layout
    with pytest.raises(InputError, match="COCO instances file"):
        load_samples(p)


def test_coco128(coco128_dir):
    ann = coco128_dir / "annotations" / "instances_train2017.json"
    images = load_coco_instances(ann)
    assert len(images) == 128 and sum(len(i.instances) for i in images) == 929
    assert all(i.image.is_file() for i in images)
    samples = templated_samples(images, seed=0)
    assert samples == templated_samples(images, seed=0)
    assert len(samples) > 200 and len({s.image for s in samples}) > 90
    for s in samples:
        x1, y1, x2, y2 = s.bbox
        assert -1 <= x1 < x2 <= s.width + 1 and -1 <= y1 < y2 <= s.height + 1 and s.expression  # 1 px tolerance
