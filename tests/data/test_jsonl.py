"""EGM eval JSONL: fields and variants as EGM reads them, strict/lenient accounting, round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from egm_edge.data import load_samples, write_jsonl
from egm_edge.errors import InputError


def _write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _rec(**kw):
    rec = {"image": "img/a.jpg", "sent": "the man on the left", "bbox": [10, 20, 110, 220], "height": 240, "width": 320}
    rec.update(kw)
    return rec


def test_basic_fields_and_resolution(tmp_path):
    p = _write(tmp_path / "refcoco_val.jsonl", [_rec(), _rec(id=7, sent="  red   car ")])
    r = load_samples(p)
    assert r.format == "egm_jsonl" and len(r.samples) == 2 and not r.skipped
    s0, s1 = r.samples
    assert s0.image == tmp_path / "img" / "a.jpg" and s0.image.is_absolute()
    assert s0.bbox == (10.0, 20.0, 110.0, 220.0) and (s0.width, s0.height) == (320, 240)
    assert s0.split == "refcoco_val" and s0.task == "vanilla" and s0.sample_id == "refcoco_val:1"
    assert s1.expression == "red car" and s1.sample_id == "7"
    assert r.summary().startswith("2 samples from refcoco_val.jsonl (egm_jsonl): refcoco_val 2")


def test_image_root_strips_leading_slash_like_egm(tmp_path):
    p = _write(tmp_path / "x.jsonl", [_rec(image="/coco/train2014/a.jpg")])
    s = load_samples(p, image_root=tmp_path / "imgs").samples[0]
    assert s.image == tmp_path / "imgs" / "coco" / "train2014" / "a.jpg"


def test_variants_modal_bbox_conversations_split_task_and_json_list(tmp_path):
    conv = {
        "image": "a.jpg", "height": 200, "width": 400,
        "conversations": [
            {"from": "human", "value": "<image>\nPlease provide the bounding box coordinate of the region this sentence describes: <ref>the cat</ref>"},
            {"from": "gpt", "value": "<box>[[100, 250, 500, 750]]</box>"},
        ],
    }
    modal = {"image": "a.jpg", "sent": "cup", "modal_bbox": [1, 2, 30, 40], "height": 200, "width": 400, "task": "amodal"}
    p = tmp_path / "mixed.json"
    p.write_text(json.dumps([conv, modal, _rec(split="refcoco+_testA", question_id="q9")]))
    a, b, c = load_samples(p).samples
    assert a.expression == "the cat" and a.bbox == (40.0, 50.0, 200.0, 150.0)  # 0..1000 -> pixels
    assert b.bbox == (1.0, 2.0, 30.0, 40.0) and b.task == "amodal" and b.extra["modal_bbox"] == [1, 2, 30, 40]
    assert c.split == "refcoco+_testA" and c.sample_id == "q9" and a.sample_id == "mixed:record 1"


BAD = [
    ("not json", "bad json"),
    ("[1, 2]", "not an object"),
    (json.dumps({"image": "a.jpg", "sent": "x", "bbox": [0, 0, 1, 1], "width": 10}), "missing field"),
    (json.dumps(_rec(bbox=[1, 2, 3])), "bbox wrong length"),
    (json.dumps(_rec(bbox=[1, "2", 3, 4])), "bbox not numeric"),
    (json.dumps(_rec(bbox="1,2,3,4")), "bbox not a list"),
    (json.dumps(_rec(bbox=[50, 20, 40, 220])), "degenerate bbox"),
    (json.dumps(_rec(bbox=[10, 20, 10, 220])), "degenerate bbox"),
    (json.dumps(_rec(bbox=[10, 20, 325, 220])), "bbox outside image"),
    (json.dumps(_rec(bbox=[-5, 20, 100, 220])), "bbox outside image"),
    (json.dumps(_rec(width=0)), "bad image size"),
    (json.dumps(_rec(height=12.5)), "bad image size"),
    (json.dumps(_rec(sent="   ")), "empty expression"),
    (json.dumps(_rec(task="fuzzy")), "unknown task"),
    (json.dumps({k: v for k, v in _rec().items() if k != "sent"}), "missing field"),
]


@pytest.mark.parametrize("line, reason", BAD, ids=[f"{i}-{r}" for i, (_, r) in enumerate(BAD)])
def test_strict_names_file_line_and_reason(tmp_path, line, reason):
    p = _write(tmp_path / "d.jsonl", [_rec(), line])
    with pytest.raises(InputError) as e:
        load_samples(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:2: ") and "--lenient" in msg and "\n" not in msg


def test_lenient_counts_every_reason(tmp_path):
    p = _write(tmp_path / "d.jsonl", [_rec()] + [line for line, _ in BAD] + ["", _rec()])
    r = load_samples(p, strict=False)
    assert len(r.samples) == 2
    expected: dict[str, int] = {}
    for _, reason in BAD:
        expected[reason] = expected.get(reason, 0) + 1
    assert r.skipped == expected
    assert sum(r.skipped.values()) == len(r.skipped_lines) == len(BAD)
    assert r.skipped_lines[0][0] == "2"  # file line numbers; the blank line is not a record
    assert "skipped 15" in r.summary()


def test_box_tolerance_is_one_pixel(tmp_path):
    p = _write(tmp_path / "d.jsonl", [_rec(bbox=[-1, -0.5, 321, 241])])
    assert load_samples(p).samples[0].bbox == (-1.0, -0.5, 321.0, 241.0)


def test_split_filter_counts_others(tmp_path):
    p = _write(tmp_path / "d.jsonl", [_rec(split="a"), _rec(split="b"), _rec(split="a")])
    r = load_samples(p, split="a")
    assert len(r.samples) == 2 and r.filtered == 1 and "1 of other splits left out" in r.summary()


def test_check_images_missing_and_size_mismatch(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (320, 240)).save(tmp_path / "img" / "a.jpg")
    Image.new("RGB", (100, 100)).save(tmp_path / "img" / "b.jpg")
    p = _write(tmp_path / "d.jsonl", [_rec(), _rec(image="img/b.jpg"), _rec(image="img/none.jpg")])
    assert len(load_samples(p).samples) == 3  # images are not touched unless asked
    r = load_samples(p, strict=False, check_images=True)
    assert len(r.samples) == 1 and r.skipped == {"image size mismatch": 1, "missing image": 1}
    with pytest.raises(InputError, match=r"d\.jsonl:2: image .*b\.jpg is 100x100, the record says 320x240"):
        load_samples(p, check_images=True)


def test_round_trip(tmp_path):
    (tmp_path / "data").mkdir()
    outside = tmp_path.parent / "elsewhere.jpg"
    records = [
        _rec(id="a", image="img/a.jpg", extra_field={"k": [1, 2]}),
        _rec(id="b", image=str(outside), split="refcocog_test", task="amodal", bbox=[0.5, 1.25, 300.75, 239.5]),
    ]
    src = _write(tmp_path / "src.jsonl", records)
    first = load_samples(src).samples
    out = tmp_path / "out.jsonl"
    assert write_jsonl(first, out) == 2
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written[0]["image"] == "img/a.jpg" and written[1]["image"] == str(outside)
    assert load_samples(out).samples == first
    # relative to an image root, as EGM's BASE_IMG_DIR
    out2 = tmp_path / "data" / "rooted.jsonl"
    write_jsonl(first[:1], out2, image_root=tmp_path)
    assert json.loads(out2.read_text())["image"] == "img/a.jpg"
    assert load_samples(out2, image_root=tmp_path).samples == first[:1]
    with pytest.raises(InputError, match="not under the image root"):
        write_jsonl(first, tmp_path / "data" / "bad.jsonl", image_root=tmp_path / "data")
    assert not (tmp_path / "data" / "bad.jsonl").exists() and not (tmp_path / "data" / "bad.jsonl.tmp").exists()


@pytest.mark.parametrize(
    "content, needle",
    [(b"", "is empty"), (b"hello world", "neither JSON lines nor JSON"), (b'{"a": 1}\n\xff\xfe\n', "not UTF-8")],
)
def test_unreadable_files(tmp_path, content, needle):
    p = tmp_path / "f.jsonl"
    p.write_bytes(content)
    with pytest.raises(InputError, match=needle):
        load_samples(p)


def test_missing_path_and_plain_directory(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_samples(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="holds none of"):
        load_samples(tmp_path)
