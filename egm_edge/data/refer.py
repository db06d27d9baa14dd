"""The canonical RefCOCO/RefCOCO+/RefCOCOg release (the `refer` layout), read safely.

Layout: `<data>/<dataset>/refs(<split_by>).p` + `<data>/<dataset>/instances.json`,
images under `<data>/images/mscoco/images/train2014/` (refer's own default; pass
`image_root` otherwise). A directory is read through `refs(unc).p`, else
`refs(umd).p`, else `refs(google).p` (RefCOCOg's test split is umd's); name the
`.p` file to choose. Each ref's sentences become samples; the box is the ref's
annotation in `instances.json`, COCO xywh turned into xyxy pixels. Splits are named
`<dataset>_<split>` (`refcoco_testA`, `refcocog_val`), as EGM names its files.

The refs file is a pickle. It is read with `SafeUnpickler`, which resolves no
global at all except `set`/`frozenset`, so a crafted pickle cannot run code: the
real files hold only dicts, lists, strings and numbers.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

from egm_edge.data.samples import BadRecord, Collector, Sample, check_box, check_expression, check_size
from egm_edge.errors import InputError

REFS_FILES = ("refs(unc).p", "refs(umd).p", "refs(google).p")
_SAFE_GLOBALS = {
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
}


class UnsafePickle(pickle.UnpicklingError):
    """The pickle asked for a global that plain data never needs."""


class SafeUnpickler(pickle.Unpickler):
    """Unpickles plain containers, strings and numbers only; every other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickle(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickle(f"persistent id {pid!r}")


def safe_load_pickle(path: Path) -> Any:
    """Read a plain-data pickle (Python 2 strings decoded as UTF-8, else Latin-1); InputError on anything else."""
    data = path.read_bytes()
    for encoding in ("utf-8", "latin-1"):
        try:
            return SafeUnpickler(io.BytesIO(data), encoding=encoding).load()
        except UnicodeDecodeError:
            continue
        except UnsafePickle as e:
            raise InputError(
                f"Refs file {path} asks to load the Python object {e}, which egm-edge refuses because a pickle "
                "can run arbitrary code; use the original refer release, which holds plain data only."
            ) from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
            raise InputError(f"Refs file {path} is not a readable pickle ({type(e).__name__}: {e}); re-download it.") from None
    raise InputError(f"Refs file {path} holds text that is neither UTF-8 nor Latin-1; re-download it.")


def find_refs_file(path: Path) -> Path:
    """The refs pickle for a refer directory or a path to the pickle itself."""
    if path.is_file():
        return path
    for name in REFS_FILES:
        if (path / name).is_file():
            return path / name
    raise InputError(f"Directory {path} holds none of {', '.join(REFS_FILES)}; point at a refer dataset folder such as data/refcoco.")


def default_image_root(refs_file: Path) -> Path:
    return refs_file.parent.parent / "images" / "mscoco" / "images" / "train2014"


def load_refer(
    path: Path,
    collector: Collector,
    *,
    image_root: Path | None = None,
    split: str | None = None,
) -> None:
    """Read a refer release into the collector; `split` is `val`, `testA`, ... or `refcoco_val`, ..."""
    refs_file = find_refs_file(path)
    collector.result.path = refs_file  # records are the refs file's: messages name it
    folder = refs_file.parent
    dataset = folder.name
    split_by = refs_file.stem[len("refs(") : -1] if refs_file.stem.startswith("refs(") else refs_file.stem
    instances_file = folder / "instances.json"
    if not instances_file.is_file():
        raise InputError(f"{folder} has {refs_file.name} but no instances.json; the refer release ships both.")
    refs = safe_load_pickle(refs_file)
    if not isinstance(refs, list):
        raise InputError(f"Refs file {refs_file} holds a {type(refs).__name__}, not the list of refs the refer release has.")
    images, anns = _read_instances(instances_file)
    root = Path(image_root) if image_root is not None else default_image_root(refs_file)

    available = sorted({r.get("split") for r in refs if isinstance(r, dict) and isinstance(r.get("split"), str)})
    wanted = None
    if split is not None:
        wanted = split[len(dataset) + 1 :] if split.startswith(f"{dataset}_") else split
        if wanted not in available:
            raise InputError(f"Split {split!r} is not in {refs_file}; choose from: {', '.join(available)}.")

    for i, ref in enumerate(refs):
        where = f"ref {ref.get('ref_id', f'#{i}')}" if isinstance(ref, dict) else f"ref #{i}"
        if wanted is not None and isinstance(ref, dict) and ref.get("split") != wanted:
            sentences = ref.get("sentences")
            collector.result.filtered += len(sentences) if isinstance(sentences, list) else 1
            continue
        try:
            per_sentence = _ref_samples(ref, images, anns, root, dataset, split_by)
        except BadRecord as err:
            collector.bad(where, err)
            continue
        for sent_where, got in per_sentence:
            if isinstance(got, BadRecord):
                collector.bad(f"{where} {sent_where}", got)
            else:
                collector.add(got, f"{where} {sent_where}")


def _read_instances(path: Path) -> tuple[dict, dict]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e}); re-download the refer release.") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise InputError(f"{path} lacks the 'images' and 'annotations' lists of a COCO instances file.")
    images = {im.get("id"): im for im in data["images"] if isinstance(im, dict)}
    anns = {a.get("id"): a for a in data["annotations"] if isinstance(a, dict)}
    return images, anns


