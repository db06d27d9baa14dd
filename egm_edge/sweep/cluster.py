"""`RayExecutor`: sweep and validate units as Ray tasks across a cluster, results streamed back to the single-writer driver.

Contract: `RayExecutor(address)` connects to a running Ray cluster ("auto", "HOST:PORT"
or "ray://HOST:PORT"; a process already connected keeps its connection) and runs the
same `egm_edge.sweep.units.Unit`s as the local executor. A unit for target cpu needs
one CPU of any node; a unit for another target needs the custom resource
`target:<name>`, which a device offers when it joins (`ray start --address HEAD
--resources '{"target:jetson-orin-nx-16gb": 1}'`), so that target's latency is
measured there, one unit at a time. Artifacts travel by content hash: each is packed
once on the driver into Ray's object store, keyed by its manifest sha256, and a worker
that lacks `$EGM_EDGE_CACHE/cluster/<sha256>` fetches and unpacks it (or, with
`shared_dir`, reads the copy the driver placed at `shared_dir/<sha256>`); images travel
with their shard the same way unless `shared_dir` says every node sees the data's
paths. Tasks retry on another worker when theirs dies (`max_retries`); the driver gets
each unit's rows once, from its one successful attempt, and is the only writer of
runs/ and records.jsonl. Units whose resource no node offers for `timeout_s` are
cancelled and reported in one sentence, never waited on forever. A unit whose node
refuses to open its artifact (an `EgmError` while opening or warming up: no TensorRT
there, another GPU) comes back with that sentence instead of rows; such units are
reported once per target and sentence, naming the node(s), and the worker does not
try that artifact again. `call(fn, artifact,
target, *args)` runs one function on the node's copy of an artifact, on a node of that
target (how `build --cluster` finalizes a bundle on its device), under the same rules.
Ray is imported only inside these functions: `pip install 'egm-edge[cluster]'`.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any

from egm_edge.errors import EgmError, InputError

MAX_RETRIES = 3  # per unit, on a worker or node that died (Ray's own retry)
_PREDICTORS: dict[str, Any] = {}  # per worker process: one warm predictor per artifact (its `key`)
_REFUSED: dict[str, str] = {}  # per worker process: artifacts this node refused to open, with the sentence


def _ray():
    try:
        import ray
    except ImportError:
        raise InputError("--cluster needs Ray, which is not installed; pip install 'egm-edge[cluster]' (or leave "
                         "--cluster out to sweep in this process).") from None
    return ray


class RayExecutor:
    name = "ray"

    def __init__(self, address: str, *, timeout_s: float = 120.0, shared_dir=None, max_retries: int = MAX_RETRIES):
        if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
            raise InputError(f"The cluster timeout must be a positive number of seconds, got {timeout_s!r}.")
        if shared_dir is not None and not Path(shared_dir).is_dir():
            raise InputError(f"The shared folder {shared_dir} does not exist; create it where every node sees it at the "
                             "same path, or leave --shared-dir out to ship bundles through Ray's object store.")
        self.address, self.timeout_s, self.max_retries = address, float(timeout_s), max_retries
        self.shared_dir = str(Path(shared_dir).resolve()) if shared_dir is not None else None
        self.notes: list[str] = []
        self._ours = False

    def connect(self) -> None:
        ray = _ray()
        if ray.is_initialized():
            return
        _check_reachable(self.address)
        try:
            ray.init(address=self.address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise InputError(f"Cannot reach a Ray cluster at {self.address!r} ({str(e).splitlines()[0]}); start one with "
                             "`ray start --head` and pass --cluster auto, HOST:PORT or ray://HOST:PORT.") from None
        self._ours = True

    def close(self) -> None:
        if self._ours:
            _ray().shutdown()
            self._ours = False

    def run(self, units, samples: dict, groups: dict, on_rows, *, progress: bool = True, on_start=None, say=None,
            desc: str = "sweep units") -> dict:
        """Run every unit as a Ray task; `on_rows(unit, rows, info)` on the driver as each one ends. Returns
        {node: {"units", "seconds"}}; units that failed or found no node are in `self.notes`, their rows absent."""
        ray = _ray()
        self.connect()
        try:
            return self._run(ray, units, samples, groups, on_rows, progress, desc)
        finally:
            self.close()  # only a connection this executor opened

    def call(self, fn, art, target: str, *args):
        """`fn(path, *args)` as one Ray task on a node offering `target` (path: that node's copy of `art`); returns
        (its result, the node). InputError with the unschedulable sentence when no node offers it for `timeout_s`."""
        from egm_edge.sweep.units import resource_for

        ray = _ray()
        self.connect()
        try:
            res = resource_for(target)
            opts = {"num_cpus": 1, "max_retries": self.max_retries, **({"resources": {res: 1}} if res != "CPU" else {})}
            ref = ray.remote(_call_task).options(**opts).remote(fn, art, [self._ship_artifact(ray, art)], self.shared_dir, *args)
            pending, missing_since = {ref: _Job(target, res)}, {}
            try:
                while pending:
                    if ray.wait([ref], num_returns=1, timeout=0.5)[0]:
                        out = ray.get(ref)
                        return out["result"], out["node"]
                    self._drop_unschedulable(ray, pending, missing_since)
            except ray.exceptions.RayError as e:  # the task's worker or node died more than max_retries times
                if isinstance(e, ray.exceptions.RayTaskError):
                    raise  # an exception inside fn itself: a bug, with its traceback
                raise EgmError(f"The cluster task for target {target} failed ({_first_line(e)}); rerun the same command "
                               "to retry it.") from None
            except BaseException:
                ray.cancel(ref, force=True)
                raise
            raise InputError(self.notes[-1])
        finally:
            self.close()

    def _run(self, ray, units, samples, groups, on_rows, progress, desc) -> dict:
        task = ray.remote(_unit_task)
        unique = {u.artifact.sha256: u.artifact for u in units}
        artifacts = {sha: self._ship_artifact(ray, art) for sha, art in unique.items()}  # packed once each
        images: dict[tuple, Any] = {}
        pending = {}
        for u in units:
            if self.shared_dir is None and u.ids not in images:
                images[u.ids] = ray.put(_pack_images(samples[i] for i in u.ids))
            opts = {"num_cpus": 1, "max_retries": self.max_retries}
            if u.resource != "CPU":
                opts["resources"] = {u.resource: 1}
            # refs inside a list reach the task as refs: it fetches the artifact only when its node lacks it
            ref = task.options(**opts).remote(u, {i: samples[i] for i in u.ids}, {i: groups[i] for i in u.ids},
                                              [artifacts[u.artifact.sha256]], [images.get(u.ids)], self.shared_dir)
            pending[ref] = u
        bar = _bar(len(units), progress, desc)
        nodes: dict[str, dict] = {}
        missing_since: dict[str, float] = {}
        refused: dict[tuple, dict] = {}  # (target, sentence) -> {"units", "nodes"}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                for ref in ready:
                    unit = pending.pop(ref)
                    try:
                        out = ray.get(ref)
                    except ray.exceptions.RayError as e:
                        self.notes.append(f"unit {unit.label()} failed ({_first_line(e)}); its samples have no rows, "
                                          "rerun the same command to retry them.")
                    else:
                        if "refusal" in out:
                            r = refused.setdefault((unit.target, out["refusal"]), {"units": 0, "nodes": []})
                            r["units"] += 1
                            r["nodes"] += [out["node"]] if out["node"] not in r["nodes"] else []
                            bar.update(1)
                            continue
                        on_rows(unit, out["rows"], out)
                        n = nodes.setdefault(out["node"], {"units": 0, "seconds": 0.0})
                        n["units"] += 1
                        n["seconds"] += out["seconds"]
                    bar.update(1)
                self._drop_unschedulable(ray, pending, missing_since)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            bar.close()
        for (target, why), r in refused.items():
            self.notes.append(f"{r['units']} unit(s) for target {target} could not run on ray node {', '.join(r['nodes'])} "
                              f"({why.rstrip('.')}); their samples have no rows from it (a sweep keeps that target's predicted "
                              "record): rerun the same command once that node can run them.")
        return nodes

    def _drop_unschedulable(self, ray, pending: dict, missing_since: dict) -> None:
        """Cancel the units whose resource no live node has offered for `timeout_s`, with one sentence each."""
        needed = {u.resource for u in pending.values()}
        if not needed:
            return
        offered, now = ray.cluster_resources(), time.monotonic()
        for res in needed:
            if offered.get(res, 0) >= 1:
                missing_since.pop(res, None)
                continue
            if now - missing_since.setdefault(res, now) < self.timeout_s:
                continue
            dropped = [ref for ref, u in pending.items() if u.resource == res]
            targets = sorted({pending[ref].target for ref in dropped})
            for ref in dropped:
                ray.cancel(ref)
                del pending[ref]
            how = (f"start one with `ray start --address HEAD --resources '{{\"{res}\": 1}}'`" if res != "CPU"
                   else "add a node with CPUs")
            self.notes.append(f"{len(dropped)} unit(s) for target {', '.join(targets)} were unschedulable: no node offered "
                              f"the resource {res} within {self.timeout_s:g} s; {how} and rerun the same command.")

    def _ship_artifact(self, ray, art):
        if self.shared_dir is None:
            return ray.put(_pack_dir(Path(art.path)))
        dest = Path(self.shared_dir) / art.sha256
        if not dest.is_dir():  # only ever renamed into place whole
            tmp = dest.with_name(f".{art.sha256}.{os.getpid()}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(art.path, tmp)
            try:
                tmp.rename(dest)
            except OSError:  # another driver placed it first
                shutil.rmtree(tmp, ignore_errors=True)
        return None


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """HOST:PORT (or ray://HOST:PORT) must accept a connection: Ray itself retries an absent head for minutes."""
    import socket

    if address == "auto":
        return  # Ray finds the local head itself, and says at once when there is none
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"The cluster address {address!r} is not auto, HOST:PORT or ray://HOST:PORT; pass the head's "
                         "address as `ray start --head` printed it.")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise InputError(f"Nothing answers at {address} ({e.strerror or e}); start the head with `ray start --head` there, "
                         "or pass the address it printed.") from None


class _Job:
    """What `_drop_unschedulable` needs of a pending task: its target and the resource that target asks for."""

    def __init__(self, target: str, resource: str):
        self.target, self.resource = target, resource


def _bar(total: int, enabled: bool, desc: str = "sweep units"):
    """One bar on the driver for the whole cluster: units done of all, with tqdm's rate and ETA."""
    from egm_edge.validate.api import progress_bar

    bar = progress_bar(total, f"{desc} (ray)", enabled)
    if hasattr(bar, "unit"):
        bar.unit = "unit"
    return bar


def _first_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return lines[-1] if lines else type(e).__name__


def _pack_dir(path: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(path, arcname=".")
    return buf.getvalue()


def _pack_images(samples) -> dict[str, bytes]:
    return {str(s.image): Path(s.image).read_bytes() for s in samples}


def _cache() -> Path:
    from egm_edge.artifacts import cache_root

    return cache_root() / "cluster"


def _materialise(art, box: list, shared_dir: str | None) -> Path:
    """This node's copy of the artifact: the shared one, the cached one, or unpacked now from the object store."""
    if shared_dir is not None:
        return Path(shared_dir) / art.sha256
    dest = _cache() / art.sha256
    if dest.is_dir():  # only ever renamed into place whole
        return dest
    import ray

    blob = ray.get(box[0])
    tmp = dest.with_name(f".{art.sha256}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
        tar.extractall(tmp, filter="data")
    try:
        tmp.rename(dest)
    except OSError:  # another worker on this node unpacked it first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _localise(samples: dict, box: list) -> dict:
    """The samples with their images at this node's copies (content-addressed), or as they are."""
    import dataclasses
    import hashlib

    if box[0] is None:
        return samples
    import ray

    blobs, folder, out = ray.get(box[0]), _cache() / "images", {}
    folder.mkdir(parents=True, exist_ok=True)
    for i, s in samples.items():
        data = blobs[str(s.image)]
        local = folder / (hashlib.sha256(data).hexdigest()[:32] + Path(s.image).suffix)
        if not local.is_file():
            tmp = local.with_name(f".{local.name}.{os.getpid()}")
            tmp.write_bytes(data)
            tmp.replace(local)
        out[i] = dataclasses.replace(s, image=local)
    return out


def _unit_task(unit, samples: dict, groups: dict, artifact_box: list, images_box: list, shared_dir: str | None) -> dict:
    """One unit on a worker (runs under Ray): its rows, written nowhere, with the node and seconds it took."""
    import ray

    from egm_edge.sweep.units import measure, warm_up

    t0 = time.perf_counter()
    ctx = ray.get_runtime_context()
    cpus = int((ctx.get_assigned_resources() or {}).get("CPU", 0))
    if cpus and not os.environ.get("EGM_EDGE_THREADS"):
        os.environ["EGM_EDGE_THREADS"] = str(cpus)  # the CPUs Ray gave this task, not every core of the node
    local = _localise(samples, images_box)
    art, node = unit.artifact, _node()
    if art.key not in _PREDICTORS and art.key not in _REFUSED:
        try:
            pred = art.open(_materialise(art, artifact_box, shared_dir))
            warm_up(pred, local[unit.ids[0]], unit.max_answer_tokens)
        except EgmError as e:  # this node's refusal, in its one sentence: data for the driver, never a crash
            _REFUSED[art.key] = str(e)
        else:
            _PREDICTORS[art.key] = pred
    if art.key in _REFUSED:
        return {"rows": [], "refusal": _REFUSED[art.key], "node": node, "seconds": time.perf_counter() - t0}
    rows = measure(unit, _PREDICTORS[art.key], local, groups)
    for r in rows:
        r["image"] = str(samples[r["id"]].image)  # the driver's path: what its store compares samples by
    return {"rows": rows, "node": node, "where": f"ray node {node}", "pid": os.getpid(),
            "seconds": time.perf_counter() - t0}


def _node() -> str:
    """This worker's node as reports name it: IP, the node id's first 8 hex digits, host name."""
    import socket

    import ray

    return f"{ray.util.get_node_ip_address()} ({ray.get_runtime_context().get_node_id()[:8]}, {socket.gethostname()})"


def _call_task(fn, art, artifact_box: list, shared_dir: str | None, *args) -> dict:
    """`fn` on this node's copy of the artifact (runs under Ray), with the node it ran on."""
    return {"result": fn(_materialise(art, artifact_box, shared_dir), *args), "node": _node()}
