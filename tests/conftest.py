"""Shared fixtures: where ../shared/data is (tests skip with a reason when it is absent)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

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
