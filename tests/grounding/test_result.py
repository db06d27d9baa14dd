"""GroundingResult: built from a model's text as EGM parses it, and says when the model swapped the corners."""

from __future__ import annotations

import json

import pytest

from egm_edge.grounding import GroundingResult
from egm_edge.grounding.metrics import iou

ANSWER = '</think>\n\n```json\n[{{"bbox_2d": [{}, {}, {}, {}], "label": "x"}}]\n```'


def _result(*box):
    return GroundingResult.from_output(ANSWER.format(*box), 200, 100, think_tokens=0, answer_tokens=9, budget_forced=True)


@pytest.mark.parametrize("box, swapped", [((100, 100, 500, 600), False), ((500, 100, 100, 600), True),
                                          ((100, 600, 500, 100), True), ((900, 900, 100, 100), True)])
def test_swapped_corners_are_flagged_and_kept(box, swapped):
    r = _result(*box)
    assert r.corners_swapped is swapped
    assert json.loads(json.dumps(r.to_dict()))["corners_swapped"] is swapped
    # The box stays as the model gave it: EGM scores it as given (an inverted box has no area, IoU 0).
    assert r.box_norm1000 == tuple(float(v) for v in box)
    if swapped:
        assert iou(r.box, (0.0, 0.0, 200.0, 100.0)) == 0.0


def test_no_box_is_not_swapped():
    r = GroundingResult.from_output("</think>\n\nnothing", 200, 100, think_tokens=0, answer_tokens=1, budget_forced=False)
    assert r.box is None and not r.corners_swapped


def test_cli_output_notes_swapped_corners():
    from egm_edge.commands.ground import format_result

    out = format_result(_result(500, 100, 100, 600))
    assert out.startswith("box: [100, 10, 20, 60] px")
    assert "note: the model gave the corners swapped" in out
    assert "corners swapped" not in format_result(_result(100, 100, 500, 600))
