"""validate() with scripted predictors: gate, paired deltas, errors, resumption, bad input, outputs."""

from __future__ import annotations

import json

import pytest

from egm_edge.errors import InputError
from egm_edge.validate import validate
from egm_edge.validate.store import PredictionStore, sample_ids

from validate_helpers import Scripted, exact, shifted, write_dataset


def run(cand, ref, data, out, **kw):
    return validate(cand, ref, data, out_dir=out, progress=False, **kw)


def test_identical_sides_pass_with_zero_deltas(dataset, tmp_path):
    path, recs = dataset
    rep = run(Scripted(exact(recs)), Scripted(exact(recs), name="ref"), path, tmp_path / "out")
    assert rep.verdict == "pass" and rep.exit_code == 0 and rep.failures == []
    o = rep.data["groups"]["overall"]
    assert o["reference"]["acc"] == 100.0 and o["candidate"]["acc"] == 100.0
    assert o["delta"]["acc_delta"] == 0.0 and o["delta"]["acc_delta_ci95"] == [0.0, 0.0] and o["delta"]["same_box_rate"] == 1.0
    assert set(rep.data["groups"]) == {"a", "b", "overall"} and rep.data["groups"]["a"]["n"] == 6
    for name in ("report.json", "report.md", "predictions-candidate.jsonl", "predictions-reference.jsonl"):
        assert (tmp_path / "out" / name).is_file()
    assert json.loads((tmp_path / "out" / "report.json").read_text())["verdict"] == "pass"
    assert not (tmp_path / "out" / "worst-regressions").exists()


def test_a_worse_candidate_fails_naming_the_split_and_the_drop(dataset, tmp_path):
    path, recs = dataset
    cand = exact(recs)
    for r in recs:
        if r["split"] == "b":  # every b sample misses by a lot
            cand[r["sent"]] = shifted([r], 60)[r["sent"]]
    rep = run(Scripted(cand), Scripted(exact(recs), name="ref"), path, tmp_path / "out")
    assert rep.verdict == "fail" and rep.exit_code == 1
    text = " ".join(rep.failures)
    assert "split b: Acc@0.5 dropped 100.00 points" in text and "overall: Acc@0.5 dropped 50.00 points" in text
    assert "split a" not in text
    d = rep.data["groups"]["overall"]["delta"]
    assert len(d["hit_to_miss"]) == 6 and d["miss_to_hit"] == []
    lo, hi = d["acc_delta_ci95"]
    assert lo < -50.0 < hi < 0
    pngs = sorted((tmp_path / "out" / "worst-regressions").glob("*.png"))
    assert len(pngs) == 6 and len(rep.data["worst_regressions"]) == 6
    md = (tmp_path / "out" / "report.md").read_text()
    assert "# Validation: FAIL" in md and "| **overall** | 12 |" in md and "hit to miss (6)" in md


def test_thresholds_are_in_points(dataset, tmp_path):
    path, recs = dataset
    cand = exact(recs)
    cand[recs[0]["sent"]] = None  # one parse failure of 12: 8.33 points
    rep = run(Scripted(cand), Scripted(exact(recs), name="ref"), path, tmp_path / "o1", max_acc_drop=20, max_miou_drop=20, gate="point")
    assert rep.verdict == "pass"
    assert rep.data["groups"]["overall"]["candidate"]["parse_failure_rate"] == round(1 / 12, 4)
    rep = run(Scripted(cand), Scripted(exact(recs), name="ref"), path, tmp_path / "o2", max_acc_drop=10, max_miou_drop=20, gate="point")
    assert rep.verdict == "fail" and any("split a" in f for f in rep.failures)


def test_the_default_gate_holds_a_drop_within_noise_and_fails_a_real_one(dataset, tmp_path):
    path, recs = dataset
    one_flip = exact(recs)
    one_flip[recs[0]["sent"]] = None  # 1 of 6 in split a: 16.67 points, but its paired CI reaches zero
    rep = run(Scripted(one_flip), Scripted(exact(recs), name="ref"), path, tmp_path / "o1", max_acc_drop=10, max_miou_drop=10)
    assert rep.verdict == "pass" and rep.failures == [] and rep.data["thresholds"]["rule"] == "significant"
    assert any(h.startswith("split a: Acc@0.5 dropped 16.67 points") and "within sampling noise" in h for h in rep.data["held"])
    assert "within sampling noise (not failing)" in (tmp_path / "o1" / "report.md").read_text()
    all_b = exact(recs)
    for r in recs:
        if r["split"] == "b":
            all_b[r["sent"]] = None
    rep = run(Scripted(all_b), Scripted(exact(recs), name="ref"), path, tmp_path / "o2", max_acc_drop=10, max_miou_drop=10)
    assert rep.verdict == "fail" and any(f.startswith("split b: Acc@0.5 dropped 100.00 points") for f in rep.failures)
    with pytest.raises(InputError, match="gate rule"):
        run(Scripted(all_b), Scripted(exact(recs), name="ref"), path, tmp_path / "o3", gate="loose")


def test_errors_are_counted_not_scored_and_a_rerun_retries_only_them(dataset, tmp_path):
    path, recs = dataset
    bad = recs[3]["sent"]
    ref = Scripted(exact(recs), name="ref", fail_on={bad})
    rep = run(Scripted(exact(recs)), ref, path, tmp_path / "out")
    assert rep.verdict == "incomplete" and rep.exit_code == 2
    o = rep.data["groups"]["overall"]
    assert o["reference"]["errors"] == 1 and o["reference"]["scored"] == 11 and o["reference"]["acc"] == 100.0
    assert o["delta"]["pairs"] == 11
    assert any("1 reference samples failed" in n for n in rep.data["notes"])
    fixed = Scripted(exact(recs), name="ref")
    rep = run(Scripted(exact(recs)), fixed, path, tmp_path / "out")
    assert fixed.calls == 1 and rep.verdict == "pass"


