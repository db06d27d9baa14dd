"""Stage artifacts: directories written in a temporary sibling, with `manifest.json` written last, then renamed.

A directory without a manifest is not an artifact (DESIGN.md). Every stage uses
`staged_output(out_dir, force=...)` so an interrupted run leaves nothing that
looks complete, and `write_manifest` to record inputs (sha256), versions, timings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from egm_edge.errors import EgmError

MANIFEST = "manifest.json"
_PACKAGES = ("egm-edge", "numpy", "onnx", "onnxruntime", "torch", "transformers", "nvidia-modelopt", "tokenizers")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_hashes(root: Path, names=None) -> dict[str, str]:
    """sha256 of the given files (or of every regular file) under `root`, by relative path."""
    root = Path(root)
    paths = [root / n for n in names] if names is not None else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): sha256_file(p) for p in paths if p.is_file()}


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def shipped_dir(name: str, checkout: str) -> Path:
    """A data folder the wheel ships as egm_edge/_data/<name>; in a source checkout, <repo>/<checkout>."""
    packaged = Path(__file__).resolve().parent / "_data" / name
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[1] / checkout


def read_json(path, *, missing: str, restore: str, error=None) -> dict:
    """A JSON object from `path`, or one sentence: `missing` when the file is absent; otherwise
    "<path> is not readable JSON (<why>); <restore>." `error` is the EgmError subclass to raise."""
    from egm_edge.errors import CheckpointError

    error = error or CheckpointError
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(missing) from None
    except (OSError, ValueError) as e:
        raise error(f"{path} is not readable JSON ({e}); {restore}.") from None
    if not isinstance(data, dict):
        raise error(f"{path} is not a JSON object; {restore}.")
    return data


def read_manifest(path: Path) -> dict | None:
    p = Path(path) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def write_manifest(out_dir: Path, stage: str, **fields) -> dict:
    manifest = {"stage": stage, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}
    manifest.setdefault("versions", package_versions())
    tmp = Path(out_dir) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str))
    os.replace(tmp, Path(out_dir) / MANIFEST)
    return manifest


def check_output_dir(out_dir: Path, force: bool) -> None:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise EgmError(f"Output path {out_dir} exists and is not a directory; choose another --out.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        what = "an artifact" if (out_dir / MANIFEST).exists() else "files"
        raise EgmError(f"Output directory {out_dir} already holds {what}; pass --force to replace it or choose another --out.")


@contextlib.contextmanager
def staged_output(out_dir, force: bool = False):
    """Yield a temporary directory beside `out_dir`; on success it replaces `out_dir` atomically-ish.

    On any exception (including KeyboardInterrupt) the temporary directory is removed and
    `out_dir` is left exactly as it was.
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if not (tmp / MANIFEST).is_file():
            raise RuntimeError(f"stage finished without writing {MANIFEST}")
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
