"""Export of a tiny Qwen3-VL: graphs, manifest, validation figures, greedy decoding and clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from egm_edge.errors import CheckpointError, EgmError


def _sessions(out: Path):
    import onnxruntime as ort

    return (ort.InferenceSession(str(out / "vision.onnx"), providers=["CPUExecutionProvider"]),
            ort.InferenceSession(str(out / "decoder.onnx"), providers=["CPUExecutionProvider"]))


def _image_inputs(ckpt: Path, size, seed=1):
    from egm_edge.export.validate import _render
    from egm_edge.runtime.preprocess import ImageProcessorConfig, preprocess_image

    return preprocess_image(_render(*size, np.random.default_rng(seed)), ImageProcessorConfig.from_json(ckpt / "preprocessor_config.json"))


def _prompt_ids(ckpt: Path, n_image_tokens: int) -> list[int]:
    from tokenizers import Tokenizer

    from egm_edge.models.families import get_family

    fam = get_family("qwen3_vl")
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    return tok.encode(fam.chat_prompt(fam.user_text("the red circle"), n_image_tokens), add_special_tokens=False).ids


def test_manifest_records_inputs_graphs_and_passing_figures(exported, small_checkpoint):
    m = json.loads((exported / "manifest.json").read_text())
    assert m["stage"] == "export" and m["precision"] == "full" and m["opset"] >= 18
    assert m["family"] == "qwen3_vl" and m["architecture"] == "Qwen3VLForConditionalGeneration"
    assert m["inputs"]["sha256"]["model.safetensors"] and m["inputs"]["sha256"]["config.json"]
    assert set(m["graphs"]) == {"vision", "decoder"}
    assert m["graphs"]["decoder"]["external_data"] is None and not list(exported.glob("*.data"))
    for name in ("vision.onnx", "decoder.onnx", "tokenizer.json", "preprocessor_config.json", "config.json"):
        assert (exported / name).is_file(), name
    v = m["validation"]
    assert v["passed"] and set(v["cases"]) == {"random", "real"}
    assert len(v["cases"]["random"]["grids"]) == 2  # two image sizes in one call
    for case in v["cases"].values():
        assert case["greedy_agreement"] == 1.0 and case["tie_steps"] + case["decided_steps"] == v["steps"]
        for fig in case["outputs"].values():
            assert fig["cosine"] >= v["threshold"]["cosine"] and fig["rel_max_abs"] <= v["threshold"]["rel_max_abs"]
    rt = m["runtime"]
    assert rt["decoder"]["num_layers"] == 2 and rt["vision"]["spatial_merge_size"] == 2
    assert {"load", "export_vision", "export_decoder", "validate", "total"} <= set(m["timings_s"])


def test_graph_io_matches_the_documented_tables(exported):
    import onnx

    from egm_edge.export.graphs import decoder_io_names, vision_io_names

    def io(name):
        g = onnx.load(str(exported / name), load_external_data=False).graph
        dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
        return {v.name: dims(v) for v in g.input}, {v.name: dims(v) for v in g.output}

    vin, vout = io("vision.onnx")
    assert list(vin) == vision_io_names()[0] and list(vout) == vision_io_names()[1]
    assert vin["pixel_patches"] == ["patches", 3 * 2 * 16 * 16] and vout["deepstack_features"] == [1, "image_tokens", 64]
    din, dout = io("decoder.onnx")
    assert (list(din), list(dout)) == decoder_io_names(2)
    assert din["past_key_values.1.value"] == ["batch", 2, "past_seq", 16]
    assert dout["present.0.key"] == ["batch", 2, "total_seq", 16]
    assert din["position_ids"] == [3, "batch", "seq"] and dout["logits"][:2] == ["batch", "logit_rows"]


def test_greedy_tokens_of_onnxruntime_equal_transformers(exported, small_checkpoint):
    torch = pytest.importorskip("torch")
    from transformers import Qwen3VLForConditionalGeneration

    from egm_edge.runtime.mrope import decode_position_ids, rope_index
    from egm_edge.runtime.vision_inputs import VisionGridConfig, vision_grid_inputs

    steps = 10
    m = json.loads((exported / "manifest.json").read_text())["runtime"]
    vcfg, dcfg = VisionGridConfig.from_dict(m["vision"]), m["decoder"]
    pre = _image_inputs(small_checkpoint, (240, 330))
    ids = np.asarray([_prompt_ids(small_checkpoint, pre.n_image_tokens)], np.int64)

    model = Qwen3VLForConditionalGeneration.from_pretrained(small_checkpoint, dtype=torch.float32).eval()
    t_ids = torch.from_numpy(ids)
    with torch.no_grad():
        out = model.generate(input_ids=t_ids, attention_mask=torch.ones_like(t_ids), pixel_values=torch.from_numpy(pre.pixel_values),
                             image_grid_thw=torch.tensor([pre.grid_thw]), mm_token_type_ids=(t_ids == dcfg["image_token_id"]).int(),
                             max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    hf_tokens = out[0, ids.shape[1]:].tolist()

    vision, decoder = _sessions(exported)
    feats, deep = vision.run(None, {"pixel_patches": pre.pixel_values, **vision_grid_inputs([pre.grid_thw], vcfg)})
    pos, delta = rope_index(ids, [pre.grid_thw], dcfg["image_token_id"], vcfg.spatial_merge_size)
    n = dcfg["num_layers"]
    past = {f"past_key_values.{i}.{kv}": np.zeros((1, dcfg["num_kv_heads"], 0, dcfg["head_dim"]), np.float32)
            for i in range(n) for kv in ("key", "value")}
    feeds = {"input_ids": ids, "image_features": feats, "deepstack_features": deep, "position_ids": pos,
             "attention_mask": np.ones_like(ids), "logits_index": np.asarray([[ids.shape[1] - 1]])}
    tokens, s = [], ids.shape[1]
    eos = set(json.loads((small_checkpoint / "generation_config.json").read_text())["eos_token_id"])
    for k in range(steps):
        res = decoder.run(None, {**feeds, **past})
        logits = res[0][0, -1].copy()
        if k < steps - 1:
            logits[list(eos)] = -np.inf  # what min_new_tokens does on the transformers side
        tokens.append(int(logits.argmax()))
        past = dict(zip(past, res[1:]))
        feeds = {"input_ids": np.asarray([[tokens[-1]]]), "image_features": feats[:0], "deepstack_features": deep[:, :0],
                 "position_ids": decode_position_ids([s + k], delta), "attention_mask": np.ones((1, s + k + 1), np.int64),
                 "logits_index": np.zeros((1, 1), np.int64)}
    assert tokens == hf_tokens


@pytest.mark.parametrize("lowering", ["onnxruntime", "tensorrt"])
def test_padded_batch_of_two_images_matches_transformers(lowering, request, small_checkpoint):
    exported = request.getfixturevalue("exported" if lowering == "onnxruntime" else "exported_trt")
    torch = pytest.importorskip("torch")
    from transformers import Qwen3VLForConditionalGeneration

    from egm_edge.runtime.mrope import rope_index
    from egm_edge.runtime.vision_inputs import VisionGridConfig, vision_grid_inputs

    m = json.loads((exported / "manifest.json").read_text())["runtime"]
    vcfg, dcfg = VisionGridConfig.from_dict(m["vision"]), m["decoder"]
    images = [_image_inputs(small_checkpoint, (256, 256), 2), _image_inputs(small_checkpoint, (200, 380), 3)]
    rows = [_prompt_ids(small_checkpoint, im.n_image_tokens) for im in images]
    width = max(map(len, rows))
    ids = np.zeros((2, width), np.int64)
    mask = np.zeros((2, width), np.int64)
    for b, r in enumerate(rows):  # left padding, as batched generation uses
        ids[b, width - len(r):], mask[b, width - len(r):] = r, 1
    grids = [im.grid_thw for im in images]
    pixels = np.concatenate([im.pixel_values for im in images])

    model = Qwen3VLForConditionalGeneration.from_pretrained(small_checkpoint, dtype=torch.float32).eval()
    t_ids = torch.from_numpy(ids)
    with torch.no_grad():
        ref = model(input_ids=t_ids, attention_mask=torch.from_numpy(mask), pixel_values=torch.from_numpy(pixels),
                    image_grid_thw=torch.tensor(grids), mm_token_type_ids=(t_ids == dcfg["image_token_id"]).int()).logits[:, -1]

    vision, decoder = _sessions(exported)
    feats, deep = vision.run(None, {"pixel_patches": pixels, **vision_grid_inputs(grids, vcfg)})
    pos, _ = rope_index(ids, grids, dcfg["image_token_id"], vcfg.spatial_merge_size, attention_mask=mask)
    past = {f"past_key_values.{i}.{kv}": np.zeros((2, dcfg["num_kv_heads"], 0, dcfg["head_dim"]), np.float32)
            for i in range(dcfg["num_layers"]) for kv in ("key", "value")}
    logits = decoder.run(["logits"], {"input_ids": ids, "image_features": feats, "deepstack_features": deep, "position_ids": pos,
                                      "attention_mask": mask, "logits_index": np.full((2, 1), width - 1), **past})[0][:, 0]
    cos = (logits * ref.numpy()).sum(-1) / np.linalg.norm(logits, axis=-1) / np.linalg.norm(ref.numpy(), axis=-1)
    assert cos.min() >= 0.9999 and np.abs(logits - ref.numpy()).max() < 1e-3


def test_validation_miss_raises_with_figures(exported, small_checkpoint, monkeypatch):
    torch = pytest.importorskip("torch")
    from transformers import Qwen3VLForConditionalGeneration

    from egm_edge.export import validate
    from egm_edge.runtime.vision_inputs import VisionGridConfig

    m = json.loads((exported / "manifest.json").read_text())["runtime"]
    model = Qwen3VLForConditionalGeneration.from_pretrained(small_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():  # a corrupted reference stands in for a broken graph
        model.lm_head.weight.mul_(-1)
    with pytest.raises(EgmError, match=r"disagree with the PyTorch reference.*cosine"):
        validate.validate_export(exported, model, small_checkpoint, VisionGridConfig.from_dict(m["vision"]), m["decoder"], steps=1,
                                 family="qwen3_vl")


def test_big_graphs_keep_weights_in_one_side_file(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    import onnx
    import onnxruntime as ort

    from egm_edge.export import onnx_io

    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    lin = torch.nn.Linear(64, 32).eval()
    x = torch.randn(3, 64)
    files = onnx_io.export_graph(lin, (x,), tmp_path / "g.onnx", ["x"], ["y"], ({0: torch.export.Dim.DYNAMIC},),
                                 {"x": ["rows", None], "y": ["rows", None]}, onnx_io.weight_bytes(lin))
    assert files == ["g.onnx", "g.onnx.data"] and not (tmp_path / "g.onnx.data").is_symlink()
    assert (tmp_path / "g.onnx.data").stat().st_size >= 64 * 32 * 4
    g = onnx.load(str(tmp_path / "g.onnx"), load_external_data=False).graph
    assert [d.dim_param or d.dim_value for d in g.input[0].type.tensor_type.shape.dim] == ["rows", 64]
    y = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(y, lin(x).detach().numpy(), atol=1e-5)


def test_clear_errors_before_any_work(tmp_path, small_checkpoint, limit_family):
    from egm_edge.export import export
    from egm_edge.export.onnx_io import check_disk_space

    with pytest.raises(CheckpointError, match="does not exist"):
        export(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        export(tmp_path / "empty", tmp_path / "out")
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(EgmError, match="Unsupported architecture"):
        export(other, tmp_path / "out")
    from egm_edge.errors import UnsupportedError
    from egm_edge.models import get_spec, to_hf_config

    internvl = tmp_path / "internvl"  # a family the registry knows; here its record does not list export
    internvl.mkdir()
    (internvl / "config.json").write_text(json.dumps(to_hf_config(get_spec("egm-internvl3-1b"))))
    limit_family("internvl", "plan")
    with pytest.raises(UnsupportedError, match="InternVL-3 family, which egm-edge's export stage does not run yet"):
        export(internvl, tmp_path / "out")
    quant = tmp_path / "quant"
    shutil.copytree(small_checkpoint, quant)
    (quant / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "FP8"}}))
    with pytest.raises(CheckpointError, match="says fp8 but holds no quantized Linear weights"):
        export(quant, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(EgmError, match="not an egm-edge artifact"):
        export(small_checkpoint, busy, force=True)
    with pytest.raises(EgmError, match="Not enough disk space"):
        check_disk_space(tmp_path, 1 << 60)


def test_cli_reports_a_bad_checkpoint_in_one_sentence(tmp_path):
    r = subprocess.run([sys.executable, "-m", "egm_edge", "export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("egm-edge export: error: Checkpoint directory") and "Traceback" not in r.stderr


def test_fp32_graphs_pass_the_tensorrt_parser_contract(exported_trt):
    from egm_edge.builder.trt_contract import check_graph

    for name in ("vision.onnx", "decoder.onnx"):
        report = check_graph(exported_trt / name)
        assert report.ok, report.problems


def test_attention_is_fused_for_onnxruntime_and_plain_for_tensorrt(exported, exported_trt):
    import onnx

    def ops(d):
        return [n.op_type for n in onnx.load(str(d / "decoder.onnx"), load_external_data=False).graph.node]

    n_layers = json.loads((exported / "manifest.json").read_text())["runtime"]["decoder"]["num_layers"]
    assert ops(exported).count("GroupQueryAttention") == n_layers and "Softmax" not in ops(exported)
    assert ops(exported).count("MRotaryEmbedding") == 2 * n_layers and "Neg" not in ops(exported)
    assert ops(exported).count("SkipSimplifiedLayerNormalization") == 2 * n_layers
    skips = [n for n in onnx.load(str(exported / "decoder.onnx"), load_external_data=False).graph.node
             if n.op_type == "SkipSimplifiedLayerNormalization"]
    assert all(list(n.output)[1:3] == ["", ""] and n.output[0] and n.output[3] for n in skips)  # no unused statistics
    assert "GroupQueryAttention" not in ops(exported_trt) and "Softmax" in ops(exported_trt)
    kv = [json.loads((d / "manifest.json").read_text())["runtime"]["decoder"]["kv_cache"] for d in (exported, exported_trt)]
    assert kv == ["in_place", "growing"]
    # The check that ships with the export: ONNX Runtime on each graph agreed with PyTorch.
    for d in (exported, exported_trt):
        assert json.loads((d / "manifest.json").read_text())["validation"]["passed"]


def test_too_old_toolchain_is_named(monkeypatch):
    from importlib import metadata

    from egm_edge.errors import UnsupportedError
    from egm_edge.export import onnx_io

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "1.15.0" if name == "onnxruntime" else real(name))
    with pytest.raises(UnsupportedError, match=r"onnxruntime 1\.15\.0 is too old.*>= 1\.20"):
        onnx_io.check_environment()
    monkeypatch.setattr(metadata, "version", real)
    with pytest.raises(UnsupportedError, match="opset"):
        onnx_io.check_environment(opset=999)


def _reference_model(small_checkpoint):
    torch = pytest.importorskip("torch")
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(small_checkpoint, dtype=torch.float32).eval()


def test_fp32_rounding_past_the_max_abs_bound_is_arbitrated_by_float64(exported, small_checkpoint, monkeypatch):
    """A max-abs bound below fp32 rounding (as at 24 layers x 784 tokens) is settled by exact arithmetic."""
    from egm_edge.export import arbiter, validate
    from egm_edge.runtime.vision_inputs import VisionGridConfig

    m = json.loads((exported / "manifest.json").read_text())["runtime"]
    monkeypatch.setitem(validate.THRESHOLDS, "full", validate.Threshold(cosine=0.9999, rel_max_abs=1e-9))
    report = validate.validate_export(exported, _reference_model(small_checkpoint), small_checkpoint,
                                      VisionGridConfig.from_dict(m["vision"]), m["decoder"], steps=2, family="qwen3_vl")
    verdicts = report["arbiter"]
    assert report["passed"] and {"random/prefill_logits", "random/kv_cache"} <= set(verdicts)
    for v in verdicts.values():  # both sides are rounding away from float64, neither is exact
        assert v["passed"] and 0 < v["export_vs_float64"] <= arbiter.SLACK * v["reference_vs_float64"], verdicts


def test_a_real_max_abs_error_is_not_excused_by_the_float64_arbiter(exported, small_checkpoint):
    """Logits off by 1% with a perfect cosine (a scaled lm_head) fail: float64 sides with the reference."""
    torch = pytest.importorskip("torch")
    from egm_edge.export import validate
    from egm_edge.runtime.vision_inputs import VisionGridConfig

    m = json.loads((exported / "manifest.json").read_text())["runtime"]
    model = _reference_model(small_checkpoint)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.01)
    with pytest.raises(EgmError, match=r"prefill_logits: cosine 1\.0+ .*of max \|float64\| against PyTorch fp32's own"):
        validate.validate_export(exported, model, small_checkpoint, VisionGridConfig.from_dict(m["vision"]), m["decoder"], steps=1,
                                 family="qwen3_vl")


def test_greedy_flips_on_ties_are_told_apart_from_real_disagreements():
    """Random-weight logits are flat: where the reference's top-2 margin is within twice the step's logits error,
    either token is what the precision computes (a tie, host-dependent); a flip elsewhere is a real one."""
    from egm_edge.export.validate import greedy_figures

    v = 6
    ref_steps = [np.array([0.0, 5.0, 4.99, 0, 0, 0]), np.array([9.0, 0, 0, 0, 0, 1.0]), np.array([0, 0, 3.0, 0, 0, 0])]
    noise = 0.02  # max |error| per step
    got_steps = [r + noise * np.sign(np.arange(v) - 1.5) for r in ref_steps]  # step 0: token 2 overtakes token 1
    pack = lambda steps: {"prefill_logits": steps[0][None, None], "decode_logits": np.stack([s[None] for s in steps[1:]])}  # noqa: E731
    ref = {**pack(ref_steps), "tokens": [int(np.argmax(s)) for s in ref_steps]}
    got = {**pack(got_steps), "greedy": [int(np.argmax(s)) for s in got_steps]}
    figs = greedy_figures(got, ref)
    assert got["greedy"][0] != ref["tokens"][0]  # the flip is on the tie
    assert figs == {"greedy_agreement": 2 / 3, "tie_steps": 1, "decided_steps": 2, "greedy_agreement_decided": 1.0}
    got["greedy"][1] = 5  # a flip where the margin (8) dwarfs the error: a real disagreement
    assert greedy_figures(got, ref)["greedy_agreement_decided"] == 0.5
