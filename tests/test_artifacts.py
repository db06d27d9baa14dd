import pytest

from egm_edge.artifacts import file_hashes, read_manifest, staged_output, write_manifest
from egm_edge.errors import EgmError


def test_staged_output_renames_only_when_complete(tmp_path):
    out = tmp_path / "art"
    with staged_output(out) as tmp:
        (tmp / "a.bin").write_bytes(b"x")
        write_manifest(tmp, "test", inputs={})
    assert read_manifest(out)["stage"] == "test" and (out / "a.bin").read_bytes() == b"x"
    assert file_hashes(out, ["a.bin"])["a.bin"].startswith("2d711642")


def test_interrupted_stage_leaves_nothing(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(KeyboardInterrupt):
        with staged_output(out) as tmp:
            (tmp / "half").write_text("half")
            raise KeyboardInterrupt
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_artifact_needs_force(tmp_path):
    out = tmp_path / "art"
    with staged_output(out) as tmp:
        write_manifest(tmp, "test")
    with pytest.raises(EgmError, match="--force"):
        with staged_output(out):
            pass
    with staged_output(out, force=True) as tmp:
        write_manifest(tmp, "second")
    assert read_manifest(out)["stage"] == "second"


def test_missing_manifest_is_not_an_artifact(tmp_path):
    with pytest.raises(RuntimeError, match="manifest"):
        with staged_output(tmp_path / "x"):
            pass
    assert not (tmp_path / "x").exists()
