"""The refer release: plain-data pickles load, a code-running pickle is refused and never executed."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from egm_edge.data import SafeUnpickler, load_samples, safe_load_pickle
from egm_edge.errors import InputError


def _refs():
    def ref(ref_id, ann_id, image_id, split, sents):
        return {
            "ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split, "category_id": 1,
            "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg", "sent_ids": [s[0] for s in sents],
            "sentences": [{"sent_id": i, "sent": t, "raw": t, "tokens": t.split()} for i, t in sents],
        }

    return [
        ref(0, 100, 9, "val", [(0, "man on left"), (1, "left guy")]),
        ref(1, 101, 9, "testA", [(2, "woman")]),
        ref(2, 102, 25, "testB", [(3, "giraffe in back")]),
        ref(3, 103, 25, "train", [(4, "big giraffe")]),
    ]


def _instances():
    return {
        "images": [
            {"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "width": 640, "height": 480},
            {"id": 25, "file_name": "COCO_train2014_000000000025.jpg", "width": 640, "height": 426},
        ],
        "annotations": [
            {"id": 100, "image_id": 9, "bbox": [10, 20, 100, 200], "category_id": 1, "area": 1.0, "iscrowd": 0},
            {"id": 101, "image_id": 9, "bbox": [300, 20, 100, 200], "category_id": 1, "area": 1.0, "iscrowd": 0},
            {"id": 102, "image_id": 25, "bbox": [0.5, 1.5, 639.5, 424.5], "category_id": 2, "area": 1.0, "iscrowd": 0},
            {"id": 103, "image_id": 25, "bbox": [5, 5, 50, 50], "category_id": 2, "area": 1.0, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "giraffe"}],
    }


def _release(tmp_path: Path, refs=None, instances=None, name="refs(unc).p", protocol=2, dataset="refcoco") -> Path:
    d = tmp_path / "data" / dataset
    d.mkdir(parents=True)
    (d / name).write_bytes(pickle.dumps(_refs() if refs is None else refs, protocol=protocol))
    (d / "instances.json").write_text(json.dumps(_instances() if instances is None else instances))
    return d


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_refer_release_loads(tmp_path, protocol):
    d = _release(tmp_path, protocol=protocol)
    r = load_samples(d)
    assert r.format == "refer" and len(r.samples) == 5 and not r.skipped
    s = r.samples[0]
    assert s.expression == "man on left" and s.bbox == (10.0, 20.0, 110.0, 220.0)
    assert (s.width, s.height) == (640, 480) and s.split == "refcoco_val"
    assert s.image == tmp_path / "data" / "images" / "mscoco" / "images" / "train2014" / "COCO_train2014_000000000009.jpg"
    assert s.sample_id == "refcoco:0:0" and s.extra["ann_id"] == 100 and s.extra["split_by"] == "unc"
    assert r.by_split() == {"refcoco_val": 2, "refcoco_testA": 1, "refcoco_testB": 1, "refcoco_train": 1}


def test_split_selection_and_image_root(tmp_path):
    d = _release(tmp_path, dataset="refcoco+")
    for name in ("testB", "refcoco+_testB"):
        r = load_samples(d / "refs(unc).p", split=name, image_root=tmp_path / "imgs")
        assert [s.expression for s in r.samples] == ["giraffe in back"] and r.filtered == 4
        assert r.samples[0].image.parent == tmp_path / "imgs"
    with pytest.raises(InputError, match="choose from: testA, testB, train, val"):
        load_samples(d, split="test")


def test_refcocog_prefers_umd(tmp_path):
    d = _release(tmp_path, name="refs(umd).p", dataset="refcocog")
    (d / "refs(google).p").write_bytes(pickle.dumps([], protocol=2))
    r = load_samples(d)
    assert len(r.samples) == 5 and r.samples[0].extra["split_by"] == "umd" and r.samples[0].split == "refcocog_val"


def test_bad_refs_are_counted_or_raised(tmp_path):
    refs = _refs()
    refs[1]["ann_id"] = 999  # unknown annotation
    refs[2]["sentences"].append({"sent_id": 9, "sent": "  "})  # one empty sentence
    inst = _instances()
    inst["annotations"][3]["bbox"] = [600, 5, 100, 50]  # beyond the 640 px width
    d = _release(tmp_path, refs=refs, instances=inst)
    r = load_samples(d, strict=False)
    assert len(r.samples) == 3
    assert r.skipped == {"missing annotation": 1, "empty expression": 1, "bbox outside image": 1}
    with pytest.raises(InputError, match=r"refs\(unc\)\.p:ref 1: annotation 999 is not in instances.json"):
        load_samples(d)


def test_missing_instances_json(tmp_path):
    d = _release(tmp_path)
    (d / "instances.json").unlink()
    with pytest.raises(InputError, match="no instances.json"):
        load_samples(d)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, protocol):
    marker = tmp_path / "pwned"
    payload = pickle.dumps([{"ref_id": 0, "sentences": [_Evil(marker)]}], protocol=protocol)
    d = _release(tmp_path)
    (d / "refs(unc).p").write_bytes(payload)
    with pytest.raises(InputError) as e:
        load_samples(d)
    msg = str(e.value)
    assert "system" in msg and "refuses" in msg and "arbitrary code" in msg
    assert not marker.exists()


@pytest.mark.parametrize("obj", [pickle.dumps, Path("/x"), __import__("collections").OrderedDict(a=1)])
def test_any_global_is_refused(tmp_path, obj):
    p = tmp_path / "x.p"
    p.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(InputError, match="refuses"):
        safe_load_pickle(p)


def test_plain_data_including_sets_and_python2_strings(tmp_path):
    data = {"a": [1, 2.5, None, True], "b": ("caf\u00e9", "x"), "c": {3, 4}, "d": frozenset([5])}
    p = tmp_path / "ok.p"
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        p.write_bytes(pickle.dumps(data, protocol=protocol))
        assert safe_load_pickle(p) == data
    # A Python 2 `str` (SHORT_BINSTRING) holding UTF-8 bytes, as py2 cPickle wrote them.
    py2 = b"\x80\x02]q\x00U\x05caf\xc3\xa9q\x01a."
    p.write_bytes(py2)
    assert safe_load_pickle(p) == ["caf\u00e9"]
    import io

    assert SafeUnpickler(io.BytesIO(pickle.dumps([1]))).load() == [1]


def test_truncated_pickle(tmp_path):
    p = tmp_path / "t.p"
    p.write_bytes(pickle.dumps(_refs(), protocol=2)[:50])
    with pytest.raises(InputError, match="not a readable pickle"):
        safe_load_pickle(p)
