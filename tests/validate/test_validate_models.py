"""validate on real (tiny) models: a bundle against its own checkpoint, tokenizer refusal, the CLI."""

from __future__ import annotations

import json
import shutil

import pytest

from egm_edge.cli import main
from egm_edge.errors import InputError
from egm_edge.validate import validate


def test_bundle_against_its_own_checkpoint_passes_with_zero_deltas(tiny_bundle, tiny_ckpt, dataset, tmp_path):
    path, _ = dataset
    rep = validate(tiny_bundle, tiny_ckpt, path, out_dir=tmp_path / "o", limit=3, think_budget=5, progress=False)
    assert rep.verdict == "pass", rep.failures
    assert rep.data["reference"]["kind"] == "checkpoint" and rep.data["candidate"]["kind"] == "bundle"
    assert rep.data["tokenizer_check"].startswith("same tokenizer.json")
    assert rep.data["settings"]["think_budget"] == 5 and rep.data["settings"]["max_answer_tokens"] == 16  # the bundle's cap
    o = rep.data["groups"]["overall"]
    assert o["delta"]["pairs"] == 3 and o["delta"]["miou_delta"] == 0.0 and o["delta"]["acc_delta"] == 0.0
    assert o["candidate"]["mean_think_tokens"] == o["reference"]["mean_think_tokens"] == 5.0
    rows = {s: [json.loads(x) for x in (tmp_path / "o" / f"predictions-{s}.jsonl").read_text().splitlines()] for s in ("candidate", "reference")}
    same = sum(c["result"]["text"] == r["result"]["text"] for c, r in zip(rows["candidate"], rows["reference"]))
    assert same == 3  # the runtime decodes the same tokens as the PyTorch reference


def test_different_tokenizers_are_refused(tiny_bundle, tiny_ckpt, dataset, tmp_path):
    other = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, other)
    tok = other / "tokenizer.json"
    tok.write_text(json.dumps(json.loads(tok.read_text())))  # same content, different bytes: not provably the same file
    with pytest.raises(InputError, match="tokenizer.json .* differs"):
        validate(tiny_bundle, other, dataset[0], out_dir=tmp_path / "o", progress=False)


def test_cli_exit_status_and_bad_input(tiny_bundle, tiny_ckpt, dataset, tmp_path, capsys):
    path, _ = dataset
    args = ["validate", "--candidate", str(tiny_bundle), "--reference", str(tiny_bundle), "--data", str(path),
            "--limit", "2", "--think-budget", "2", "--no-progress", "--out", str(tmp_path / "o")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "verdict: PASS" in out and "report.md" in out
    assert main([*args[:5], "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    assert main([*args[:2], str(tmp_path / "plain"), *args[3:]]) == 2  # neither a bundle nor a checkpoint
    assert "neither a bundle" in capsys.readouterr().err


@pytest.fixture(scope="module")
def grounder_dir():
    pytest.importorskip("torch")
    from egm_edge.assets import default_model_dir

    d = default_model_dir()
    if not (d / "model.safetensors").is_file():
        pytest.skip(f"the trained tiny grounder is not in {d} yet")
    return d


def scrambled(src, dst, seed=0):
    """The same checkpoint with every tensor's values permuted: same tokenizer and shapes, no skill left."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(str(src / "model.safetensors"))  # bfloat16: numpy cannot hold it
    save_file({k: v.reshape(-1)[torch.randperm(v.numel(), generator=g)].reshape(v.shape).contiguous() for k, v in tensors.items()},
              str(dst / "model.safetensors"))
    return dst


def test_a_broken_candidate_fails_the_gate(grounder_dir, tmp_path):
    # The committed grounder is under-trained (Acc@0.5 about 1%, see its model card): what it has is EGM's answer
    # format and a coarse box (mean IoU ~2 points on this set). A scrambled copy loses both, and the gate must say so.
    from egm_edge.synth import generate

    data = generate(tmp_path / "data", 16, seed=424242)
    broken = scrambled(grounder_dir, tmp_path / "broken")
    rep = validate(broken, grounder_dir, data, out_dir=tmp_path / "o", think_budget=16, progress=False)
    assert rep.verdict == "fail" and rep.exit_code == 1
    o = rep.data["groups"]["overall"]
    assert o["reference"]["parse_failure_rate"] == 0.0 and o["candidate"]["parse_failure_rate"] == 1.0
    assert o["reference"]["miou"] > 1.0 and o["delta"]["miou_delta"] < -1.0 and o["delta"]["same_box_rate"] == 0.0
    assert any(f.startswith("overall: mean IoU dropped") for f in rep.failures)
    assert rep.data["tokenizer_check"].startswith("same tokenizer.json")
