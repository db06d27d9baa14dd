"""The gate's sample-size rules and the EGM split average, through validate() with scripted predictors and directly."""

from __future__ import annotations

import json

import pytest

from egm_edge.errors import InputError
from egm_edge.grounding import REFCOCO_SPLITS
from egm_edge.validate import stats, validate

from validate_helpers import Scripted, exact, write_dataset


def run(cand, ref, data, out, **kw):
    return validate(cand, ref, data, out_dir=out, progress=False, worst_k=0, **kw)


def _with_one_sample_split(root):
    """12 samples in splits a/b plus one sample alone in split c."""
    path, recs = write_dataset(root, n=13)
    recs[12]["split"] = "c"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path, recs


def test_a_one_sample_split_is_too_small_to_gate_not_a_failure(tmp_path):
    path, recs = _with_one_sample_split(tmp_path / "d")
    cand = exact(recs)
    cand[recs[12]["sent"]] = None  # split c: 100 -> 0, a zero-width bootstrap interval at -100
    rep = run(Scripted(cand), Scripted(exact(recs), name="ref"), path, tmp_path / "o")
    assert rep.verdict == "pass" and rep.failures == [] and rep.exit_code == 0
    small = rep.data["too_small"]
    assert any(t.startswith(f"split c: too small to gate (n=1 < {stats.MIN_GATE_N})") and "Acc@0.5 dropped 100.00" in t
               for t in small)
    assert not any(t.startswith(("split a", "split b", "overall")) for t in small)
    # The overall (13 samples, one flip: 7.69 points) is gated and within noise; its message says why.
    assert any(h.startswith("overall: Acc@0.5 dropped 7.69 points") and "1 hit->miss, 0 miss->hit" in h
               for h in rep.data["held"])
    assert rep.data["thresholds"]["min_split_n"] == stats.MIN_GATE_N
    md = (tmp_path / "o" / "report.md").read_text()
    assert "## Too small to gate" in md and f"too small to gate (n=1 < {stats.MIN_GATE_N})" in md
    assert "too small to gate" in rep.summary()
    # Asking for every split to gate restores the old behaviour, knowingly.
    rep = run(Scripted(cand), Scripted(exact(recs), name="ref"), path, tmp_path / "o1", min_split_n=1)
    assert rep.verdict == "fail" and any(f.startswith("split c: Acc@0.5 dropped 100.00 points") for f in rep.failures)
    assert rep.data["too_small"] == []


def test_the_minimum_applies_to_the_point_rule_and_the_overall(tmp_path):
    path, recs = write_dataset(tmp_path / "d", n=4, splits=("a",))
    cand = {r["sent"]: None for r in recs}  # every sample lost: 100 points, zero-width interval
    rep = run(Scripted(cand), Scripted(exact(recs), name="ref"), path, tmp_path / "o", gate="point")
    assert rep.verdict == "pass" and rep.failures == []
    assert {t.split(":")[0] for t in rep.data["too_small"]} == {"split a", "overall"}
    assert any("nothing was gated" in n for n in rep.data["notes"]) and rep.data["split_mean"] is None
    rep = run(Scripted(cand), Scripted(exact(recs), name="ref"), path, tmp_path / "o2", gate="point", min_split_n=4)
    assert rep.verdict == "fail" and rep.data["too_small"] == []


def _egm_dataset(root, per_split: int = 8):
    """EGM's 8 RefCOCO splits, `per_split` samples each."""
    return write_dataset(root, n=8 * per_split, splits=REFCOCO_SPLITS)


def test_a_large_overall_drop_over_many_samples_fails_though_no_split_does(tmp_path):
    path, recs = _egm_dataset(tmp_path / "d")
    cand, lost = exact(recs), set()
    for r in recs:  # the first sample of each split misses: 12.5 points everywhere
        if r["split"] not in lost:
            lost.add(r["split"])
            cand[r["sent"]] = None
    rep = run(Scripted(cand), Scripted(exact(recs), name="ref"), path, tmp_path / "o")
    assert rep.verdict == "fail" and rep.exit_code == 1
    assert [f.split(":")[0] for f in rep.failures] == ["overall", "overall"]  # Acc@0.5 and mean IoU, pooled over 64
    assert rep.failures[0].startswith("overall: Acc@0.5 dropped 12.50 points (100.00 -> 87.50")
    assert rep.data["too_small"] == []
    held = {h.split(":")[0] for h in rep.data["held"]}
    assert held == {f"split {s}" for s in REFCOCO_SPLITS}  # 1 flip of 8 is within noise per split


