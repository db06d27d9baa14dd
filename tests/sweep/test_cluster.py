"""A sweep and a validation on a real local Ray cluster (a head and one more node, loopback only) give the
in-process records and report; `build --finalize --cluster` runs on the node of the bundle's target.

The cluster: a head with 1 CPU and a second node (its own raylet) with 1 CPU that also offers
`target:jetson-orin-nano-8gb`, as a Jetson joining with `ray start --resources` would. The embedded
tiny grounder is swept in-process once; the cluster sweeps reuse its bundle (copied into their --out,
found by its key), and the validation compares that bundle with the grounder's checkpoint, so the
whole file stays within about two minutes here. No node has TensorRT: the default --target-engine
tensorrt meets the nano node's real refusal, and the sweeps that measure there pass --target-engine cpu.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install 'egm-edge[cluster]')"),
]

NANO, NX = "jetson-orin-nano-8gb", "jetson-orin-nx-16gb"
KW = dict(recipes=("full",), budgets=(0, 32), max_answer_tokens=64, progress=False)
MB = 1 << 20


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The in-process sweep: the reference every cluster run must equal."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from egm_edge.assets import default_model_dir
    from egm_edge.sweep import sweep
    from egm_edge.synth import generate

    root = tmp_path_factory.mktemp("cluster-sweep")
    data = generate(root / "data", 6, seed=7)
    res = sweep(default_model_dir(), targets=("cpu", NX), data=data, out_dir=root / "local", **KW)
    return data, root / "local", res


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, connect=True,
                head_node_args=dict(num_cpus=1, object_store_memory=100 * MB, include_dashboard=False))
    try:
        c.add_node(num_cpus=1, object_store_memory=100 * MB, resources={f"target:{NANO}": 1})
        c.wait_for_nodes()
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def _out_with_bundle(local_out: Path, out: Path) -> Path:
    """A sweep folder holding the in-process run's bundle (reused by its key: no second export)."""
    shutil.copytree(local_out / "bundles" / "full", out / "bundles" / "full")
    (out / "records.jsonl").touch()
    return out


def _cluster_sweep(local, out, **kw):
    from egm_edge.assets import default_model_dir
    from egm_edge.sweep import sweep

    data, local_out, _ = local
    return sweep(default_model_dir(), data=data, out_dir=_out_with_bundle(local_out, out), cluster="auto",
                 **{**KW, "shard_size": 2, **kw})


def _by_key(records):
    return {r["key"]: r for r in records}


def _rows(out: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (out / "runs" / f"predictions-{name}.jsonl").read_text().splitlines()]


def _what_was_answered(row: dict) -> tuple:
    res = row["result"]
    return (row["id"], row["iou"], row["hit"], row["think_tokens"], res["text"], res.get("box"), res.get("answer_tokens"))


