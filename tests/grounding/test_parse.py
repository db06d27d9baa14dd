import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egm_edge.grounding import find_numbers, parse_box, to_norm1000, to_pixels

EGM_OUTPUT = (
    "The image shows two people; the one in the red shirt stands on the left, near the bench.\n"
    "</think>\n\n"
    '```json\n[\n\t{"bbox_2d": [112, 245, 398, 917], "label": "man in red shirt"}\n]\n```'
)


def test_real_egm_style_output():
    r = parse_box(EGM_OUTPUT, 640, 480)
    assert r.method == "bbox_2d" and r.closed
    assert r.raw == (112, 245, 398, 917)
    assert r.box == (round(112 * 0.64), round(245 * 0.48), round(398 * 0.64), round(917 * 0.48))


def test_numbers_in_the_reasoning_are_ignored_once_thinking_is_closed():
    text = "Candidates at [1, 2, 3, 4] and [5, 6, 7, 8].\n</think>\n\n[100, 200, 300, 400]"
    assert parse_box(text, 1000, 1000).raw == (100, 200, 300, 400)


def test_order_bbox2d_before_bare_list():
    text = '[1, 2, 3, 4] {"bbox_2d": [10, 20, 30, 40]}'
    r = parse_box(text, 1000, 1000)
    assert r.method == "bbox_2d" and r.raw == (10, 20, 30, 40)


def test_first_bare_list_then_last_four_numbers():
    assert parse_box("box [5, 6, 7, 8] or [9, 9, 9, 9]", 1000, 1000).raw == (5, 6, 7, 8)
    r = parse_box("x=1 y=2 then 30 40 50 60", 1000, 1000)
    assert r.method == "last_four_numbers" and r.raw == (30, 40, 50, 60)


def test_floats_signs_and_exponents():
    r = parse_box('"bbox_2d": [ -5.5 , 1e2, +300.25, 4.0E2 ]', 1000, 1000)
    assert r.raw == (-5.5, 100.0, 300.25, 400.0)
    assert r.box == (0.0, 100.0, 300.0, 400.0)


@pytest.mark.parametrize("inner", ["[[150, 250, 550, 750]]", "[150, 250, 550, 750]", " [ [150,250,550,750] ] "])
def test_internvl_box(inner):
    text = f"Another box [1, 2, 3, 4] first. The sentence refers to the cat.<box>{inner}</box>"
    r = parse_box(text, 200, 100, family="internvl")
    assert r.method == "box_tag" and r.box == (30.0, 25.0, 110.0, 75.0)
    # The Qwen family has no box tag; it takes the first bare list.
    assert parse_box(text, 200, 100).method == "bare_list" and parse_box(text, 200, 100).raw == (1, 2, 3, 4)


def test_box_tag_and_think_tags_come_from_the_record():
    from dataclasses import replace

    from egm_edge.models.families import INTERNVL, register, unregister

    toy = replace(INTERNVL, name="toy_tagger", architectures=("ToyTagger",), model_types=("toy_tagger",),
                  box_tag=("<loc>", "</loc>"), tokens=replace(INTERNVL.tokens, think_open="<r>", think_close="</r>"))
    register(toy)
    try:
        r = parse_box("[1, 2, 3, 4] <box>[5, 6, 7, 8]</box></r>x <loc>[10, 20, 30, 40]</loc>", 1000, 1000, family="toy_tagger")
        assert r.closed and r.method == "box_tag" and r.raw == (10, 20, 30, 40)
        assert "after </r> is empty" in parse_box("thinking</r>", 100, 100, family="toy_tagger").reason
    finally:
        unregister("toy_tagger")


def test_unknown_family_is_refused():
    from egm_edge.errors import InputError

    with pytest.raises(InputError, match="Unknown model family 'llava'"):
        parse_box("[1, 2, 3, 4]", 10, 10, family="llava")


@pytest.mark.parametrize(
    "text,reason",
    [("", "empty"), ("I cannot see it.", "no box"), ("1 2 3", "no box"), ("thinking\n</think>\n\n", "empty")],
)
def test_no_box_says_why(text, reason):
    r = parse_box(text, 100, 100)
    assert r.box is None and not r.ok and reason in r.reason


def test_unclosed_thinking_is_parsed_whole():
    r = parse_box("I think it is [10, 10, 500, 500] but", 100, 100)
    assert r.ok and not r.closed


def test_scaling_matches_egm_scale_bbox():
    # clip to [0, 1000], round(v*W/1000), clip to the image, widen degenerate boxes.
    assert to_pixels((-20, 0, 2000, 1000), 640, 480) == (0.0, 0.0, 639.0, 479.0)
    assert to_pixels((500, 500, 500, 500), 640, 480) == (320.0, 240.0, 321.0, 241.0)
    assert to_pixels((float("nan"), 0, float("inf"), 10), 100, 100) == (0.0, 0.0, 1.0, 1.0)
    assert to_pixels((999, 999, 1000, 1000), 1, 1) == (0.0, 0.0, 0.0, 0.0)


def test_pixel_frame():
    r = parse_box("[10, 20, 900, 40]", 640, 480, frame="pixels")
    assert r.box == (10.0, 20.0, 640.0, 40.0)


def test_to_norm1000_inverts_to_pixels_within_a_pixel():
    box = (64.0, 96.0, 192.0, 192.0)
    back = to_pixels(to_norm1000(box, 640, 480), 640, 480)
    assert all(abs(a - b) <= 1 for a, b in zip(box, back))


def test_bad_family_and_size():
    with pytest.raises(Exception, match="Choose from"):
        parse_box("[1,2,3,4]", 10, 10, family="llava")
    with pytest.raises(ValueError):
        parse_box("[1,2,3,4]", 0, 10)


@settings(max_examples=400, deadline=None)
@given(st.text(), st.integers(1, 5000), st.integers(1, 5000))
def test_parser_never_raises_on_arbitrary_text(text, w, h):
    r = parse_box(text, w, h)
    if r.box is not None:
        x1, y1, x2, y2 = r.box
        assert 0 <= x1 <= w and 0 <= x2 <= w and 0 <= y1 <= h and 0 <= y2 <= h
        assert all(math.isfinite(v) for v in r.box)
    else:
        assert r.reason


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True)), min_size=4, max_size=4),
       st.text(alphabet="abc \n[]{}:,\"</think>", max_size=40))
def test_parser_never_raises_on_numeric_junk(nums, junk):
    text = junk + '"bbox_2d": [' + ", ".join(str(n) for n in nums) + "]" + junk
    r = parse_box(text, 320, 240)
    assert r.box is None or all(math.isfinite(v) for v in r.box)
    find_numbers(text)
