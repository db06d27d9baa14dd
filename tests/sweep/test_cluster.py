"""A sweep on a real local Ray cluster (a head and one more node, loopback only) gives the in-process records.

The cluster: a head with 1 CPU and a second node (its own raylet) with 1 CPU that also offers
`target:jetson-orin-nano-8gb`, as a Jetson joining with `ray start --resources` would. The embedded
tiny grounder is swept in-process once; the cluster sweeps reuse its bundle (copied into their --out,
found by its key), so the whole file stays within about a minute here.
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
    res = _cluster_sweep(local, out, targets=("cpu", NANO, NX), cluster_timeout=3)
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
        assert worker in nano["measured_on"] and nano["latency"]["measured_on"] == nano["measured_on"]
        assert nano["accuracy"] == by[("cpu", b)]["accuracy"]  # the same bundle, measured on that node
    assert f"On {NANO}, accuracy and latency are measured at ray node" in (out / "report.md").read_text()


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
            "--data", str(data), "--out", str(out), "--max-answer-tokens", "64", "--no-progress", "--cluster", "auto"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "full: all 2 budgets already recorded" in text and "(0 runs measured now)" in text
    assert (out / "records.jsonl").read_text() == before
    assert main(["sweep", "--bundle", str(out / "bundles" / "full"), *args[7:]]) == 2  # a deployed sweep has no units
    assert "--cluster applies to --model sweeps only" in capsys.readouterr().err


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


def test_bad_cluster_options_are_one_sentence(local, tmp_path):
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
    # A head that is not there: one sentence at once (in a fresh process: this one is connected to the test cluster).
    cmd = [sys.executable, "-m", "egm_edge", "sweep", "--model", str(default_model_dir()), "--recipes", "full", "--budgets", "0",
           "--data", str(data), "--out", str(tmp_path / "o"), "--cluster", "127.0.0.1:1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Nothing answers at 127.0.0.1:1" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()  # refused before any bundle was built
