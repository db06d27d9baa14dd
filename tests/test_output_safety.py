"""Data safety on the command line (issue 17): no stage writes over its input, --force replaces only an
egm-edge artifact or an empty folder, and in-place commands (validate, sweep, demo, data synth) refuse a
folder of someone else's files. Every refusal is one sentence, exit 2, before any heavy work, nothing touched."""

from __future__ import annotations

import json

import pytest

from egm_edge.cli import main


def _files(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _fake_checkpoint(d):
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    (d / "model.safetensors").write_bytes(b"not really weights")
    (d / "tokenizer.json").write_text("{}")
    return d


def _user_dir(d):
    d.mkdir(parents=True, exist_ok=True)
    (d / "report.md").write_text("my own notes")
    (d / "worst-regressions").mkdir()
    (d / "worst-regressions" / "keep.png").write_bytes(b"png")
    return d


def _refused(capsys, argv, *needles) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    for n in needles:
        assert n in err, err
    return err


def test_export_into_its_own_checkpoint_is_refused(tmp_path, capsys):
    ck = _fake_checkpoint(tmp_path / "ck")
    before = _files(ck)
    for out in (ck, ck / "onnx"):
        _refused(capsys, ["export", "--checkpoint", str(ck), "--out", str(out), "--force"], "input", str(ck))
    assert _files(ck) == before


def test_quantize_into_the_folder_holding_its_model_is_refused(tmp_path, capsys):
    model = _fake_checkpoint(tmp_path / "P" / "model")
    before = _files(tmp_path / "P")
    _refused(capsys, ["quantize", "--model", str(model), "--recipe", "int4_awq", "--calib", "synth",
                      "--out", str(tmp_path / "P"), "--force"], "input", str(model))
    assert _files(tmp_path / "P") == before


def test_quantize_over_its_calibration_file_is_refused(tmp_path, capsys):
    model = _fake_checkpoint(tmp_path / "model")
    calib = tmp_path / "cal" / "mine.toml"
    calib.parent.mkdir()
    calib.write_text("# mine\n")
    _refused(capsys, ["quantize", "--model", str(model), "--recipe", "int4_awq", "--calib", str(calib),
                      "--out", str(tmp_path / "cal"), "--force"], "input", str(calib))
    assert calib.read_text() == "# mine\n"


def test_build_force_never_wipes_user_files(tmp_path, capsys):
    export = _fake_checkpoint(tmp_path / "export")
    out = _user_dir(tmp_path / "mine")
    before = _files(out)
    _refused(capsys, ["build", "--target", "cpu", "--export", str(export), "--out", str(out), "--force"],
             "not an egm-edge artifact", str(out))
    _refused(capsys, ["build", "--target", "cpu", "--export", str(export), "--out", str(tmp_path), "--force"], "input")
    assert _files(out) == before


def test_build_from_model_checks_out_against_model_and_stages(tmp_path, capsys):
    model = _fake_checkpoint(tmp_path / "model")
    out = _user_dir(tmp_path / "mine")
    before = _files(out)
    base = ["build", "--model", str(model), "--recipe", "full", "--target", "cpu"]
    _refused(capsys, [*base, "--out", str(out), "--force"], "not an egm-edge artifact")
    _refused(capsys, [*base, "--out", str(model), "--force"], "input")
    _refused(capsys, [*base, "--out", str(tmp_path / "b"), "--work-dir", str(tmp_path / "b" / "stages")], "stage")
    _refused(capsys, [*base, "--out", str(tmp_path / "b"), "--work-dir", str(model / "stages")], "input")
    assert _files(out) == before and not (tmp_path / "b").exists() and not (model / "stages").exists()


def test_validate_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    out = _user_dir(tmp_path / "mine")
    before = _files(out)
    data = tmp_path / "d.jsonl"
    data.write_text("")
    argv = ["validate", "--candidate", str(tmp_path / "cand"), "--reference", str(tmp_path / "ref"), "--data", str(data),
            "--out", str(out), "--no-progress"]
    _refused(capsys, argv, "--force", str(out))
    _refused(capsys, [*argv, "--force"], "not an egm-edge artifact")
    assert _files(out) == before


def test_sweep_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    out = _user_dir(tmp_path / "mine")
    before = _files(out)
    data = tmp_path / "d.jsonl"
    data.write_text("")
    model = _fake_checkpoint(tmp_path / "model")
    argv = ["sweep", "--model", str(model), "--data", str(data), "--out", str(out), "--no-progress"]
    _refused(capsys, argv, "--force", str(out))
    _refused(capsys, [*argv, "--force"], "not an egm-edge artifact")
    _refused(capsys, ["sweep", "--model", str(model), "--data", str(data), "--out", str(model / "sweep")], "input")
    assert _files(out) == before


def test_demo_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    out = _user_dir(tmp_path / "mine")
    before = _files(out)
    # A fake --model: were the folder not refused at once, the demo would stop at its first model read.
    _refused(capsys, ["demo", "--out", str(out), "--n", "1", "--model", str(_fake_checkpoint(tmp_path / "m"))], "--force", str(out))
    assert _files(out) == before


def test_demo_default_output_is_under_the_user_cache(tmp_path, capsys, monkeypatch):
    import egm_edge.demo as demo
    from egm_edge.cli import build_parser

    monkeypatch.delenv("EGM_EDGE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    seen = {}

    def fake_run_demo(out_dir=None, **kw):
        seen["out"] = out_dir
        return demo.DemoResult(demo.default_out_dir() if out_dir is None else out_dir, "summary")

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert main(["demo"]) == 0
    where = tmp_path / "xdg" / "egm-edge" / "demo"
    assert seen["out"] in (None, where) and demo.default_out_dir() == where
    assert str(where) in capsys.readouterr().out
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.default_out_dir() == tmp_path / "home" / ".cache" / "egm-edge" / "demo"
    helptext = build_parser()._subparsers._group_actions[0].choices["demo"].format_help()
    assert "cache" in helptext and "./egm-edge-demo" not in helptext


def test_data_synth_refuses_user_files_and_replaces_its_own_set_on_force(tmp_path, capsys):
    out = _user_dir(tmp_path / "mine")
    before = _files(out)
    _refused(capsys, ["data", "synth", "--out", str(out), "--n", "1"], "--force", str(out))
    _refused(capsys, ["data", "synth", "--out", str(out), "--n", "1", "--force"], "not an egm-edge artifact")
    assert _files(out) == before
    s = tmp_path / "set"
    assert main(["data", "synth", "--out", str(s), "--n", "2"]) == 0
    _refused(capsys, ["data", "synth", "--out", str(s), "--n", "1"], "--force")
    assert main(["data", "synth", "--out", str(s), "--n", "1", "--force"]) == 0
    assert len((s / "samples.jsonl").read_text().splitlines()) == 1 and sorted(p.name for p in (s / "images").iterdir()) == ["000000.png"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
