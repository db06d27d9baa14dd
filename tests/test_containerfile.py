"""runtime/Containerfile builds: the files its COPY lines bring in are enough for `pip install .` to build the wheel.

The test replays the Containerfile's WORKDIR and COPY instructions into a temporary folder standing for the
image's file system, then builds the wheel where its `RUN pip install .` runs, as the image build would. No
container engine is needed; pip needs hatchling, from this environment or (build isolation) the package registry.
"""

from __future__ import annotations

import importlib.util
import json
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONTAINERFILE = REPO / "runtime" / "Containerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, with line continuations joined and comments dropped."""
    out, cur = [], ""
    for line in text.splitlines():
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        cur += line.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        word, _, rest = cur.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        cur = ""
    return out


def _copy_args(rest: str) -> tuple[list[str], str]:
    args = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
    args = [a for a in args if not a.startswith("--")]  # --chown=..., --chmod=...
    return args[:-1], args[-1]


def replay(containerfile: Path, repo: Path, root: Path) -> Path:
    """Copy what the COPY lines name from `repo` into `root` (the image's /); return where `pip install .` runs."""
    workdir, build_dir = "/", None
    for word, rest in instructions(containerfile.read_text()):
        if word == "WORKDIR":
            workdir = posixpath.normpath(posixpath.join(workdir, rest))
        elif word == "COPY":
            if "--from" in rest:
                pytest.fail(f"COPY --from is not replayed by this test: {rest}")
            srcs, dest = _copy_args(rest)
            into_dir = dest.endswith("/") or len(srcs) > 1
            for src in srcs:
                target = posixpath.normpath(posixpath.join(workdir, dest, posixpath.basename(src) if into_dir else ""))
                s, t = repo / src, root / target.lstrip("/")
                assert s.exists(), f"the Containerfile copies {src}, which is not in the repository"
                t.parent.mkdir(parents=True, exist_ok=True)
                if s.is_dir():
                    shutil.copytree(s, t, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy2(s, t)
        elif word == "RUN" and re.search(r"\bpip install\b[^&;|]*\s\.(\s|$)", rest):
            build_dir = workdir
    assert build_dir is not None, "the Containerfile has no `RUN pip install ... .`"
    return root / build_dir.lstrip("/")


def test_replay_follows_workdir_and_copy_forms(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg" / "sub").mkdir(parents=True)
    (repo / "pkg" / "sub" / "m.py").write_text("")
    (repo / "a.txt").write_text("a")
    (repo / "b.txt").write_text("b")
    cf = tmp_path / "Containerfile"
    cf.write_text("FROM x\n# a comment\nWORKDIR /src\nCOPY a.txt b.txt ./\nCOPY --chown=1:1 pkg/sub \\\n  ./lib/sub\n"
                  'COPY ["a.txt", "/etc/a.conf"]\nRUN pip install . && true\nWORKDIR /\n')
    root = tmp_path / "root"
    assert replay(cf, repo, root) == root / "src"
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == [
        "etc/a.conf", "src/a.txt", "src/b.txt", "src/lib/sub/m.py"]


def _build_wheel(src: Path, out: Path) -> Path:
    isolated = importlib.util.find_spec("hatchling") is None  # then pip fetches hatchling from the package registry
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(src)]
    if not isolated:
        cmd.insert(4, "--no-build-isolation")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    text = res.stdout + res.stderr
    if res.returncode and isolated and any(s in text for s in (
            "No matching distribution found for hatchling", "Could not find a version that satisfies the requirement hatchling",
            "NewConnectionError", "Network is unreachable", "Temporary failure in name resolution")):
        pytest.skip("hatchling is not installed here and pip could not fetch it for an isolated build")
    assert res.returncode == 0, f"pip could not build the wheel from what the Containerfile copies:\n{text[-3000:]}"
    wheels = list(out.glob("egm_edge-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.mark.slow  # a real wheel build: about 5 s here
def test_the_wheel_builds_from_what_the_containerfile_copies(tmp_path):
    src = replay(CONTAINERFILE, REPO, tmp_path / "image")
    wheel = _build_wheel(src, tmp_path / "wheels")
    names = set(zipfile.ZipFile(wheel).namelist())
    # The runtime reads its target profiles and calibration recipes from these folders inside the package.
    for folder, example in (("targets", "cpu.toml"), ("calibration", "synth.toml")):
        assert f"egm_edge/_data/{folder}/{example}" in names, sorted(n for n in names if "_data" in n)
    assert "egm_edge/runtime/__init__.py" in names and "egm_edge/cli.py" in names