def _ref_samples(
    ref: Any, images: dict, anns: dict, root: Path, dataset: str, split_by: str
) -> list[tuple[str, Sample | BadRecord]]:
    """One entry per sentence; a fault of the ref itself (box, image) raises BadRecord for all of them."""
    if not isinstance(ref, dict):
        raise BadRecord("not a ref", f"the ref is a {type(ref).__name__}, not a dict")
    for key in ("ref_id", "ann_id", "image_id", "split", "sentences"):
        if key not in ref:
            raise BadRecord("missing field", f"the ref has no {key!r} field")
    ann = anns.get(ref["ann_id"])
    if ann is None:
        raise BadRecord("missing annotation", f"annotation {ref['ann_id']!r} is not in instances.json")
    image = images.get(ref["image_id"])
    if image is None:
        raise BadRecord("missing image entry", f"image {ref['image_id']!r} is not in instances.json")
    width, height = check_size(image.get("width"), image.get("height"))
    xywh = ann.get("bbox")
    if not isinstance(xywh, (list, tuple)) or len(xywh) != 4:
        raise BadRecord("bbox wrong length", f"annotation {ref['ann_id']!r} has bbox {xywh!r}, not [x, y, w, h]")
    try:
        x, y, w, h = (float(v) for v in xywh)
    except (TypeError, ValueError):
        raise BadRecord("bbox not numeric", f"annotation {ref['ann_id']!r} has a non-numeric bbox {xywh!r}") from None
    bbox = check_box([x, y, x + w, y + h], width, height)
    file_name = image.get("file_name") or f"COCO_train2014_{str(ref['image_id']).zfill(12)}.jpg"
    sentences = ref["sentences"]
    if not isinstance(sentences, list) or not sentences:
        raise BadRecord("no sentences", "the ref has no sentences")
    image_path = Path(os.path.abspath(root / file_name))
    out: list[tuple[str, Sample | BadRecord]] = []
    for j, sent in enumerate(sentences):
        sent_id = sent.get("sent_id", j) if isinstance(sent, dict) else j
        where = f"sent {sent_id}"
        if not isinstance(sent, dict) or "sent" not in sent:
            out.append((where, BadRecord("missing field", f"sentence {j} of the ref has no 'sent' field")))
            continue
        try:
            expression = check_expression(sent["sent"])
        except BadRecord as err:
            out.append((where, err))
            continue
        sample = Sample(
            image=image_path,
            expression=expression,
            bbox=bbox,
            width=width,
            height=height,
            split=f"{dataset}_{ref['split']}",
            sample_id=f"{dataset}:{ref['ref_id']}:{sent_id}",
            extra={
                "dataset": dataset,
                "split_by": split_by,
                "ref_id": ref["ref_id"],
                "ann_id": ref["ann_id"],
                "image_id": ref["image_id"],
                "sent_id": sent_id,
                "category_id": ref.get("category_id", ann.get("category_id")),
            },
        )
        out.append((where, sample))
    return out