def test_resumes_after_an_interruption(dataset, tmp_path):
    path, recs = dataset
    out = tmp_path / "out"
    ref = Scripted(exact(recs), name="ref")
    with pytest.raises(KeyboardInterrupt):
        run(Scripted(exact(recs), stop_after=5), ref, path, out)
    assert ref.calls == 12
    cand = Scripted(exact(recs))
    rep = run(cand, Scripted(exact(recs), name="ref"), path, out)
    assert cand.calls == 7 and rep.verdict == "pass"
    assert rep.data["runs"]["candidate"] == {**rep.data["runs"]["candidate"], "predicted_now": 7, "reused": 5}
    # Another configuration (a budget) is another key: everything runs again.
    again = Scripted(exact(recs))
    run(again, Scripted(exact(recs), name="ref"), path, out, think_budget=8)
    assert again.calls == 12


def test_a_torn_last_line_is_redone(dataset, tmp_path):
    path, recs = dataset
    out = tmp_path / "out"
    run(Scripted(exact(recs)), Scripted(exact(recs), name="ref"), path, out)
    f = out / "predictions-candidate.jsonl"
    lines = f.read_text().splitlines()
    f.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    cand = Scripted(exact(recs))
    rep = run(cand, Scripted(exact(recs), name="ref"), path, out)
    assert cand.calls == 1 and rep.verdict == "pass"


def test_limit_is_a_seeded_subset(dataset, tmp_path):
    path, recs = dataset
    a = run(Scripted(exact(recs)), Scripted(exact(recs), name="ref"), path, tmp_path / "a", limit=5)
    b = run(Scripted(exact(recs)), Scripted(exact(recs), name="ref"), path, tmp_path / "b", limit=5)
    assert a.data["data"]["n_samples"] == 5
    ids = lambda out: [json.loads(x)["id"] for x in (out / "predictions-reference.jsonl").read_text().splitlines()]  # noqa: E731
    assert ids(tmp_path / "a") == ids(tmp_path / "b")


def test_split_by_task_and_unknown_field(dataset, tmp_path):
    path, recs = dataset
    rep = run(Scripted(exact(recs)), Scripted(exact(recs), name="ref"), path, tmp_path / "o", split_by="task")
    assert set(rep.data["groups"]) == {"vanilla", "overall"}
    with pytest.raises(InputError, match="split by"):
        run(Scripted(exact(recs)), Scripted(exact(recs), name="ref"), path, tmp_path / "o", split_by="colour")


def test_different_tokenizers_are_refused(dataset, tmp_path):
    path, recs = dataset
    with pytest.raises(InputError, match="tokenizer.json"):
        run(Scripted(exact(recs), tokenizer="aaa"), Scripted(exact(recs), tokenizer="bbb"), path, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_missing_images_and_malformed_lines(tmp_path):
    path, recs = write_dataset(tmp_path / "d", n=6)
    (tmp_path / "d" / "img002.png").unlink()
    with pytest.raises(InputError, match="--lenient"):
        run(Scripted(exact(recs)), Scripted(exact(recs), name="ref"), path, tmp_path / "o")
    with open(path, "a") as f:
        f.write("{not json\n")
    rep = run(Scripted(exact(recs)), Scripted(exact(recs), name="ref"), path, tmp_path / "o", strict=False)
    assert rep.data["data"]["n_samples"] == 5
    assert sum(rep.data["data"]["skipped"].values()) == 2 and rep.data["data"]["skipped"].get("missing image") == 1
    assert "skipped while loading" in (tmp_path / "o" / "report.md").read_text()
    with pytest.raises(InputError, match="does not exist"):
        run(Scripted({}), Scripted({}), tmp_path / "nope.jsonl", tmp_path / "o")


def test_bad_arguments(dataset, tmp_path):
    path, recs = dataset
    for kw in ({"max_acc_drop": -1}, {"concurrency": 0}, {"think_budget": "lots"}, {"limit": 0}):
        with pytest.raises(InputError):
            run(Scripted(exact(recs)), Scripted(exact(recs), name="ref"), path, tmp_path / "o", **kw)


def test_sample_ids_are_stable_and_unique():
    from egm_edge.data import Sample

    s = Sample("a.png", "the dog", (1, 2, 3, 4), 10, 10)
    ids = sample_ids([s, s, Sample("a.png", "the cat", (1, 2, 3, 4), 10, 10, sample_id="q7")])
    assert ids[0] != ids[1] and ids[1] == ids[0] + "#2" and ids[2] == "q7"
    assert sample_ids([s]) == ids[:1]


def test_store_ignores_other_configs(tmp_path):
    a, b = PredictionStore(tmp_path, "candidate", "c1"), PredictionStore(tmp_path, "candidate", "c2")
    a.append({"id": "x", "error": None})
    b.append({"id": "y", "error": None})
    assert set(a.load()) == {"x"} and set(b.load()) == {"y"}


def test_an_edited_sample_is_predicted_again(dataset, tmp_path):
    path, recs = dataset
    run(Scripted(exact(recs)), Scripted(exact(recs), name="ref"), path, tmp_path / "out")
    recs[4]["sent"] = "the red box, edited"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))  # same file and line: the same id
    cand, ref = Scripted(exact(recs)), Scripted(exact(recs), name="ref")
    rep = run(cand, ref, path, tmp_path / "out")
    assert cand.calls == ref.calls == 1 and rep.verdict == "pass" and rep.data["groups"]["overall"]["delta"]["pairs"] == 12
