"""Fixtures shared by the build tests."""

from __future__ import annotations

import json

import pytest


@pytest.fixture()
def config_dir(tmp_path):
    """A checkpoint directory holding only EGM-8B's config.json: enough for every refusal, no weights to load."""
    from egm_edge.models import get_spec
    from egm_edge.models.hf_config import to_hf_config

    d = tmp_path / "egm-8b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(to_hf_config(get_spec("egm-8b"))))
    return d
