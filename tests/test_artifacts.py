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


# Data safety: an output never overlaps an input; --force replaces only artifacts or empty folders;
# stale hidden partials of dead runs are cleared (issue 17).


def _artifact(d, stage="test"):
    d.mkdir(parents=True, exist_ok=True)
    write_manifest(d, stage)
    return d


@pytest.mark.parametrize("where", ["equal", "inside", "contains", "symlink"])
def test_output_overlapping_an_input_is_refused_even_with_force(tmp_path, where):
    from egm_edge.artifacts import check_output_dir

    inp = _artifact(tmp_path / "model")
    (inp / "weights.bin").write_bytes(b"w")
    out = {"equal": inp, "inside": inp / "sub", "contains": tmp_path, "symlink": tmp_path / "link"}[where]
    if where == "symlink":
        out.symlink_to(inp, target_is_directory=True)
    with pytest.raises(EgmError, match="input") as e:
        with staged_output(out, force=True, inputs=[inp]) as tmp:
            write_manifest(tmp, "clobber")
    assert str(e.value).count(". ") == 0 and str(inp) in str(e.value)
    assert (inp / "weights.bin").read_bytes() == b"w" and read_manifest(inp)["stage"] == "test"
    with pytest.raises(EgmError, match="input"):
        check_output_dir(out, True, inputs=[inp])


def test_force_never_replaces_a_folder_of_user_files(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(EgmError, match="not an egm-edge artifact"):
        with staged_output(out, force=True) as tmp:
            write_manifest(tmp, "clobber")
    assert (out / "notes.txt").read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_force_replaces_an_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with staged_output(tmp_path / "empty", force=True) as tmp:
        write_manifest(tmp, "new")
    assert read_manifest(tmp_path / "empty")["stage"] == "new"


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_partials_of_dead_runs_are_removed_live_ones_kept(tmp_path):
    import subprocess
    import sys

    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        names = [f".art.partial-{dead}", f".art.old-{dead}", f".art.partial-{live.pid}", f".other.partial-{dead}"]
        for n in names:
            (tmp_path / n).mkdir()
            (tmp_path / n / "half.bin").write_bytes(b"x")
        with staged_output(tmp_path / "art") as tmp:
            write_manifest(tmp, "test")
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted(["art", f".art.partial-{live.pid}", f".other.partial-{dead}"])
    finally:
        live.kill()
        live.wait()


def test_in_place_output_resumes_its_own_and_refuses_the_rest(tmp_path):
    from egm_edge.artifacts import prepare_output_dir

    own = lambda d: (d / "records.jsonl").is_file()  # noqa: E731
    out = tmp_path / "sweep"
    prepare_output_dir(out, own=own)  # new: created
    (out / "records.jsonl").write_text("{}\n")
    prepare_output_dir(out, own=own)  # its own: resumed, nothing removed
    assert (out / "records.jsonl").read_text() == "{}\n"

    user = tmp_path / "user"
    user.mkdir()
    (user / "report.md").write_text("mine")
    with pytest.raises(EgmError, match="--force"):
        prepare_output_dir(user, own=own)
    with pytest.raises(EgmError, match="not an egm-edge artifact"):
        prepare_output_dir(user, force=True, own=own)
    assert (user / "report.md").read_text() == "mine"

    art = _artifact(tmp_path / "bundle", "build")
    with pytest.raises(EgmError, match="--force"):
        prepare_output_dir(art, own=own)
    prepare_output_dir(art, force=True, own=own)  # another artifact, replaced on --force
    assert art.is_dir() and list(art.iterdir()) == []
