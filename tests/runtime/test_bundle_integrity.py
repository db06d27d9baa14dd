"""A bundle's files against the sha256 its manifest records, and one sentence for every broken file at open."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from egm_edge.cli import main
from egm_edge.errors import CheckpointError
from egm_edge.runtime import integrity
from egm_edge.runtime.grounder import Grounder


@pytest.fixture(autouse=True)
def _own_hash_cache(tmp_path, monkeypatch):
    """Each test starts with an empty hash cache of its own (never the user's)."""
    monkeypatch.setenv("EGM_EDGE_CACHE", str(tmp_path / "cache"))


def _copy(src, dst, real=()):
    """The bundle at `dst`: the files in `real` copied (to be damaged), the others hard links (cheap, never written)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name in real or f.name == "manifest.json":
            shutil.copy2(f, dst / f.name)
        else:
            os.link(f, dst / f.name)
    return dst


def _flip_byte_keeping_size_and_mtime(path, offset=1000):
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def _counting(monkeypatch):
    calls = []
    real = integrity.sha256_file

    def counted(path, *a, **k):
        calls.append(os.path.basename(path))
        return real(path, *a, **k)

    monkeypatch.setattr(integrity, "sha256_file", counted)
    return calls


def _one_sentence(rc, err, command="ground"):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"egm-edge {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_unchanged_bundle_opens_and_the_cache_spares_the_second_hash(tiny_bundle, tmp_path, monkeypatch):
    b = _copy(tiny_bundle, tmp_path / "b")
    recorded = json.loads((b / "manifest.json").read_text())["outputs"]["sha256"]
    calls = _counting(monkeypatch)
    Grounder.open(b)
    assert sorted(calls) == sorted(recorded)  # the first open hashes every recorded file
    calls.clear()
    Grounder.open(b)
    assert calls == []  # unchanged size/mtime: trusted from the cache
    integrity.check_files(b, json.loads((b / "manifest.json").read_text()), full=True)
    assert sorted(calls) == sorted(recorded)  # verify= re-reads everything


def test_swapped_decoder_is_refused(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path / "b", real=("decoder.onnx",))
    export_dir = json.loads((b / "manifest.json").read_text())["inputs"]["export"]
    shutil.copyfile(os.path.join(export_dir, "decoder.onnx"), b / "decoder.onnx")  # a valid graph, not the one built
    with pytest.raises(CheckpointError, match=r"decoder\.onnx .*rebuild the bundle"):
        Grounder.open(b)


def test_flipped_byte_with_size_and_mtime_kept_is_refused(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path / "b", real=("decoder.onnx",))
    _flip_byte_keeping_size_and_mtime(b / "decoder.onnx")
    with pytest.raises(CheckpointError, match=r"decoder\.onnx .*rebuild the bundle"):
        Grounder.open(b)


def test_a_change_after_a_cached_open_is_caught(tiny_bundle, tmp_path, monkeypatch):
    b = _copy(tiny_bundle, tmp_path / "b", real=("vision.onnx", "decoder.onnx", "tokenizer.json"))
    manifest = json.loads((b / "manifest.json").read_text())
    integrity.check_files(b, manifest)  # fills the cache
    calls = _counting(monkeypatch)
    # Same content, new mtime: hashed again, and accepted.
    os.utime(b / "tokenizer.json")
    integrity.check_files(b, manifest)
    assert calls == ["tokenizer.json"]
    # Different size: refused without hashing.
    with open(b / "vision.onnx", "ab") as f:
        f.write(b"\0")
    calls.clear()
    with pytest.raises(CheckpointError, match=r"vision\.onnx .*bytes.*rebuild the bundle"):
        integrity.check_files(b, manifest)
    assert "vision.onnx" not in calls
    # Same size and mtime, other bytes (the inode's change time still moves): hashed again, refused.
    _flip_byte_keeping_size_and_mtime(b / "decoder.onnx")
    manifest["sizes_bytes"].pop("vision.onnx")
    manifest["outputs"]["sha256"].pop("vision.onnx")
    with pytest.raises(CheckpointError, match=r"decoder\.onnx .*rebuild the bundle"):
        integrity.check_files(b, manifest)


def test_verification_works_when_the_cache_cannot_be_written(tiny_bundle, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("EGM_EDGE_CACHE", str(blocker))  # the cache folder cannot be created
    b = _copy(tiny_bundle, tmp_path / "b", real=("decoder.onnx",))
    manifest = json.loads((b / "manifest.json").read_text())
    integrity.check_files(b, manifest)
    _flip_byte_keeping_size_and_mtime(b / "decoder.onnx")
    with pytest.raises(CheckpointError, match=r"decoder\.onnx"):
        integrity.check_files(b, manifest)


def test_read_only_bundle_opens(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path / "b")
    mode = b.stat().st_mode
    b.chmod(0o555)
    try:
        Grounder.open(b)
        assert not any(p.name.startswith(".") for p in b.iterdir())  # nothing was written beside the files
    finally:
        b.chmod(mode)


def test_a_manifest_without_hashes_is_not_checked(tiny_bundle, tmp_path, monkeypatch):
    b = _copy(tiny_bundle, tmp_path / "b")
    m = json.loads((b / "manifest.json").read_text())
    m.pop("outputs")
    calls = _counting(monkeypatch)
    integrity.check_files(b, m)
    assert calls == []


def _without_hashes(b):
    m = json.loads((b / "manifest.json").read_text())
    m.pop("outputs")
    (b / "manifest.json").write_text(json.dumps(m))
    return m


@pytest.mark.parametrize("name, data", [("vision.onnx", b""), ("decoder.onnx", b"garbage" * 10), ("tokenizer.json", b"{}")])
@pytest.mark.parametrize("hashes", [True, False], ids=["recorded", "unrecorded"])
def test_broken_files_are_one_sentence(tiny_bundle, tmp_path, name, data, hashes):
    b = _copy(tiny_bundle, tmp_path / "b", real=(name,))
    if not hashes:
        _without_hashes(b)  # an older bundle, or one whose manifest was rewritten: the loaders must still say why
    (b / name).write_bytes(data)
    with pytest.raises(CheckpointError, match=rf"{name.replace('.', '[.]')}.*rebuild the bundle") as e:
        Grounder.open(b)
    assert "\n" not in str(e.value)


def test_manifest_head_dim_that_the_graph_does_not_have(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path / "b")
    m = json.loads((b / "manifest.json").read_text())
    m["runtime"]["decoder"]["head_dim"] += 8
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"head_dim .*rebuild the bundle"):
        Grounder.open(b)


def test_cli_refuses_a_damaged_bundle_and_verify_rehashes(tiny_bundle, tmp_path, scene, capsys, monkeypatch):
    b = _copy(tiny_bundle, tmp_path / "b", real=("decoder.onnx",))
    args = ["ground", "--bundle", str(b), "--image", str(scene), "--expr", "the red square", "--think-budget", "0",
            "--max-answer-tokens", "8"]
    calls = _counting(monkeypatch)
    assert main(args) == 0, capsys.readouterr().err
    calls.clear()
    assert main(args) == 0
    assert calls == []
    assert main([*args, "--verify"]) == 0
    assert "decoder.onnx" in calls
    _flip_byte_keeping_size_and_mtime(b / "decoder.onnx")
    capsys.readouterr()
    line = _one_sentence(main([*args, "--verify"]), capsys.readouterr().err)
    assert "decoder.onnx" in line and "rebuild the bundle" in line
