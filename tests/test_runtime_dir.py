"""runtime/ (what goes onto a device): the unit, the container recipe and the constraints parse and name real CLI flags."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from egm_edge.cli import main

RUNTIME = Path(__file__).resolve().parents[1] / "runtime"
HEAVY = ("torch", "transformers", "nvidia-modelopt", "tensorrt")


@pytest.fixture(scope="module")
def serve_flags():
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        main(["serve", "--help"])
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", buf.getvalue()))


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"not a unit line: {raw!r}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _serve_argv(argv: list[str], serve_flags: set[str]) -> None:
    flags = [a for a in argv if a.startswith("--")]
    assert flags and set(flags) <= serve_flags, set(flags) - serve_flags
    assert "--bundle" in flags


def test_systemd_unit_is_hardened_and_runs_serve(serve_flags):
    unit = _unit(RUNTIME / "egm-edge.service")
    assert {"Unit", "Service", "Install"} <= set(unit)
    svc = {k: v[-1] for k, v in unit["Service"].items()}
    assert svc.get("DynamicUser") == "yes" or svc.get("User") not in (None, "root")
    assert svc["ProtectSystem"] in ("strict", "full") and svc["NoNewPrivileges"] == "yes" and svc["Restart"] in ("on-failure", "always")
    assert "PrivateDevices" not in svc  # it would hide the GPU
    argv = shlex.split(svc["ExecStart"])
    assert argv[0].endswith("/egm-edge") and argv[1] == "serve"
    _serve_argv(argv[2:], serve_flags)


def test_containerfile_serves_on_cpu_as_non_root_with_a_health_check(serve_flags):
    text = (RUNTIME / "Containerfile").read_text()
    lines = [ln.strip() for ln in re.sub(r"\\\n\s*", " ", text).splitlines() if ln.strip() and not ln.strip().startswith("#")]
    instr = {}
    for ln in lines:
        word, _, rest = ln.partition(" ")
        instr.setdefault(word.upper(), []).append(rest)
    assert re.fullmatch(r"\S*python:3\.\d+-slim", instr["FROM"][0])
    assert instr["USER"][-1] not in ("root", "0")
    assert "/health" in instr["HEALTHCHECK"][0]
    import json

    entry, cmd = json.loads(instr["ENTRYPOINT"][-1]), json.loads(instr["CMD"][-1])
    assert entry == ["egm-edge", "serve"]
    _serve_argv(cmd, serve_flags)
    assert not any(h in " ".join(instr["RUN"]) for h in HEAVY)


def test_jetson_constraints_parse_and_keep_heavy_packages_out():
    packaging = pytest.importorskip("packaging.requirements")
    reqs = [packaging.Requirement(ln.split("#")[0].strip()) for ln in (RUNTIME / "constraints-jetson.txt").read_text().splitlines()
            if ln.split("#")[0].strip()]
    names = {r.name.lower() for r in reqs}
    assert {"numpy", "pillow", "tokenizers", "onnxruntime", "cuda-python"} <= names
    assert not names & set(HEAVY)


def test_readme_names_the_jetson_steps():
    text = (RUNTIME / "README.md").read_text()
    for needle in ("python3-libnvinfer", "--system-site-packages", "constraints-jetson.txt", "egm-edge build --finalize",
                   "egm-edge.service", "Containerfile"):
        assert needle in text, needle
