"""`egm-edge data check`: counts per split, skipped reasons, exit 2 on a bad record in strict mode."""

from __future__ import annotations

import json

from egm_edge.cli import main


def _file(tmp_path):
    rec = {"image": "a.jpg", "sent": "dog", "bbox": [1, 2, 30, 40], "height": 50, "width": 60}
    lines = [json.dumps(rec), json.dumps({**rec, "split": "other"}), json.dumps({**rec, "bbox": [50, 2, 10, 40]}), "{oops"]
    p = tmp_path / "refcoco_val.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_strict_error_exits_2(tmp_path, capsys):
    p = _file(tmp_path)
    assert main(["data", "check", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"{p}:3: bbox [50, 2, 10, 40] is degenerate" in err and err.count("\n") == 1


def test_lenient_report(tmp_path, capsys):
    p = _file(tmp_path)
    assert main(["data", "check", str(p), "--lenient", "--check-images", "--image-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "0 samples from refcoco_val.jsonl" in out
    for needle in ("missing image", "degenerate bbox", "bad json", "refcoco_val.jsonl:4: the line is not valid JSON"):
        assert needle in out
    assert main(["data", "check", str(p), "--lenient"]) == 0
    out = capsys.readouterr().out
    assert "2 samples" in out and "other" in out and "refcoco_val" in out and "images not checked" in out


def test_coco_file_report(coco128_dir, capsys):
    assert main(["data", "check", str(coco128_dir / "annotations" / "instances_train2017.json")]) == 0
    assert "128 images, 929 instances" in capsys.readouterr().out


def test_subcommand_required(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        main(["data"])
    assert e.value.code == 2
