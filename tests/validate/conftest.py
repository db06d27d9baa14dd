"""Fixtures for validate tests (helpers live in validate_helpers.py)."""

import pytest
from validate_helpers import write_dataset


@pytest.fixture
def dataset(tmp_path):
    return write_dataset(tmp_path / "data")
