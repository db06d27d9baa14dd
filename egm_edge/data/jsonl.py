"""EGM evaluation records: read them (JSONL or a JSON list) into Samples, write Samples back.

Record fields, as EGM's `sglang_infer.py`/`vllm_infer.py` read them:
`{"image", "sent", "bbox": [x1, y1, x2, y2] pixels, "height", "width"}`, optional
`"split"`, `"id"`/`"question_id"`, `"task"` (vanilla|amodal). Variants EGM honours and
so do we: `"modal_bbox"` when `"bbox"` is absent; InternVL-style records with
`"conversations"` where the expression is the last `<ref>...</ref>` and the box the
last `<box>[x1,y1,x2,y2]</box>`, in 0..1000 coordinates (EGM's reward scales it by
W/1000, H/1000), converted here to pixels. Other fields are kept in `Sample.extra`
and written back, so write -> load round-trips.

Images: with `image_root`, `image_root / image.lstrip("/")` (EGM joins its
BASE_IMG_DIR the same way); otherwise relative paths are relative to the file's
directory. The split is the record's `"split"`, else the file's stem (EGM names
its eight files `refcoco_val.jsonl` ... `refcocog_test.jsonl`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from egm_edge.data.samples import (
    BadRecord,
    Collector,
    Sample,
    check_box,
    check_expression,
    check_size,
    check_task,
)
from egm_edge.errors import InputError
from egm_edge.models.families.internvl import INTERNVL

_CORE = ("image", "sent", "bbox", "width", "height", "split", "task")
# InternVL-style conversations (EGM's InternVL data): the family record names the tags.
_REF_OPEN, _REF_CLOSE = INTERNVL.ref_tag
_BOX_OPEN, _BOX_CLOSE = INTERNVL.box_tag
_REF = re.compile(re.escape(_REF_OPEN) + r"\s*[\"“]?(.+?)[\"”]?\s*" + re.escape(_REF_CLOSE), re.S)
_BOX = re.compile(re.escape(_BOX_OPEN) + r"\s*\[+([^\[\]]+)\]+\s*" + re.escape(_BOX_CLOSE), re.S)
_NUM = re.compile(r"[-+]?(?:\d*\.\d+|\d+)(?:[eE][-+]?\d+)?")


def iter_records(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """(where, record-or-BadRecord) for a JSONL file or a file holding one JSON list."""
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            yield f"{e.lineno}", BadRecord("bad json", f"the JSON list does not parse ({e.msg})")
            return
        for i, rec in enumerate(records, 1):
            yield f"record {i}", rec
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield str(lineno), json.loads(line)
        except json.JSONDecodeError as e:
            yield str(lineno), BadRecord("bad json", f"the line is not valid JSON ({e.msg} at column {e.colno})")


def load_jsonl(
    path: Path,
    collector: Collector,
    *,
    image_root: Path | None = None,
    split: str | None = None,
    text: str | None = None,
) -> None:
    """Read every record of an EGM eval file into the collector."""
    if text is None:
        text = path.read_text(encoding="utf-8")
    base = Path(image_root) if image_root is not None else path.parent
    for where, rec in iter_records(path, text):
        try:
            if isinstance(rec, BadRecord):
                raise rec
            sample = record_to_sample(rec, base=base, rooted=image_root is not None, default_split=path.stem, where=where)
        except BadRecord as err:
            collector.bad(where, err)
            continue
        if split is not None and sample.split != split:
            collector.result.filtered += 1
            continue
        collector.add(sample, where)


def record_to_sample(rec: Any, *, base: Path, rooted: bool, default_split: str, where: str) -> Sample:
    """One EGM record as a Sample, or BadRecord with the reason."""
    if not isinstance(rec, dict):
        raise BadRecord("not an object", f"the record is a JSON {type(rec).__name__}, not an object")
    rec = dict(rec)
    conv_text = _conversation_text(rec)
    for name in ("image", "width", "height"):
        if name not in rec:
            raise BadRecord("missing field", f"the record has no {name!r} field")
    width, height = check_size(rec.pop("width"), rec.pop("height"))
    image = rec.pop("image")
    if not isinstance(image, str) or not image.strip():
        raise BadRecord("bad image path", f"image {image!r} is not a path")
    if "sent" in rec:
        sent = rec.pop("sent")
    elif conv_text is not None and _REF.findall(conv_text):
        sent = _REF.findall(conv_text)[-1]
    else:
        raise BadRecord("missing field", f"the record has no 'sent' field (nor a {_REF_OPEN} in its conversations)")
    if "bbox" in rec:
        bbox = check_box(rec.pop("bbox"), width, height)
    elif "modal_bbox" in rec:
        bbox = check_box(rec["modal_bbox"], width, height, name="modal_bbox")
    elif conv_text is not None and _BOX.findall(conv_text):
        bbox = check_box(_norm1000_box(_BOX.findall(conv_text)[-1], width, height), width, height, name=_BOX_OPEN)
    else:
        raise BadRecord("missing field", f"the record has no 'bbox' field (nor 'modal_bbox' or a {_BOX_OPEN} in its conversations)")
    sample_id = rec.pop("id", None)
    if sample_id is None:
        sample_id = rec.pop("question_id", None)
    split_name = rec.pop("split", default_split)
    if split_name is not None and not isinstance(split_name, str):
        raise BadRecord("bad split", f"split {split_name!r} is not text")
    return Sample(
        image=_resolve(image, base, rooted),
        expression=check_expression(sent),
        bbox=bbox,
        width=width,
        height=height,
        split=split_name,
        sample_id=f"{default_split}:{where}" if sample_id is None else str(sample_id),
        task=check_task(rec.pop("task", "vanilla")),
        extra=rec,
    )


def _conversation_text(rec: dict) -> str | None:
    conv = rec.get("conversations")
    if not isinstance(conv, list):
        return None
    return " ".join(str(turn.get("value", "")) for turn in conv if isinstance(turn, dict))


def _norm1000_box(inner: str, width: int, height: int) -> list[float]:
    nums = [float(v) for v in _NUM.findall(inner)]
    if len(nums) != 4:
        return nums  # check_box reports the wrong length
    x1, y1, x2, y2 = nums
    return [x1 * width / 1000.0, y1 * height / 1000.0, x2 * width / 1000.0, y2 * height / 1000.0]


def _resolve(image: str, base: Path, rooted: bool) -> Path:
    if rooted:
        return Path(os.path.abspath(base / image.lstrip("/")))
    return Path(os.path.abspath(base / image))


def write_jsonl(samples: Iterable[Sample], path: str | os.PathLike, *, image_root: str | os.PathLike | None = None) -> int:
    """Write samples in EGM's eval format; returns the number written.

    Image paths are written relative to `image_root` when given (load with the same
    `image_root`), else relative to the file's directory when the image lies under
    it, else absolute. The file is written to a temporary name and renamed into place.
    """
    path = Path(path)
    root = Path(os.path.abspath(image_root if image_root is not None else path.parent))
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(_sample_record(s, root, image_root is not None), ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def _sample_record(s: Sample, root: Path, rooted: bool) -> dict[str, Any]:
    image = Path(os.path.abspath(s.image))
    if image.is_relative_to(root):
        rel = image.relative_to(root).as_posix()
    elif not rooted:
        rel = str(image)
    else:
        raise InputError(
            f"Image {image} is not under the image root {root}; write without image_root or choose a root that holds every image."
        )
    rec: dict[str, Any] = {k: v for k, v in s.extra.items() if k not in _CORE and k not in ("id", "question_id")}
    rec.update(
        image=rel,
        sent=s.expression,
        bbox=[float(v) for v in s.bbox],
        height=s.height,
        width=s.width,
        split=s.split,
        task=s.task,
    )
    if s.sample_id is not None:
        rec["id"] = s.sample_id
    return rec
