"""The torch-free runtime on a real CPU bundle: same tokens as the PyTorch reference, budgets, caching, errors."""

import json

import pytest

from egm_edge.errors import CheckpointError, InputError
from egm_edge.runtime.grounder import Grounder


@pytest.fixture(scope="module")
def grounder(tiny_bundle):
    return Grounder.open(tiny_bundle)


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    from egm_edge.reference import ReferenceRunner

    return ReferenceRunner.open(tiny_ckpt)


@pytest.mark.parametrize("budget,mode", [(0, "hard"), (6, "hard"), (30, "qwen"), (None, "hard")])
def test_runtime_equals_reference(grounder, reference, scene, budget, mode):
    kw = dict(think_budget=budget, budget_mode=mode, max_answer_tokens=12, max_new_tokens=48)
    got = grounder.ground(scene, "the red square", **kw)
    ref = reference.ground(scene, "the red square", **kw)
    assert got.text == ref.text
    assert (got.think_tokens, got.answer_tokens, got.budget_forced) == (ref.think_tokens, ref.answer_tokens, ref.budget_forced)
    assert got.box == ref.box
    if budget is not None:
        assert got.think_tokens <= budget


def test_result_fields_and_timings(grounder, scene):
    r = grounder.ground(scene, "the blue circle", think_budget=4)
    assert r.image_size == (300, 200) and r.think_tokens == 4 and r.budget_forced
    for k in ("preprocess", "vision", "prefill", "decode", "total", "ms_per_token"):
        assert r.timings[k] >= 0
    assert r.answer_tokens <= 16  # the bundle's answer cap
    json.dumps(r.to_dict())


def test_repeated_image_reuses_its_encoding(grounder, scene):
    a = grounder.ground(scene, "the red square", think_budget=2)
    b = grounder.ground(scene, "the blue circle", think_budget=2)
    c = grounder.ground(scene, "the red square", think_budget=2)
    assert b.timings["vision_cached"] and c.timings["vision_cached"]
    assert a.text == c.text


def test_stream_yields_the_same_text(grounder, scene):
    events = list(grounder.stream(scene, "the red square", think_budget=5))
    final = events[-1].result
    reasoning = "".join(e.text for e in events[:-1] if e.phase == "reasoning")
    content = "".join(e.text for e in events[:-1] if e.phase == "content")
    assert reasoning.strip() == final.reasoning and content.strip() == final.answer
    assert sum(1 for e in events if e.forced) >= 1  # the budget forced the close


def test_batch(grounder, scene):
    rs = grounder.ground_batch([(scene, "the red square"), {"image": scene, "expression": "the blue circle", "think_budget": 0}],
                               think_budget=3)
    assert [r.think_tokens for r in rs] == [3, 0]


def test_prompt_longer_than_the_planned_sequence(grounder, scene):
    from dataclasses import replace

    short = replace(grounder.bundle, generation=replace(grounder.bundle.generation, max_seq_len=80))
    g = Grounder(short, grounder.executor, grounder.tok)
    with pytest.raises(InputError, match="planned maximum sequence"):
        g.ground(scene, "the red square")
    # Room for the prompt but not for an answer: refused before any decoding.
    g = Grounder(replace(short, generation=replace(short.generation, max_seq_len=100)), grounder.executor, grounder.tok)
    with pytest.raises(InputError, match="fewer than"):
        g.ground(scene, "the red square")


@pytest.mark.parametrize("bad", ["", " "])
def test_empty_expression(grounder, scene, bad):
    with pytest.raises(InputError, match="empty"):
        grounder.ground(scene, bad)


def test_corrupt_image(grounder, tmp_path):
    p = tmp_path / "bad.jpg"
    p.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(InputError):
        grounder.ground(p, "x")


def test_bad_budget(grounder, scene):
    with pytest.raises(InputError, match="think budget"):
        grounder.ground(scene, "x", think_budget=-3)


