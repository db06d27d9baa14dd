"""Shared fixtures: where ../shared/data is (tests skip with a reason when it is absent)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda():
        return
    skip = pytest.mark.skip(reason="needs CUDA; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Tests keep egm-edge's cache (calibration sets, bundle hashes, the demo) out of the user's ~/.cache."""
    import os

    old = os.environ.get("EGM_EDGE_CACHE")
    os.environ["EGM_EDGE_CACHE"] = str(tmp_path_factory.mktemp("egm-edge-cache"))
    yield
    if old is None:
        os.environ.pop("EGM_EDGE_CACHE", None)
    else:
        os.environ["EGM_EDGE_CACHE"] = old


@pytest.fixture()
def limit_family():
    """limit_family(name, *stages): the named family's record, listing only `stages`, registered for this test."""
    import dataclasses

    from egm_edge.models.families import get_family, register

    saved = []

    def limit(name: str, *stages: str):
        saved.append(get_family(name))
        register(dataclasses.replace(saved[-1], stages=frozenset(stages)), replace=True)

    yield limit
    for record in reversed(saved):
        register(record, replace=True)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (a user's clone has no ../shared)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(shared_data) -> Path:
    d = shared_data / "qwen3-vl-tokenizer"
    if not (d / "tokenizer.json").is_file():
        pytest.skip(f"{d} has no tokenizer.json")
    return d


@pytest.fixture(scope="session")
def coco128_dir(shared_data) -> Path:
    d = shared_data / "coco128"
    if not d.is_dir():
        pytest.skip(f"{d} is absent")
    return d


# A tiny random Qwen3-VL checkpoint (real Qwen tokenizer), exported and built into a CPU bundle once per session.

@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, qwen_tokenizer_dir):
    pytest.importorskip("torch")
    from egm_edge.reference.checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("rt") / "ckpt", qwen_tokenizer_dir, seed=1, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_ckpt):
    pytest.importorskip("onnx")
    from egm_edge.builder import build_cpu
    from egm_edge.export.pipeline import export

    root = tmp_path_factory.mktemp("rtb")
    ex = export(tiny_ckpt, root / "export", decode_steps=2)
    return build_cpu(ex, root / "bundle", max_answer_tokens=16, max_seq_len=1024)


@pytest.fixture(scope="session")
def tiny_export_trt(tmp_path_factory, tiny_ckpt):
    """The tiny checkpoint exported with the TensorRT lowering (plain ONNX ops only)."""
    pytest.importorskip("onnx")
    from egm_edge.export.pipeline import export

    return export(tiny_ckpt, tmp_path_factory.mktemp("rtb-trt") / "export", lowering="tensorrt", decode_steps=2)


@pytest.fixture(scope="session")
def scene(tmp_path_factory):
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    img = Image.new("RGB", (300, 200), (240, 240, 240))
    d = ImageDraw.Draw(img)
    d.rectangle((30, 40, 110, 120), fill=(200, 30, 30))
    d.ellipse((170, 60, 260, 150), fill=(30, 60, 200))
    img.save(path)
    return path


@pytest.fixture(scope="session")
def grounds_like_reference():
    """check(bundle, checkpoint): the bundle's greedy tokens, box and token counts equal the PyTorch reference's on
    two synthetic scenes (a quantized checkpoint through the dequantizing loader)."""

    def check(bundle, checkpoint, n: int = 2):
        from egm_edge.reference import ReferenceRunner
        from egm_edge.runtime.grounder import Grounder
        from egm_edge.synth import draw, render

        runtime, reference = Grounder.open(bundle), ReferenceRunner.open(checkpoint)
        for i in range(n):
            s = draw(11, i)
            kw = dict(think_budget=6, max_answer_tokens=8, max_new_tokens=24)
            got, ref = runtime.ground(render(s.scene), s.expr.sent, **kw), reference.ground(render(s.scene), s.expr.sent, **kw)
            # Same tokens; a word-level test tokenizer has no decoder, so the two sides space special tokens differently.
            assert "".join(got.text.split()) == "".join(ref.text.split()) and got.box == ref.box
            assert (got.think_tokens, got.answer_tokens) == (ref.think_tokens, ref.answer_tokens)

    return check
