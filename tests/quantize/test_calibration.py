"""Calibration recipes (TOML), sources, rendering as at inference, and the materialised, hashed set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from egm_edge.errors import InputError
from egm_edge.quantize.calibration import SOURCES, CalibrationRecipe, _allocate, select_samples

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "calibration").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_parse(path):
    r = CalibrationRecipe.from_toml(path)
    assert r.name == path.stem and r.sources and r.samples > 0
    assert all(s.kind in SOURCES for s in r.sources)
    assert CalibrationRecipe.from_dict(r.to_dict() | {"sources": r.to_dict()["sources"]}, base_dir=r.base_dir).digest() == r.digest()


@pytest.mark.parametrize("bad, match", [
    ({"sources": [{"kind": "imagenet"}]}, "Unknown calibration source kind"),
    ({"sources": [{"kind": "synth", "colour": 1}]}, "unknown options"),
    ({"sources": [{"kind": "synth", "weight": 0}]}, "positive number"),
    ({"sources": []}, "no \\[\\[sources\\]\\]"),
    ({"samples": 0, "sources": [{"kind": "synth"}]}, "samples=0"),
    ({"task": "chat", "sources": [{"kind": "synth"}]}, "task='chat'"),
    ({"max_pixels": "huge", "sources": [{"kind": "synth"}]}, "max_pixels"),
    ({"max_new_tokens": 8, "sources": [{"kind": "synth"}]}, "at least 64"),
    ({"sauces": 1, "sources": [{"kind": "synth"}]}, "unknown keys"),
    ({"sources": [{"kind": "synth", "n": "abc"}]}, "n='abc'; give a whole number of at least 1"),
    ({"sources": [{"kind": "synth", "n": 0}]}, "n=0; give a whole number of at least 1"),
    ({"sources": [{"kind": "synth", "seed": "x"}]}, "seed='x'; give a whole number"),
    ({"sources": [{"kind": "synth", "seed": 1.5}]}, "seed=1.5; give a whole number"),
    ({"sources": [{"kind": "egm_jsonl", "path": 3}]}, "path=3; give it as text"),
    ({"seed": "x", "sources": [{"kind": "synth"}]}, "seed='x'"),
])
def test_bad_recipes_are_refused(bad, match):
    with pytest.raises(InputError, match=match):
        CalibrationRecipe.from_dict(bad, name="bad")


def test_bad_source_option_in_a_toml_is_one_sentence(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text('[[sources]]\nkind = "synth"\nn = "abc"\nseed = "x"\n')
    with pytest.raises(InputError, match="n='abc'") as e:
        CalibrationRecipe.from_toml(recipe)
    assert "\n" not in str(e.value)


def test_shipped_recipes_by_name(tmp_path, monkeypatch):
    from egm_edge.quantize.calibration import shipped_recipes

    assert {"synth", "coco128"} <= set(shipped_recipes())
    monkeypatch.chdir(tmp_path)  # a bare name works from any folder, not only a checkout's root
    assert CalibrationRecipe.from_toml("synth").digest() == CalibrationRecipe.from_toml(REPO / "calibration" / "synth.toml").digest()
    with pytest.raises(InputError, match="shipped recipe by name \\(coco128"):
        CalibrationRecipe.from_toml("imagenet")


def test_missing_toml_and_missing_source_path(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        CalibrationRecipe.from_toml(tmp_path / "nope.toml")
    r = CalibrationRecipe.from_dict({"sources": [{"kind": "egm_jsonl", "path": "absent.jsonl"}]}, base_dir=tmp_path, name="x")
    with pytest.raises(InputError, match="absent.jsonl does not exist"):
        select_samples(r, tmp_path)


def test_allocation_by_weight():
    assert _allocate(10, [2, 1, 1]) == [5, 3, 2] or _allocate(10, [2, 1, 1]) == [5, 2, 3]
    assert sum(_allocate(7, [1, 1, 1])) == 7


def test_synth_selection_is_deterministic_and_holdout_disjoint(tmp_path):
    r = CalibrationRecipe.from_dict({"samples": 5, "holdout": 3, "seed": 3, "sources": [{"kind": "synth", "n": 12, "seed": 9}]}, name="s")
    a = select_samples(r, tmp_path / "a")
    b = select_samples(r, tmp_path / "b")
    key = lambda s: (s.expression, s.bbox)  # noqa: E731
    assert [key(s) for s in a[0]] == [key(s) for s in b[0]] and [key(s) for s in a[1]] == [key(s) for s in b[1]]
    assert len(a[0]) == 5 and len(a[1]) == 3
    assert not {str(s.image) for s in a[0]} & {str(s.image) for s in a[1]}
    assert a[2][0]["available"] == 12


def test_coco128_source(coco128_dir):
    r = CalibrationRecipe.from_toml(REPO / "calibration" / "coco128.toml")
    r = CalibrationRecipe.from_dict(r.to_dict() | {"samples": 6, "holdout": 2}, base_dir=r.base_dir, name="coco")
    calib, hold, summary = select_samples(r, "/nonexistent-cache")
    assert len(calib) == 6 and len(hold) == 2 and summary[0]["available"] > 100
    assert all(s.image.is_file() for s in calib + hold)


def test_render_equals_the_reference_runner_and_set_round_trips(tmp_path, tiny_ckpt, make_calib):
    from egm_edge.artifacts import sha256_file
    from egm_edge.quantize import calibset
    from egm_edge.quantize.calibration import sample_task
    from egm_edge.reference import ReferenceRunner

    runner = ReferenceRunner.open(tiny_ckpt)
    recipe = make_calib()
    calib, hold, _ = select_samples(recipe, tmp_path / "src")
    items = []
    for s in calib + hold:
        r = calibset.render(s, sample_task(recipe, s), runner.tokenizer, runner.image_config, runner.image_token_id,
                            runner.family)
        p = runner.build_prompt(s.image, s.expression, sample_task(recipe, s))
        assert r.input_ids.tolist() == p.ids and np.array_equal(r.pixel_values, p.image.pixel_values)
        items.append(r)
    reasoned = calibset.with_reasoning(runner, items[0], 64)
    assert reasoned.n_prompt == items[0].n_prompt and reasoned.n_generated > 0
    f1, f2 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    calibset.save(f1, [reasoned, *items[1:2]], items[2:], {"k": 1})
    calibset.save(f2, [reasoned, *items[1:2]], items[2:], {"k": 1})
    assert sha256_file(f1) == sha256_file(f2)  # the hash names the content, not the run
    back, held, meta = calibset.load(f1)
    assert meta == {"k": 1} and len(back) == 2 and len(held) == len(items) - 2
    assert np.array_equal(back[0].input_ids, reasoned.input_ids) and back[0].n_prompt == reasoned.n_prompt
    assert np.array_equal(back[1].pixel_values, items[1].pixel_values)
