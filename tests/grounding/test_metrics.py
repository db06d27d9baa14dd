import pytest

from egm_edge.errors import InputError
from egm_edge.grounding import REFCOCO_SPLITS, hit, iou, refcoco_average, score, score_by_split


def test_iou_basics():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou(None, (0, 0, 1, 1)) == 0.0
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0  # empty union
    assert iou((10, 10, 0, 0), (0, 0, 10, 10)) == 0.0  # inverted box has no area


def test_acc_is_strictly_greater_than_half():
    assert not hit(0.5)
    assert hit(0.5000001)


def test_no_box_counts_as_zero_and_stays_in_the_average():
    s = score([1.0, 0.0, 0.6, 0.5], parsed=[True, False, True, True])
    assert s.n == 4 and s.acc == 0.5 and s.miou == pytest.approx(0.525) and s.parse_failures == 1


def test_score_by_split_pools_all():
    recs = [("a", 1.0, True), ("a", 0.0, False), ("b", 0.7, True)]
    out = score_by_split(recs)
    assert out["a"].acc == 0.5 and out["b"].acc == 1.0
    assert out["all"].n == 3 and out["all"].acc == pytest.approx(2 / 3)


def test_refcoco_average_is_unweighted_over_eight_splits():
    per = {s: score([1.0] * (i + 1) + [0.0], split=s) for i, s in enumerate(REFCOCO_SPLITS)}
    expected = sum((i + 1) / (i + 2) for i in range(8)) / 8
    assert refcoco_average(per) == pytest.approx(expected)
    del per["refcocog_test"]
    with pytest.raises(InputError, match="refcocog_test"):
        refcoco_average(per)
