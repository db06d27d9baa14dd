"""A bundle's files against what its build recorded: the sha256 and size of each, in manifest.json (torch-free).

`check_files(bundle_dir, manifest, full=False)` refuses, in one sentence naming the
file, any file whose size or sha256 differs from manifest["sizes_bytes"] and
manifest["outputs"]["sha256"] (egm_edge.builder writes both, last). A swapped or
damaged graph is refused at open, not discovered as a missing box.

Hashing gigabytes of engines on every open would make each server restart slow,
so a file whose size, mtime, change time and inode are those of its last good
hash is trusted without being read again; `full=True` (`--verify`) reads every
file. That cache is a small JSON file in the user's cache folder ($EGM_EDGE_CACHE
or ~/.cache/egm-edge), never in the bundle, which may be a read-only mount; when
it cannot be read or written, every open hashes in full. A manifest that records
no hashes (an older bundle, or the build's own smoke test before its manifest is
final) is not checked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from egm_edge.artifacts import sha256_file
from egm_edge.errors import CheckpointError

CACHE_FILE = "bundle-hashes.json"
CACHE_VERSION = 1
_MAX_ENTRIES = 2048


def cache_path() -> Path:
    from egm_edge.artifacts import cache_root

    return cache_root() / CACHE_FILE


def _stamp(st: os.stat_result) -> list[int]:
    # The change time and inode move on any write or replacement, even when the mtime is set back.
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _load_cache() -> dict:
    try:
        data = json.loads(cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def _save_cache(files: dict) -> None:
    """Best effort: a cache that cannot be written only means the next open hashes again."""
    while len(files) > _MAX_ENTRIES:
        files.pop(next(iter(files)))
    path = cache_path()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "files": files}), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass


def _refuse(bundle_dir: Path, name: str, why: str) -> CheckpointError:
    return CheckpointError(f"{name} in bundle {bundle_dir} is not the file its build wrote ({why}); "
                           "rebuild the bundle with `egm-edge build` (or restore the original file).")


def check_files(bundle_dir, manifest: dict, full: bool = False) -> int:
    """Refuse a bundle file that differs from its manifest's record; returns how many files were read and hashed."""
    bundle_dir = Path(bundle_dir)
    recorded = (manifest.get("outputs") or {}).get("sha256") or {}
    if not isinstance(recorded, dict) or not recorded:
        return 0
    sizes = manifest.get("sizes_bytes") or {}
    cache = _load_cache()
    hashed, changed = 0, False
    for name, want in sorted(recorded.items()):
        path = bundle_dir / name
        try:
            st = path.stat()
        except OSError:
            raise CheckpointError(f"Bundle {bundle_dir} has no {name}, which its manifest records; "
                                  "rebuild the bundle with `egm-edge build` (or restore the file).") from None
        size = sizes.get(name) if isinstance(sizes, dict) else None
        if isinstance(size, int) and st.st_size != size:
            raise _refuse(bundle_dir, name, f"{st.st_size:,} bytes where the build wrote {size:,}")
        key = str(path.resolve())
        entry = cache.get(key)
        if not full and isinstance(entry, dict) and entry.get("stamp") == _stamp(st) and entry.get("sha256") == want:
            continue
        got = sha256_file(path)
        hashed += 1
        if got != want:
            cache.pop(key, None)
            raise _refuse(bundle_dir, name, f"its sha256 begins {got[:12]} where the manifest records {str(want)[:12]}")
        after = path.stat()
        if _stamp(after) == _stamp(st):  # not written to while it was being read
            cache.pop(key, None)  # re-insert at the end: the oldest entries go first
            cache[key] = {"stamp": _stamp(after), "sha256": got}
            changed = True
    if changed:
        _save_cache(cache)
    return hashed
