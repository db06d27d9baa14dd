"""One entry point for grounding data: `load_samples(path)` detects the format and loads it.

Formats: an EGM eval file (`.jsonl`, or `.json` holding JSON lines or one JSON list),
the `refer` release (a dataset folder or its `refs(*).p`), and COCO instance files
(detected so that they get a clear answer: they hold objects, not expressions; use
`load_coco_instances`/`templated_samples`). `check_report` renders what
`egm-edge data check` prints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from egm_edge.data.jsonl import load_jsonl
from egm_edge.data.refer import REFS_FILES, load_refer
from egm_edge.data.samples import Collector, LoadResult
from egm_edge.errors import InputError

FORMATS = ("egm_jsonl", "refer", "coco_instances")


def detect_format(path: str | os.PathLike) -> str:
    """Which of FORMATS a path holds, from its kind and first bytes; InputError when none."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"Data path {path} does not exist.")
    if path.is_dir():
        if any((path / name).is_file() for name in REFS_FILES):
            return "refer"
        raise InputError(f"Directory {path} holds none of {', '.join(REFS_FILES)}; give an EGM .jsonl file or a refer dataset folder.")
    if path.suffix in (".p", ".pkl", ".pickle"):
        return "refer"
    head = _head(path)
    if not head.strip():
        raise InputError(f"Data file {path} is empty.")
    coco_keys = ('"images"', '"annotations"', '"categories"', '"info"', '"licenses"')
    if path.suffix != ".jsonl" and head.lstrip().startswith("{") and any(k in head for k in coco_keys) and _is_coco(path):
        return "coco_instances"
    if head.lstrip()[:1] in ("{", "["):
        return "egm_jsonl"
    raise InputError(f"Data file {path} is neither JSON lines nor JSON (it starts with {head.strip()[:20]!r}).")


def _head(path: Path, n: int = 4096) -> str:
    with open(path, "rb") as f:
        return f.read(n).decode("utf-8", errors="replace")


def _is_coco(path: Path) -> bool:
    """A single JSON object with COCO's top-level lists (JSON lines fail to parse as one object)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and isinstance(data.get("images"), list) and isinstance(data.get("annotations"), list)


def load_samples(
    path: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    strict: bool = True,
    split: str | None = None,
    check_images: bool = False,
) -> LoadResult:
    """Grounding samples of an EGM eval file or a refer release.

    strict: raise InputError at the first bad record (`file:line: reason`); otherwise
    skip it and count it in `LoadResult.skipped`. split: keep only that split
    (`refcoco_val`, or for refer also the bare `val`). check_images: each image must
    exist and have the recorded size (reads headers only).
    """
    path = Path(path)
    fmt = detect_format(path)
    root = Path(image_root) if image_root is not None else None
    collector = Collector(path, fmt, strict, check_images=check_images)
    if fmt == "egm_jsonl":
        try:
            load_jsonl(path, collector, image_root=root, split=split)
        except UnicodeDecodeError as e:
            raise InputError(f"Data file {path} is not UTF-8 text ({e.reason} at byte {e.start}).") from None
    elif fmt == "refer":
        load_refer(path, collector, image_root=root, split=split)
    else:
        raise InputError(
            f"{path} is a COCO instances file (objects, no referring expressions); "
            "use egm_edge.data.load_coco_instances and templated_samples, e.g. as a calibration source."
        )
    return collector.result


def check_report(
    path: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    strict: bool = True,
    check_images: bool = False,
    max_lines: int = 20,
) -> str:
    """The text `egm-edge data check` prints: counts per split and why records were skipped."""
    path = Path(path)
    if detect_format(path) == "coco_instances":
        return _coco_report(path, image_root, strict)
    result = load_samples(path, image_root=image_root, strict=strict, check_images=check_images)
    lines = [result.summary()]
    lines += [f"  {name:<24} {n:>8}" for name, n in sorted(result.by_split().items())]
    tasks = {s.task for s in result.samples}
    if tasks - {"vanilla"}:
        lines.append("tasks: " + ", ".join(f"{t} {sum(s.task == t for s in result.samples)}" for t in sorted(tasks)))
    if result.skipped:
        lines.append(f"skipped {sum(result.skipped.values())} records:")
        lines += [f"  {reason:<24} {n:>8}" for reason, n in sorted(result.skipped.items(), key=lambda kv: -kv[1])]
        for where, detail in result.skipped_lines[:max_lines]:
            lines.append(f"  {path.name}:{where}: {detail}")
        if len(result.skipped_lines) > max_lines:
            lines.append(f"  ... and {len(result.skipped_lines) - max_lines} more")
    if not check_images:
        lines.append("images not checked (pass --check-images to check that each exists and has the recorded size)")
    return "\n".join(lines)


def _coco_report(path: Path, image_root, strict: bool) -> str:
    from egm_edge.data.coco import load_coco_instances, templated_samples

    images = load_coco_instances(path, image_root, strict=strict)
    n_inst = sum(len(im.instances) for im in images)
    n_crowd = sum(i.iscrowd for im in images for i in im.instances)
    n_dropped = sum(im.dropped for im in images)
    n_expr = len(templated_samples(images))
    missing = sum(not im.image.is_file() for im in images)
    text = (
        f"{path.name} (coco_instances): {len(images)} images, {n_inst} instances ({n_crowd} crowd), "
        f"{n_expr} templated referring expressions, {missing} image files missing"
    )
    return text + (f"; {n_dropped} bad annotations left out" if n_dropped else "")
