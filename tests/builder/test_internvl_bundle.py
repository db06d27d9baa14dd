"""InternVL-3 end to end: a tiny random HF-native InternVLForConditionalGeneration -> export -> CPU bundle -> Grounder.

The checkpoint is transformers' own class built from a config by `write_tiny_checkpoint(family="internvl")`
(Qwen2 language model: 2 layers, hidden 64; InternViT: 2 layers, 112 px tiles of 14 px patches, so 16
`<IMG_CONTEXT>` tokens per tile, at most 4 tiles and the thumbnail) with a small
byte-level BPE that keeps InternVL's special tokens by name and has no `</think>` token (the reasoning tags
are text, as in InternVL's Qwen2.5 tokenizer). Done when:
the bundle's greedy tokens equal transformers' `generate(do_sample=False)` on the same tiles and prompt, for
the float32 export and for one whose lm_head is int4 (round-to-nearest, MatMulNBits) against transformers
with the same rounded lm_head.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


TILE = 112
EXPRESSIONS = ("the square", "the blue circle", "the left one", "a red square")
CORPUS = ["Please provide the bounding box coordinate of the region this sentence describes: the red square",
          "<think>\nThe red square is on the left.\n</think>\n<box>[[100, 200, 300, 400]]</box>",
          "Considering the limited time by the user, I have to give the solution based on the thinking directly now."] * 20


@pytest.fixture(scope="module")
def internvl_ckpt(tmp_path_factory):
    from egm_edge.reference.checkpoint import write_tiny_checkpoint

    from egm_edge.synth.tokenizer import build_tokenizer, write_tokenizer_files

    root = tmp_path_factory.mktemp("internvl")
    write_tokenizer_files(build_tokenizer(CORPUS, vocab_size=400, family="internvl"), root / "tok", family="internvl")
    return write_tiny_checkpoint(root / "ckpt", root / "tok", seed=0, family="internvl")


@pytest.fixture(scope="module")
def internvl_bundle(tmp_path_factory, internvl_ckpt):
    from egm_edge.builder import build_cpu
    from egm_edge.export.pipeline import export

    root = tmp_path_factory.mktemp("internvl-out")
    ex = export(internvl_ckpt, root / "export", decode_steps=3)
    return build_cpu(ex, root / "bundle", max_answer_tokens=8, max_seq_len=1024)


def test_export_manifest_describes_tiles_and_1d_rope(internvl_bundle):
    m = json.loads((internvl_bundle / "manifest.json").read_text())
    export_dir = Path(m["inputs"]["export"])
    em = json.loads((export_dir / "manifest.json").read_text())
    assert em["family"] == "internvl" and em["runtime"] == m["runtime"]
    assert (export_dir / "preprocessor_config.json").is_file() and (internvl_bundle / "preprocessor_config.json").is_file()
    assert m["family"] == "internvl" and m["runtime"]["vision"]["size"] == {"height": TILE, "width": TILE}
    assert m["runtime"]["vision"]["image_seq_length"] == 16 and m["runtime"]["decoder"]["num_deepstack"] == 0
    v = m["source_validation"]
    assert v["passed"] and set(v["cases"]) == {"random", "real"} and v["cases"]["random"]["tiles"] == [2, 1]
    for case in v["cases"].values():
        assert case["outputs"]["prefill_logits"]["cosine"] >= 0.9999 and case["greedy_agreement"] == 1.0
    assert m["smoke_test"]["think_tokens"] <= 8


@pytest.fixture(scope="module")
def internvl_int4_bundle(tmp_path_factory, internvl_ckpt):
    from egm_edge.builder import build_cpu
    from egm_edge.export.pipeline import export

    root = tmp_path_factory.mktemp("internvl-int4")
    ex = export(internvl_ckpt, root / "export", decode_steps=3, lm_head="int4")
    return build_cpu(ex, root / "bundle", max_answer_tokens=8, max_seq_len=1024)


def _hf_model(ckpt, lm_head: str = "float"):
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    if lm_head != "float":  # what the export's validation compares with: the same rounded weights, in float
        from egm_edge.export import lowering

        model.lm_head = lowering.dequantized_linear(lowering.rtn_linear(model.lm_head, lm_head))
    return model


@pytest.mark.parametrize("precision", ["float32", "int4 lm_head"])
def test_bundle_greedy_tokens_equal_transformers_generate(precision, request, internvl_ckpt, scene):
    from egm_edge.runtime.grounder import Grounder
    from egm_edge.runtime.image import load_image
    from egm_edge.runtime.tiling import image_token_count, tile_image

    bundle = request.getfixturevalue("internvl_bundle" if precision == "float32" else "internvl_int4_bundle")
    g = Grounder.open(bundle)
    if precision != "float32":
        m = json.loads((bundle / "manifest.json").read_text())
        assert m["source_validation"]["passed"] and any("lm_head" in k for k in json.loads(
            (Path(m["inputs"]["export"]) / "manifest.json").read_text())["lowered_layers"])
    assert g.family.name == "internvl" and len(g.ids.think_close) > 1  # the tag is text here
    model = _hf_model(internvl_ckpt, "float" if precision == "float32" else "int4")
    tiles = tile_image(load_image(scene), g.bundle.image_processor)
    assert tiles.shape[0] > 1  # several tiles and the thumbnail
    compared = []
    for expression in EXPRESSIONS:  # a random model stops early now and then: several prompts cover enough steps
        # Unlimited reasoning: the tokens before the first forced one (the close, at the planned room) are the model's.
        events = list(g.stream(scene, expression, think_budget=None, max_answer_tokens=8, max_new_tokens=48))
        got = []
        for e in events[:-1]:
            if e.forced:
                break
            got.append(e.token_id)
        prompt = g.family.chat_prompt(g.family.user_text(expression), image_token_count(tiles.shape[0], g.bundle.image_processor))
        ids = torch.tensor([g.tok.encode(prompt, add_special_tokens=False).ids])
        assert events[-1].result.timings["prompt_tokens"] == ids.shape[1]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.from_numpy(tiles),
                                 max_new_tokens=len(got) + 1, do_sample=False,
                                 suppress_tokens=[g.image_token_id])  # never emitted: the runtime bans it too
        hf = out[0, ids.shape[1]:].tolist()
        assert got == hf[: len(got)], expression
        if not any(e.forced for e in events[:-1]):  # the bundle stopped where transformers does
            assert hf[len(got)] in g.ids.stop, expression
        compared += got
    assert len(compared) >= 24 and len(set(compared)) > 5  # enough decode steps, not one token repeated


def test_budget_closes_with_the_text_tag_and_the_image_is_cached(internvl_bundle, scene):
    from egm_edge.runtime.grounder import Grounder

    g = Grounder.open(internvl_bundle)
    r = g.ground(scene, "the red square", think_budget=5, max_answer_tokens=6)
    assert r.budget_forced and r.think_tokens == 5 and r.answer_tokens <= 6
    assert "</think>" in r.text and r.timings["vision_cached"] is False
    again = g.ground(scene, "the blue circle", think_budget=5, max_answer_tokens=6)
    assert again.timings["vision_cached"]
    events = list(g.stream(scene, "the red square", think_budget=5, max_answer_tokens=6))
    reasoning = "".join(e.text for e in events[:-1] if e.phase == "reasoning")
    assert "</think" not in reasoning and reasoning.strip() == events[-1].result.reasoning


def test_ground_cli_and_serve(internvl_bundle, scene, capsys):
    """`egm-edge ground --bundle` and the OpenAI-compatible server drive an InternVL bundle like a Qwen3-VL one."""
    import base64
    import threading
    import urllib.request

    from egm_edge.cli import main
    from egm_edge.runtime.grounder import Grounder
    from egm_edge.runtime.server import ServerConfig, serve

    argv = ["ground", "--bundle", str(internvl_bundle), "--image", str(scene), "--expr", "the red square",
            "--think-budget", "4", "--max-answer-tokens", "6", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["think_tokens"] == 4 and out["budget_forced"]

    g = Grounder.open(internvl_bundle)
    server = serve(g, ServerConfig(port=0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
        image = "data:image/png;base64," + base64.b64encode(scene.read_bytes()).decode()
        text = g.family.user_text("the red square")
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": text}]}]

        def post(**kw):
            body = json.dumps({"model": g.model_name, "messages": messages, "temperature": 0.0, **kw}).encode()
            req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())

        direct = g.generate(scene, text, think_budget=4, max_answer_tokens=6)
        resp = post(think_budget=4, max_answer_tokens=6)
        msg = resp["choices"][0]["message"]
        assert (msg["content"], msg["reasoning_content"]) == (direct.answer, direct.reasoning)
        assert resp["usage"]["completion_tokens_details"]["reasoning_tokens"] == 4
        # max_tokens inside the forced close: the cut result counts no close token as reasoning.
        cut = post(think_budget=4, max_answer_tokens=6, max_tokens=6)
        assert cut["choices"][0]["finish_reason"] == "length"
        assert cut["usage"]["completion_tokens_details"]["reasoning_tokens"] <= 5
    finally:
        server.shutdown()
        server.server_close()


def test_build_from_model_int4_awq_then_ground_matches_the_reference(internvl_ckpt, scene, tmp_path, capsys):
    """Issue 18's done-when: `egm-edge build --model <tiny InternVL> --recipe int4_awq --target cpu` (ModelOpt AWQ,
    MatMulNBits), then `egm-edge ground --bundle`; the bundle's greedy tokens equal the PyTorch reference of the
    quantized checkpoint (the dequantizing loader), budget forcing included."""
    from egm_edge.cli import main
    from egm_edge.reference import ReferenceRunner
    from egm_edge.runtime.grounder import Grounder

    calib = tmp_path / "calib.toml"
    calib.write_text('samples = 8\nholdout = 2\nseed = 0\ntask = "source"\nmax_pixels = "model"\nmin_pixels = "model"\n'
                     'max_new_tokens = 64\n\n[[sources]]\nkind = "synth"\nn = 16\nseed = 11\n')
    out = tmp_path / "bundle"
    assert main(["build", "--model", str(internvl_ckpt), "--recipe", "int4_awq", "--target", "cpu", "--calib", str(calib),
                 "--max-answer-tokens", "8", "--out", str(out)]) == 0
    assert "int4_awq block size 64" in capsys.readouterr().out  # the tiny model is 64 wide
    assert main(["ground", "--bundle", str(out), "--image", str(scene), "--expr", "the red square", "--think-budget", "6",
                 "--max-answer-tokens", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["think_tokens"] <= 6

    quantized = next(p for p in (tmp_path / "bundle-stages").iterdir() if p.name.startswith("quantize-"))
    runner, g = ReferenceRunner.open(quantized), Grounder.open(out)
    compared = []
    for expression in EXPRESSIONS:
        for budget in (None, 6):
            kw = dict(think_budget=budget, max_answer_tokens=8, max_new_tokens=40)
            got = [e.token_id for e in list(g.stream(scene, expression, **kw))[:-1]]
            prompt = runner.build_prompt(scene, expression)
            ref = runner.generate_ids(prompt.ids, prompt.image.pixel_values, prompt.image.grid_thw, **kw)
            assert got == [t for t in ref.tokens if t not in g.ids.stop], (expression, budget)
            compared += got
    assert len(set(compared)) > 5
    kw = dict(think_budget=6, max_answer_tokens=8, max_new_tokens=40)  # and the texts users read are the same
    ref_res, got_res = runner.ground(scene, EXPRESSIONS[0], **kw), g.ground(scene, EXPRESSIONS[0], **kw)
    assert ref_res.text == got_res.text and ref_res.box == got_res.box


def test_export_cli_reports_the_tiles_of_each_case(internvl_ckpt, tmp_path, capsys):
    """`egm-edge export` prints each validation case; an InternVL case has tiles, not patch grids (it crashed)."""
    from egm_edge.cli import main

    assert main(["export", "--checkpoint", str(internvl_ckpt), "--out", str(tmp_path / "ex"), "--decode-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert " random: tiles [2, 1]" in out and "greedy agreement" in out and "wrote" in out


def test_gpu_bundle_plans_tiles_and_its_ir_grounds_like_the_cpu_bundle(internvl_ckpt, scene, tmp_path):
    """A Jetson bundle of InternVL: its vision profile runs over the tile count (1 .. the largest tiling of the
    processor, whose max_patches is capped to the plan), and its float16 ONNX IR, run by ONNX Runtime, grounds."""
    from egm_edge.builder.tensorrt import build_tensorrt, graph_dtype_for
    from egm_edge.export.pipeline import export
    from egm_edge.models import spec_from_config
    from egm_edge.plan import plan
    from egm_edge.runtime.grounder import Grounder
    from egm_edge.targets import load_target

    target = load_target("jetson-orin-nano-8gb")
    ex = export(internvl_ckpt, tmp_path / "export", lowering="tensorrt", graph_dtype=graph_dtype_for(target, "fp16"),
                decode_steps=2)
    spec = spec_from_config(internvl_ckpt)
    p = plan(spec, target, "fp16", 32, image_wh=(300, 200))
    bundle = build_tensorrt(ex, tmp_path / "bundle", target, p)
    bp = json.loads((bundle / "build_plan.json").read_text())
    shapes = bp["engines"]["vision"]["profiles"][0]["shapes"]["pixel_values"]
    proc = json.loads((bundle / "preprocessor_config.json").read_text())
    grid = p.image.tiles - 1 if p.image.tiles > 1 else 1
    assert proc["max_patches"] == min(4, grid)
    assert shapes["min"] == [1, 3, TILE, TILE] and shapes["opt"][0] == p.image.tiles
    assert shapes["max"][0] == proc["max_patches"] + (1 if proc["max_patches"] > 1 else 0)
    assert bp["tokens"]["image_max"] == shapes["max"][0] * 16
    g = Grounder.open(bundle, executor="onnxruntime")
    r = g.ground(str(scene), "the red square", think_budget=3, max_answer_tokens=6)
    assert r.think_tokens <= 3 and r.timings["prompt_tokens"] > 16