@pytest.fixture(scope="module")
def swept(local, cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray") / "out"
    t0 = time.perf_counter()
    res = _cluster_sweep(local, out, targets=("cpu", NANO, NX), cluster_timeout=3, target_engine="cpu")
    return out, res, time.perf_counter() - t0


def test_cluster_records_equal_the_in_process_records(local, swept):
    _, local_out, ref = local
    out, res, _ = swept
    mine = _by_key(res.records)
    assert len(res.nodes) == 2 and sum(n["units"] for n in res.nodes.values()) == 12  # 2 runs x 3 shards x (cpu, nano)
    for key, r in _by_key(ref.records).items():
        got = mine[key]
        for field in ("accuracy", "per_split", "think_budget", "precision", "target", "supported", "deployable"):
            assert got.get(field) == r.get(field), (key, field)
        assert got["latency"]["source"] == r["latency"]["source"]
    assert any(r["accuracy"]["acc"] > 0 for r in ref.records)  # a check that could fail: the grounder finds boxes
    for b in ("0", "32"):
        assert sorted(map(_what_was_answered, _rows(out, f"full-{b}"))) == sorted(map(_what_was_answered, _rows(local_out, f"full-{b}")))


def test_a_node_offering_the_target_measures_its_units(swept, cluster):
    out, res, _ = swept
    by = {(r["target"], r["think_budget"]): r for r in res.records}
    worker = cluster.list_all_nodes()[1].node_id[:8]
    for b in (0, 32):
        nano = by[(NANO, b)]
        assert nano["latency"]["source"] == "measured" and nano["latency"]["mean_ms"] > 0
        assert nano["engine"] == by[("cpu", b)]["engine"] == "onnxruntime-cpu"  # --target-engine cpu: the CPU bundle there
        assert worker in nano["measured_on"] and nano["latency"]["measured_on"] == nano["measured_on"]
        assert nano["accuracy"] == by[("cpu", b)]["accuracy"]  # the same bundle, measured on that node
    report = (out / "report.md").read_text()
    assert f"On {NANO}, accuracy and latency are measured at ray node" in report
    assert "with the CPU bundle through ONNX Runtime, one request at a time" in report


def test_a_target_no_node_offers_is_reported_not_waited_on(swept):
    out, res, wall = swept
    said = [n for n in res.notes if "unschedulable" in n]
    assert said == [f"6 unit(s) for target {NX} were unschedulable: no node offered the resource target:{NX} within 3 s; "
                    f"start one with `ray start --address HEAD --resources '{{\"target:{NX}\": 1}}'` and rerun the same command."]
    assert wall < 60
    nx = [r for r in res.records if r["target"] == NX]
    assert len(nx) == 2 and all(r["latency"]["source"] == "predicted" for r in nx)  # the planner's, as in-process


def test_the_same_command_with_cluster_resumes_without_measuring_again(local, swept, capsys):
    from egm_edge.assets import default_model_dir
    from egm_edge.cli import main

    data, _, _ = local
    out, _, _ = swept
    before = (out / "records.jsonl").read_text()
    args = ["sweep", "--model", str(default_model_dir()), "--recipes", "full", "--budgets", "0,32", "--target", f"cpu,{NANO}",
            "--data", str(data), "--out", str(out), "--max-answer-tokens", "64", "--no-progress", "--cluster", "auto",
            "--target-engine", "cpu"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "full: all 2 budgets already recorded" in text and "(0 runs measured now)" in text
    assert (out / "records.jsonl").read_text() == before
    assert main(["sweep", "--bundle", str(out / "bundles" / "full"), *args[7:]]) == 2  # a deployed sweep has no units
    assert "--cluster applies to --model sweeps only" in capsys.readouterr().err


def test_by_default_a_target_node_without_tensorrt_says_so_once_and_its_target_keeps_the_prediction(
        local, cluster, tmp_path, capsys):
    from egm_edge.cli import main
    from egm_edge.sweep.records import RecordStore

    data, local_out, _ = local
    out = _out_with_bundle(local_out, tmp_path / "out")
    args = ["sweep", "--model", _model(), "--recipes", "full", "--budgets", "0", "--target", f"cpu,{NANO}", "--data", str(data),
            "--out", str(out), "--max-answer-tokens", "64", "--no-progress", "--cluster", "auto", "--shard-size", "2"]
    assert main(args) == 0  # as with unschedulable units: the sweep ends, its notes say what was not measured
    text = capsys.readouterr().out
    worker = cluster.list_all_nodes()[1].node_id[:8]  # the node offering target:jetson-orin-nano-8gb, without TensorRT
    said = [line for line in text.splitlines() if "could not run on ray node" in line]
    assert len(said) == 1, text  # once for the target, not once per unit
    assert said[0].startswith(f"note: 3 unit(s) for target {NANO} could not run on ray node ") and f"({worker}, " in said[0]
    assert "(TensorRT is not importable here; run `egm-edge build --finalize` on the target device" in said[0]  # finalize's own
    bundle = out / "bundles" / f"full-{NANO}"
    assert (bundle / "build_plan.json").is_file() and not (bundle / "engines").exists()  # built here, compiled only there
    by = {r["target"]: r for r in RecordStore(out).load()}
    assert by[NANO]["latency"]["source"] == "predicted" and "engine" not in by[NANO]
    assert by["cpu"]["latency"]["source"] == "measured" and by["cpu"]["engine"] == "onnxruntime-cpu"
    # The same command again: the nano bundle is reused (no second export), the node asked again, the same one note.
    assert main(args) == 0
    again = capsys.readouterr().out
    assert f"full: reusing {bundle} (inputs unchanged)" in again and "exporting" not in again
    assert [line for line in again.splitlines() if "could not run on ray node" in line] == said


def test_a_rerun_measures_a_target_again_only_when_the_target_engine_changed():
    from egm_edge.sweep.api import _done

    def measured(engine=None):
        return {"latency": {"source": "measured"}, **({"engine": engine} if engine else {})}

    for record in (measured(), measured("onnxruntime-cpu"), measured("pytorch-reference")):  # no field: written before it
        assert _done(record, True, "onnxruntime-cpu") and not _done(record, True, "tensorrt")
    assert _done(measured("tensorrt"), True, "tensorrt") and not _done(measured("tensorrt"), True, "onnxruntime-cpu")
    assert not _done({"latency": {"source": "predicted"}}, True, "tensorrt")


def _raylet_children(cluster, title: bytes) -> list[int]:
    """Worker processes of this cluster's raylets whose title says they run `title` now."""
    raylets = {p.process.pid for n in cluster.list_all_nodes() for p in n.all_processes.get("raylet", [])}
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if cmd.startswith(title) and ppid in raylets:
            found.append(int(pid))
    return found


def test_a_worker_killed_mid_unit_loses_and_duplicates_nothing(local, cluster, tmp_path):
    _, local_out, ref = local
    killed, stop = [], threading.Event()

    def killer():
        while not stop.is_set() and not killed:
            for pid in _raylet_children(cluster, b"ray::_unit_task"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.01)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        res = _cluster_sweep(local, tmp_path / "out", targets=("cpu",), shard_size=1)
    finally:
        stop.set()
        t.join(5)
    assert killed, "no unit was seen running, so none was killed"
    assert not [n for n in res.notes if "failed" in n]
    for key, r in _by_key(ref.records).items():
        if r["target"] == "cpu":
            assert _by_key(res.records)[key]["accuracy"] == r["accuracy"]
    for b in ("0", "32"):
        rows = _rows(tmp_path / "out", f"full-{b}")
        assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in _rows(local_out, f"full-{b}"))  # each once
        assert sorted(map(_what_was_answered, rows)) == sorted(map(_what_was_answered, _rows(local_out, f"full-{b}")))
    lines = (tmp_path / "out" / "records.jsonl").read_text().splitlines()
    assert len(lines) == len({json.loads(x)["key"] for x in lines}) == 2


def test_bad_cluster_options_are_one_sentence(local, tmp_path, capsys):
    from egm_edge.assets import default_model_dir
    from egm_edge.errors import InputError
    from egm_edge.sweep import sweep

    data, _, _ = local
    for kw, match in (({"cluster_timeout": 0, "cluster": "auto"}, "cluster timeout must be a positive"),
                      ({"shared_dir": tmp_path / "nope", "cluster": "auto"}, "shared folder .* does not exist"),
                      ({"shared_dir": tmp_path}, "--shared-dir applies to --cluster sweeps only"),
                      ({"shard_size": 0}, "shard size must be a whole number")):
        with pytest.raises(InputError, match=match):
            sweep(default_model_dir(), data=data, out_dir=tmp_path / "o", **{**KW, **kw})
    with pytest.raises(InputError, match="Unknown target engine 'gpu'. Choose from: tensorrt, cpu."):
        sweep(default_model_dir(), data=data, out_dir=tmp_path / "o", cluster="auto", target_engine="gpu", **KW)
    from egm_edge.cli import main

    assert main(["sweep", "--model", _model(), "--data", str(data), "--out", str(tmp_path / "o"), "--target-engine", "cpu"]) == 2
    assert "--target-engine applies to --cluster sweeps only" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # A head that is not there: one sentence at once (in a fresh process: this one is connected to the test cluster).
    cmd = [sys.executable, "-m", "egm_edge", "sweep", "--model", str(default_model_dir()), "--recipes", "full", "--budgets", "0",
           "--data", str(data), "--out", str(tmp_path / "o"), "--cluster", "127.0.0.1:1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Nothing answers at 127.0.0.1:1" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()  # refused before any bundle was built


# ---- validate --cluster --------------------------------------------------------------------------------


def _without_latency(groups: dict) -> dict:
    """The report's per-split figures less the latency percentiles (wall-clock: no two runs share them)."""
    return {g: {k: ({m: v for m, v in fig.items() if m != "latency_ms"} if k in ("reference", "candidate") else fig)
                for k, fig in body.items()} for g, body in groups.items()}


def _validate(local, out, **kw):
    from egm_edge.assets import default_model_dir
    from egm_edge.validate import validate

    data, local_out, _ = local
    return validate(local_out / "bundles" / "full", default_model_dir(), data, out_dir=out, think_budget=16,
                    max_answer_tokens=64, min_split_n=1, progress=False, **kw)


def test_validate_on_the_cluster_reports_what_the_in_process_run_reports_and_resumes(local, cluster, tmp_path, capsys):
    here = _validate(local, tmp_path / "here")
    there = _validate(local, tmp_path / "there", cluster="auto", shard_size=2)
    for key in ("verdict", "failures", "held", "too_small", "errors", "split_mean", "thresholds", "settings"):
        assert there.data[key] == here.data[key], key
    assert _without_latency(there.data["groups"]) == _without_latency(here.data["groups"])
    assert here.data["groups"]["overall"]["candidate"]["scored"] == 6  # a check that could fail: every sample scored
    for side in ("reference", "candidate"):
        assert there.data["runs"][side]["config"] == here.data["runs"][side]["config"]  # the same resume keys
        assert len(there.data["runs"][side]["where"]) >= 1
        mine, theirs = (sorted(map(_what_was_answered, _side_rows(d, side))) for d in (tmp_path / "there", tmp_path / "here"))
        assert mine == theirs and len(mine) == 6  # each sample once, answered as in-process
    from egm_edge.cli import main

    data, local_out, _ = local
    before = {s: (tmp_path / "there" / f"predictions-{s}.jsonl").read_text() for s in ("reference", "candidate")}
    args = ["validate", "--candidate", str(local_out / "bundles" / "full"), "--reference", _model(), "--data", str(data),
            "--out", str(tmp_path / "there"), "--think-budget", "16", "--max-answer-tokens", "64", "--min-split-n", "1",
            "--no-progress", "--cluster", "auto", "--shard-size", "2"]
    assert main(args) == there.exit_code
    capsys.readouterr()
    rerun = json.loads((tmp_path / "there" / "report.json").read_text())
    assert all(rerun["runs"][s]["predicted_now"] == 0 and rerun["runs"][s]["reused"] == 6 for s in before)
    assert {s: (tmp_path / "there" / f"predictions-{s}.jsonl").read_text() for s in before} == before


def _model() -> str:
    from egm_edge.assets import default_model_dir

    return str(default_model_dir())


def _side_rows(out: Path, side: str) -> list[dict]:
    return [json.loads(x) for x in (out / f"predictions-{side}.jsonl").read_text().splitlines()]


# ---- build --cluster -----------------------------------------------------------------------------------


def test_build_finalize_on_the_cluster_runs_on_the_node_of_the_target_and_brings_back_its_refusal(
        cluster, tiny_export_trt, tmp_path, capsys):
    from egm_edge.builder.tensorrt import build_tensorrt
    from egm_edge.cli import main
    from egm_edge.models import spec_from_config
    from egm_edge.plan import plan
    from egm_edge.targets import load_target

    target = load_target(NANO)
    bundle = build_tensorrt(tiny_export_trt, tmp_path / "b", target, plan(spec_from_config(tiny_export_trt), target, "fp16", 32))
    worker = cluster.list_all_nodes()[1].node_id[:8]  # the node started with target:jetson-orin-nano-8gb
    assert main(["build", "--finalize", str(bundle), "--cluster", "auto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"({worker}, " in err and "could not finalize b for jetson-orin-nano-8gb" in err
    assert "TensorRT is not importable here; run `egm-edge build --finalize` on the target device" in err  # finalize's own
    assert not (bundle / "engines").exists()  # nothing compiled on the driver


def test_build_for_a_target_no_node_offers_is_reported_unschedulable(cluster, tiny_export_trt, tmp_path, capsys):
    from egm_edge.cli import main

    t0 = time.perf_counter()
    rc = main(["build", "--export", str(tiny_export_trt), "--target", NX, "--out", str(tmp_path / "b"), "--think-budget", "32",
               "--cluster", "auto", "--cluster-timeout", "2"])
    wall = time.perf_counter() - t0
    captured = capsys.readouterr()
    assert rc == 2 and f"bundle: {tmp_path / 'b'}" in captured.out  # built here; only the engines wait for a node
    assert captured.err.strip().splitlines()[-1].endswith(
        f"1 unit(s) for target {NX} were unschedulable: no node offered the resource target:{NX} within 2 s; "
        f"start one with `ray start --address HEAD --resources '{{\"target:{NX}\": 1}}'` and rerun the same command.")
    assert wall < 60
