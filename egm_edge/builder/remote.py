"""`finalize_on_cluster(bundle, executor)`: `build --finalize` as a Ray task on a node of the bundle's own target.

Contract: the bundle (a finished gpu/jetson bundle: its manifest says stage build,
executor tensorrt) travels to a node offering `target:<its target>` by content hash,
exactly as sweep ships bundles (`egm_edge.sweep.cluster.RayExecutor.call`: Ray's object
store into that node's `$EGM_EDGE_CACHE/cluster/<sha256>`, or `--shared-dir`), and
`egm_edge.builder.tensorrt.finalize` compiles its engines there. The engines stay on
that device (they are specific to its GPU and TensorRT); the driver gets back the node
and where the engines lie on it. finalize's own refusal on that node (no TensorRT,
another compute capability) comes back as the same error class with one sentence
naming the node; a target no node offers within the executor's timeout is the sweep's
unschedulable sentence. Nothing here imports Ray or TensorRT at module level.
"""

from __future__ import annotations

from pathlib import Path

from egm_edge.errors import CheckpointError, EgmError, UnsupportedError


def _finalize_here(path, force: bool) -> dict:
    """On the node (runs under Ray): finalize its copy; a refusal is returned as data, never raised across Ray."""
    from egm_edge.builder.tensorrt import finalize

    try:
        return {"engines": str(finalize(path, force=force))}
    except EgmError as e:
        return {"error": str(e), "kind": type(e).__name__}


def _gpu_bundle(bundle: Path) -> str:
    """The bundle's target, refused here in finalize's words when it is no gpu/jetson bundle."""
    from egm_edge.artifacts import read_manifest

    m = read_manifest(bundle)
    if m is None or m.get("stage") != "build":
        raise CheckpointError(f"{bundle} is not a finished bundle (no build manifest.json); build one with `egm-edge build`.")
    if m.get("executor") != "tensorrt" or not (bundle / "build_plan.json").is_file():
        raise UnsupportedError(f"Bundle {bundle} targets {m.get('target')!r} and has no TensorRT build plan; only gpu and "
                               "jetson bundles are finalized.")
    return str(m["target"])


def finalize_on_cluster(bundle, executor, *, force: bool = False, say=None) -> dict:
    """Finalize `bundle` on a node of its target through `executor` (a connected-or-not `RayExecutor`).

    Returns {"target", "node", "engines"} (engines: the folder on that node). Raises the node's refusal as its own
    error class, naming the node, and InputError when no node offers the target within the executor's timeout."""
    from egm_edge.sweep.units import Artifact

    say = say or (lambda _m: None)
    bundle = Path(bundle)
    target = _gpu_bundle(bundle)
    art = Artifact.of(bundle, "bundle")
    say(f"finalizing {bundle} on a node offering target:{target} (bundle {art.sha256[:12]}, shipped by content hash)")
    out, node = executor.call(_finalize_here, art, target, force)
    if "error" in out:
        cls = {c.__name__: c for c in (CheckpointError, UnsupportedError)}.get(out["kind"], EgmError)
        raise cls(f"Ray node {node} could not finalize {bundle.name} for {target}: {out['error']}")
    say(f"engines compiled on ray node {node} at {out['engines']} (they stay on that device)")
    return {"target": target, "node": node, "engines": out["engines"]}
