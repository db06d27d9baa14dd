"""scripts/gpu_check.py where there is no GPU: one sentence and exit status 2, at once; and its GPU-to-target map."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path, path_dirs):
    env = {**os.environ, "PATH": os.pathsep.join(map(str, path_dirs))}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env,
                       timeout=60)
    return p, time.perf_counter() - t0


def test_no_nvidia_smi_is_one_sentence_and_status_2(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    p, seconds = _run(tmp_path, [empty])
    assert p.returncode == 2 and p.stdout == "" and seconds < 20
    assert p.stderr.strip().splitlines() == ["No NVIDIA GPU here: nvidia-smi is not on PATH; run scripts/gpu_check.py on a "
                                             "machine with an NVIDIA GPU, its driver and TensorRT."]
    assert not (tmp_path / "o").exists()  # nothing written where nothing could run


def test_a_driver_that_lists_no_gpu_is_one_sentence_and_status_2(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"  # what nvidia-smi prints on a machine whose GPU is gone
    smi.write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    smi.chmod(0o755)
    p, _ = _run(tmp_path, [bin_dir])
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip() == ("No NVIDIA GPU here: nvidia-smi lists none (No devices were found); run this on a machine "
                                "with an NVIDIA GPU.")


@pytest.mark.parametrize("cc, gib, target", [("9.0", 79.6, "h100"), ("9.0", 140.4, "h200"), ("8.7", 7.4, "jetson-orin-nano-8gb"),
                                             ("8.7", 15.3, "jetson-orin-nx-16gb"), ("8.7", 61.4, "jetson-agx-orin-64gb"),
                                             ("8.9", 23.6, "rtx4090"), ("8.9", 44.4, "l40s"), ("8.0", 79.2, "a100"),
                                             ("10.0", 179.0, "b200"), ("11.0", 122.0, "jetson-thor")])
def test_the_gpu_maps_to_the_target_profile_by_compute_capability_then_memory(cc, gib, target):
    gc = _load()
    assert gc.pick_target({"name": "gpu", "compute_capability": cc, "memory_gib": gib}, None) == target


def test_an_unknown_gpu_or_target_is_refused_in_one_sentence():
    from egm_edge.errors import EgmError

    gc = _load()
    with pytest.raises(gc.Stop, match=r"No target profile in build/targets has compute capability 7\.5 \(T4\); pass --target"):
        gc.pick_target({"name": "T4", "compute_capability": "7.5", "memory_gib": 15.0}, None)
    assert gc.pick_target({"name": "T4", "compute_capability": "7.5", "memory_gib": 15.0}, "h100") == "h100"
    with pytest.raises(EgmError, match="Unknown target"):
        gc.pick_target({"name": "x", "compute_capability": "9.0", "memory_gib": 80}, "toaster")


def test_runtime_readme_documents_the_check():
    text = (SCRIPT.parents[1] / "runtime" / "README.md").read_text()
    assert "python scripts/gpu_check.py" in text and "exits with status 2" in text
