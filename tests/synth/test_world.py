"""The synthetic world: deterministic bytes per seed, one referent per expression, boxes in bounds."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from egm_edge.errors import EgmError, InputError
from egm_edge.synth import TYPES, draw, generate, read_jsonl, render, resolve
from egm_edge.synth.expressions import is_clear, make_sample
from egm_edge.synth.world import COLOURS, KINDS, MAX_SHAPES, MAX_SIDE, MIN_SHAPES, MIN_SIDE, OCCLUDER_RGB


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes(tmp_path):
    a = generate(tmp_path / "a", 6, seed=11, amodal_fraction=0.5)
    b = generate(tmp_path / "b", 6, seed=11, amodal_fraction=0.5)
    c = generate(tmp_path / "c", 6, seed=12, amodal_fraction=0.5)
    assert _digest(a.parent) == _digest(b.parent)
    assert _digest(a.parent) != _digest(c.parent)


def test_jsonl_records_are_egm_eval_format(tmp_path):
    path = generate(tmp_path, 8, seed=3)
    records = read_jsonl(path)
    assert len(records) == 8
    assert {r["split"] for r in records} == set(TYPES)
    for r in records:
        assert set(r) >= {"image", "sent", "bbox", "height", "width", "split", "task"}
        from PIL import Image

        with Image.open(r["image"]) as im:
            assert im.size == (r["width"], r["height"])
        x1, y1, x2, y2 = r["bbox"]
        assert 0 <= x1 < x2 <= r["width"] and 0 <= y1 < y2 <= r["height"]


def test_refuses_existing_output_and_bad_arguments(tmp_path):
    generate(tmp_path, 1, seed=0)
    with pytest.raises(EgmError, match="already holds an artifact; pass --force"):
        generate(tmp_path, 1, seed=0)
    assert generate(tmp_path, 2, seed=0, force=True).read_text().count("\n") == 2  # its own set, replaced on force
    with pytest.raises(InputError, match="at least 1"):
        generate(tmp_path / "x", 0, seed=0)
    with pytest.raises(InputError, match="amodal fraction"):
        generate(tmp_path / "y", 1, seed=0, amodal_fraction=1.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_expression_picks_exactly_its_target(seed):
    for i in range(60):
        s = draw(seed, i)
        scene, e = s.scene, s.expr
        assert resolve(scene, e) == [e.target], (seed, i, e.sent)
        assert is_clear(scene, e)
        assert MIN_SIDE <= scene.width <= MAX_SIDE and MIN_SIDE <= scene.height <= MAX_SIDE
        assert MIN_SHAPES <= len(scene.shapes) <= MAX_SHAPES
        for sh in scene.shapes:
            assert sh.kind in KINDS and sh.colour in COLOURS
            x1, y1, x2, y2 = sh.box
            assert 0 <= x1 < x2 <= scene.width and 0 <= y1 < y2 <= scene.height
        boxes = [sh.box for sh in scene.shapes]
        for a in range(len(boxes)):
            for b in range(a + 1, len(boxes)):
                A, B = boxes[a], boxes[b]
                assert A[2] <= B[0] or B[2] <= A[0] or A[3] <= B[1] or B[3] <= A[1], "shapes overlap"


def test_expressions_need_the_relation():
    """Relational, superlative and ordinal targets share their noun with another shape."""
    for i in range(40):
        s = draw(5, i)
        if s.expr.type != "unique":
            same = [j for j, sh in enumerate(s.scene.shapes) if s.expr.group.matches(sh)]
            assert len(same) >= 2, s.expr.sent


def test_amodal_box_is_the_full_shape_and_the_occluder_hides_part_of_it():
    rng = np.random.default_rng(7)
    for _ in range(10):
        scene, e = make_sample(rng, "unique", amodal=True)
        assert scene.occluder is not None
        target = scene.shapes[e.target]
        ox1, oy1, ox2, oy2 = scene.occluder
        x1, y1, x2, y2 = target.box
        assert max(x1, ox1) < min(x2, ox2) and max(y1, oy1) < min(y2, oy2), "occluder misses the target"
        for j, sh in enumerate(scene.shapes):
            if j != e.target:
                a = sh.box
                assert a[2] <= ox1 or ox2 <= a[0] or a[3] <= oy1 or oy2 <= a[1], "occluder covers another shape"
        arr = np.asarray(render(scene))
        grey = (arr == np.array(OCCLUDER_RGB, dtype=np.uint8)).all(-1)
        assert grey[y1:y2, x1:x2].any()
        unoccluded = scene.__class__(scene.width, scene.height, scene.background, scene.texture_seed, scene.shapes)
        # The box is the shape's full extent, the same with or without the occluder.
        assert target.box == unoccluded.shapes[e.target].box


def test_draw_is_independent_of_order():
    a = [draw(9, i) for i in range(5)]
    b = [draw(9, i) for i in reversed(range(5))][::-1]
    assert a == b