def test_the_report_shows_the_egm_average_beside_the_pooled_overall(tmp_path):
    path, recs = _egm_dataset(tmp_path / "d", per_split=2)
    extra = write_dataset(tmp_path / "x", n=6, splits=("refcoco_val",))[1]  # refcoco_val gets 8 samples, the rest 2
    for i, r in enumerate(extra):
        r["image"] = str(tmp_path / "x" / r["image"])
        r["sent"] = f"an extra box {i}"
    recs = recs + extra
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    cand = exact(recs)
    for r in extra:  # refcoco_val: 2 of 8 hits; every other split: all hits
        cand[r["sent"]] = None
    rep = run(Scripted(cand), Scripted(exact(recs), name="ref"), path, tmp_path / "o", max_acc_drop=100, max_miou_drop=100)
    pooled = rep.data["groups"]["overall"]
    sm = rep.data["split_mean"]
    assert pooled["candidate"]["acc"] == round(100 * 16 / 22, 3)  # 72.727: the big split weighs more
    assert sm["egm_refcoco"] is True and sm["splits"] == list(REFCOCO_SPLITS) and sm["label"] == "EGM average (8 RefCOCO splits)"
    assert sm["candidate"]["acc"] == round((25.0 + 7 * 100.0) / 8, 3) == 90.625  # each split counts once, as EGM
    assert sm["reference"]["acc"] == 100.0 and sm["delta"]["acc_delta"] == -9.375
    saved = json.loads((tmp_path / "o" / "report.json").read_text())
    assert saved["split_mean"] == sm
    md = (tmp_path / "o" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| **EGM average (8 RefCOCO splits)**"))
    assert "| 100.00 | 90.62 | -9.38 |" in row or "| 100.00 | 90.63 | -9.38 |" in row
    assert "| **overall** |" in md and "pooled" in md
    assert "EGM average (8 RefCOCO splits)" in rep.summary()


def test_other_splits_get_a_plain_split_mean(dataset, tmp_path):
    path, recs = dataset
    rep = run(Scripted(exact(recs)), Scripted(exact(recs), name="ref"), path, tmp_path / "o")
    sm = rep.data["split_mean"]
    assert sm["egm_refcoco"] is False and sm["splits"] == ["a", "b"] and sm["label"] == "mean of 2 splits"
    assert sm["candidate"]["acc"] == 100.0
    assert abs(sm["candidate"]["miou"] - rep.data["groups"]["overall"]["candidate"]["miou"]) < 0.002  # equal splits: the same mean


def test_min_split_n_is_checked_and_reaches_the_cli(dataset, tmp_path, monkeypatch, capsys):
    from egm_edge.cli import main

    path, recs = dataset
    for bad in (0, -3, 2.5, True, "6"):
        with pytest.raises(InputError, match="min_split_n"):
            run(Scripted(exact(recs)), Scripted(exact(recs), name="ref"), path, tmp_path / "o", min_split_n=bad)
    argv = ["validate", "--candidate", "c", "--reference", "r", "--data", str(path), "--out", str(tmp_path / "o")]
    assert main(argv + ["--min-split-n", "0"]) == 2
    assert "min_split_n must be a whole number of at least 1, got 0" in capsys.readouterr().err
    seen = {}

    class _Report:
        exit_code = 0

        def summary(self):
            return "ok"

    def fake(*a, **kw):
        seen.update(kw)
        return _Report()

    import egm_edge.validate as pkg

    monkeypatch.setattr(pkg, "validate", fake)
    assert main(argv + ["--min-split-n", "20"]) == 0 and seen["min_split_n"] == 20
    assert main(argv) == 0 and seen["min_split_n"] == stats.MIN_GATE_N


def _group(ref_hits, cand_hits, seed=0):
    rows = lambda hits: {str(i): {"iou": 0.9 if h else 0.0, "hit": h, "parsed": True, "error": None}  # noqa: E731
                         for i, h in enumerate(hits)}
    ref, cand = rows(ref_hits), rows(cand_hits)
    ids = list(ref)
    return {"n": len(ids), "reference": stats.side_metrics(list(ref.values())),
            "candidate": stats.side_metrics(list(cand.values())), "delta": stats.paired(cand, ref, ids, seed)}


def test_gate_directly_on_small_and_large_groups():
    tiny = _group([True], [False])
    assert tiny["delta"]["acc_delta_ci95"] == [-100.0, -100.0]  # why a split needs a minimum n: no spread, no interval
    g = stats.gate({"x": tiny}, 1.0, 1.0)
    assert g.failures == [] and g.held == [] and g.too_small[0].startswith(f"split x: too small to gate (n=1 < {stats.MIN_GATE_N})")
    six = _group([True] * 6, [False] * 6)  # at the minimum, every sample flipping is significant (sign test p = 0.031)
    assert len(stats.gate({"x": six}, 1.0, 1.0).failures) == 2
    with pytest.raises(ValueError, match="min_n"):
        stats.gate({"x": six}, 1.0, 1.0, min_n=0)
    # Nothing to pair (every sample errored): neither gated nor called too small.
    assert stats.gate({"x": {**tiny, "delta": {**tiny["delta"], "pairs": 0}}}, 1.0, 1.0) == ([], [], [])


def test_split_mean_directly():
    groups = {"a": _group([True] * 4, [True] * 4), "b": _group([True, True], [False, True]), "overall": None}
    sm = stats.split_mean(groups)
    assert sm["splits"] == ["a", "b"] and sm["candidate"]["acc"] == 75.0 and sm["delta"]["acc_delta"] == -25.0
    assert stats.split_mean({"a": groups["a"], "overall": None}) is None  # one split: nothing beside the pooled figure