def test_missing_and_incomplete_bundles(tmp_path, tiny_bundle):
    with pytest.raises(CheckpointError, match="does not exist"):
        Grounder.open(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "vision.onnx").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no manifest.json"):
        Grounder.open(tmp_path / "half")
    export_dir = json.loads((tiny_bundle / "manifest.json").read_text())["inputs"]["export"]
    with pytest.raises(CheckpointError, match="'export' artifact, not a bundle"):
        Grounder.open(export_dir)


def test_prompt_tokens_and_stops_come_from_the_bundle_and_its_family(grounder):
    from dataclasses import replace

    from egm_edge.models.families import QWEN3_VL

    assert grounder.family is QWEN3_VL
    assert grounder.image_token_id == grounder.tok.token_to_id(QWEN3_VL.tokens.image) == grounder.bundle.decoder.image_token_id
    gen = grounder.bundle.generation
    assert (gen.family, gen.think_close, gen.stop_tokens) == (QWEN3_VL.name, QWEN3_VL.tokens.think_close, QWEN3_VL.tokens.stop)
    one_stop = replace(grounder.bundle, generation=replace(gen, stop_tokens=gen.stop_tokens[:1]))
    g = Grounder(one_stop, grounder.executor, grounder.tok)
    assert g.ids.stop == (grounder.tok.token_to_id(gen.stop_tokens[0]),)


def test_a_family_the_runtime_does_not_drive_is_refused(grounder, tiny_bundle, tmp_path):
    from dataclasses import replace

    from egm_edge.errors import UnsupportedError
    from egm_edge.models.families import QWEN3_VL, STAGES, register, unregister

    def with_family(name):
        return replace(grounder.bundle, generation=replace(grounder.bundle.generation, family=name))

    register(replace(QWEN3_VL, name="toy_norun", title="Toy-NoRun", architectures=("ToyNoRun",),
                     stages=frozenset(STAGES) - {"runtime"}))
    try:
        with pytest.raises(UnsupportedError, match="Toy-NoRun family, which egm-edge's runtime stage does not run yet") as e:
            Grounder(with_family("toy_norun"), grounder.executor, grounder.tok)
        assert "\n" not in str(e.value)
        # Grounder.open refuses before hashing files or loading graphs (the edited config would fail the hash check).
        copy = tmp_path / "norun_bundle"
        copy.mkdir()
        for f in tiny_bundle.iterdir():
            if f.name != "generation_config.json":
                (copy / f.name).symlink_to(f)
        gen = json.loads((tiny_bundle / "generation_config.json").read_text())
        (copy / "generation_config.json").write_text(json.dumps({**gen, "family": "toy_norun"}))
        with pytest.raises(UnsupportedError, match=r"The bundle at .*norun_bundle is a model of the Toy-NoRun family"):
            Grounder.open(copy)
    finally:
        unregister("toy_norun")
    with pytest.raises(CheckpointError, match="model family 'llava', which this egm-edge does not know"):
        Grounder(with_family("llava"), grounder.executor, grounder.tok)
    # A record that claims the runtime with a preprocessor it has no path for: still refused, in one sentence.
    register(replace(QWEN3_VL, name="toy_tiles", title="Toy", architectures=("ToyTiles",), preprocessor="letterbox"))
    try:
        with pytest.raises(UnsupportedError, match="runtime drives only"):
            Grounder(with_family("toy_tiles"), grounder.executor, grounder.tok)
    finally:
        unregister("toy_tiles")


def test_the_image_placeholder_is_never_sampled():
    """A decode step has no image features to place, so the model's image token is banned from sampling
    (a random InternVL bundle emitted one and its decoder graph failed in GatherND)."""
    import numpy as np

    from egm_edge.runtime.sampling import Sampler, SamplingSpec

    logits = np.array([0.0, 5.0, 1.0, 2.0], np.float32)
    assert Sampler(SamplingSpec())(logits) == 1
    assert Sampler(SamplingSpec(), banned=(1,))(logits) == 3
    hot = Sampler(SamplingSpec(temperature=5.0, seed=0), banned=(1, 3))
    assert {hot(logits) for _ in range(200)} == {0, 2}
