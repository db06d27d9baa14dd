"""Stage artifacts: directories written in a temporary sibling, with `manifest.json` written last, then renamed.

A directory without a manifest is not an artifact (DESIGN.md). Every stage uses
`staged_output(out_dir, force=..., inputs=[...])` so an interrupted run leaves nothing
that looks complete, and `write_manifest` to record inputs (sha256), versions, timings.
Outputs are safe for what is already on disk: an output never is, contains or lies
inside an input; --force replaces only an egm-edge artifact or an empty folder;
commands that write in place and resume use `prepare_output_dir` with their own
output's signature; hidden partials of dead runs are cleared at the next run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

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


def safetensors_entries(model_dir):
    """(tensor name, header entry: dtype, shape, data_offsets) of every *.safetensors file in `model_dir`, read from
    the headers only."""
    import struct

    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as h:
            header = json.loads(h.read(struct.unpack("<Q", h.read(8))[0]))
        yield from ((k, v) for k, v in header.items() if k != "__metadata__")


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def cache_root() -> Path:
    """Where egm-edge keeps what it can rebuild: $EGM_EDGE_CACHE, else $XDG_CACHE_HOME/egm-edge, else ~/.cache/egm-edge."""
    if os.environ.get("EGM_EDGE_CACHE"):
        return Path(os.environ["EGM_EDGE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "egm-edge"


def available_host_memory() -> int | None:
    """Bytes of host memory available now (Linux MemAvailable); None where /proc/meminfo cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


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


def overlap(out: Path, inp: Path) -> str | None:
    """How `out` overlaps `inp` ("is", "lies inside", "contains"), comparing resolved paths; None when apart."""
    o, i = Path(out).resolve(), Path(inp).resolve()
    if o == i:
        return "is"
    if i in o.parents:
        return "lies inside"
    if o in i.parents:
        return "contains"
    return None


def check_apart(path, inputs, what: str = "Output directory", flag: str = "--out") -> None:
    """Refuse a `path` that is, lies inside or contains one of `inputs` (None entries skipped)."""
    for inp in inputs:
        how = overlap(path, inp) if inp is not None else None
        if how:
            raise EgmError(f"{what} {path} {how} the input {inp}; choose a {flag} outside every input.")


def check_output_dir(out_dir, force: bool = False, *, inputs=(), own: Callable[[Path], bool] | None = None,
                     resume: bool = False) -> None:
    """Refuse, in one sentence and before anything is written, an output that would harm something.

    The output may never be, lie inside or contain one of `inputs` (symlinks resolved). A non-empty
    directory is taken only when it is the command's own output and `resume` is set (`own(dir)`: the
    command resumes it in place), or with `force` when it is an egm-edge artifact (it has our
    manifest.json, or `own(dir)`); a directory of anyone else's files is never replaced.
    """
    out_dir = Path(out_dir)
    check_apart(out_dir, inputs)
    if out_dir.exists() and not out_dir.is_dir():
        raise EgmError(f"Output path {out_dir} exists and is not a directory; choose another --out.")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    mine = own is not None and own(out_dir)
    if mine and resume:
        return
    if not (mine or (out_dir / MANIFEST).is_file()):
        raise EgmError(f"Output directory {out_dir} holds files that are not an egm-edge artifact (no {MANIFEST}), "
                       "which --force never replaces; choose a new or empty --out.")
    if not force:
        raise EgmError(f"Output directory {out_dir} already holds an artifact; pass --force to replace it or choose another --out.")


def prepare_output_dir(out_dir, force: bool = False, *, inputs=(), own: Callable[[Path], bool] | None = None) -> Path:
    """The output directory of a command that writes in place and resumes (validate, sweep, demo): checked
    (`check_output_dir` with `resume`), emptied when --force replaces another artifact, created; returns it."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, force, inputs=inputs, own=own, resume=True)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (own is not None and own(out_dir)):
        for child in list(out_dir.iterdir()):  # an artifact replaced on --force: its contents, not a symlinked folder itself
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process (or a number we cannot ask about): keep its files
    return True


def remove_stale_partials(out_dir) -> list[Path]:
    """Remove `.NAME.partial-PID` / `.NAME.old-PID` siblings of `out_dir` left by runs that died (SIGKILL, power
    loss): only those whose PID no longer exists, never a live run's; returns what was removed."""
    out_dir = Path(out_dir)
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.(?:partial|old)-(\d+)")
    removed = []
    if not out_dir.parent.is_dir():
        return removed
    for p in out_dir.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def staged_output(out_dir, force: bool = False, *, inputs=(), own: Callable[[Path], bool] | None = None,
                  complete: str = MANIFEST):
    """Yield a temporary directory beside `out_dir`; on success it replaces `out_dir` atomically-ish.

    `out_dir` is first checked (`check_output_dir` with `inputs`, `own`) and stale partials of dead runs
    beside it are removed. The stage is finished when `complete` (manifest.json) exists in the temporary
    directory. On any exception (including KeyboardInterrupt) the temporary directory is removed and
    `out_dir` is left exactly as it was.
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, force, inputs=inputs, own=own)
    out_dir = Path(os.path.abspath(out_dir))  # "." and ".." have no name to stage beside
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if not (tmp / complete).is_file():
            raise RuntimeError(f"stage finished without writing {complete}")
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
