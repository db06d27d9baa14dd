"""`egm-edge ground`: what the user typed is refused in one sentence before any model loads (no weights needed)."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from egm_edge.cli import main


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "img.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(p)
    return p


@pytest.fixture(autouse=True)
def _no_model(monkeypatch):
    """Any check that these tests reach must come before the model loads: loading fails the test."""
    from egm_edge.reference.runner import ReferenceRunner
    from egm_edge.runtime.grounder import Grounder

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(Grounder, "open", classmethod(refuse))
    monkeypatch.setattr(ReferenceRunner, "open", classmethod(refuse), raising=False)


def _one_sentence(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("egm-edge ground: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("with_bundle", [True, False], ids=["bundle", "model"])
def test_non_utf8_expression(capsys, image, tmp_path, with_bundle):
    source = ["--bundle", str(tmp_path)] if with_bundle else []
    # What Python puts in sys.argv for the bytes b"caf\xe9" under a UTF-8 locale (surrogateescape).
    line = _one_sentence(capsys, ["ground", *source, "--image", str(image), "--expr", "the caf\udce9 sign"])
    assert "UTF-8" in line and "0xe9" in line


@pytest.mark.parametrize("case", ["missing_folder", "a_folder", "unknown_extension"])
def test_draw_path_is_checked_before_inference(capsys, image, tmp_path, case):
    draw = {"missing_folder": tmp_path / "nope" / "out.png", "a_folder": tmp_path,
            "unknown_extension": tmp_path / "out.notanimage"}[case]
    line = _one_sentence(capsys, ["ground", "--bundle", str(tmp_path), "--image", str(image), "--expr", "red", "--draw", str(draw)])
    assert "--draw" in line


@pytest.mark.parametrize("n", ["0", "-5"])
def test_max_new_tokens_below_one(capsys, image, tmp_path, n):
    line = _one_sentence(capsys, ["ground", "--bundle", str(tmp_path), "--image", str(image), "--expr", "red", "--max-new-tokens", n])
    assert re.search(rf"max.new.tokens must be .*at least 1, got {n}\b", line), line


def test_verify_needs_a_bundle(capsys, image):
    line = _one_sentence(capsys, ["ground", "--image", str(image), "--expr", "red", "--verify"])
    assert "--bundle" in line
