"""InternVL-3 through the quantize stage: calibration rendering, ModelOpt PTQ under the project policy, the
quantizer census, export, and the dequantizing loader against ModelOpt's fake quantization.

The tiny InternVL (egm_edge.reference.checkpoint): Qwen2 hidden 64 / intermediate 128, so INT4 takes blocks of
64 (`choose_int4_block`). Metrics as in test_roundtrip.py: the loader's weights sit on ModelOpt's grid points
(rounding ties allowed) and the loader's logits against the fake-quantized model have per-position cosine
>= 0.999 (measured: see the per-recipe comments in CASES); against the full model the mean cosine stays
below 1 and above 0.9.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("modelopt")

from test_roundtrip import COSINE_MIN, assert_same_grid_points, grid_step  # noqa: E402  (tests/quantize is on sys.path)

CORPUS = [
    "Please provide the bounding box coordinate of the region this sentence describes: <ref>the red circle</ref> ",
    "Please provide the amodal bounding box coordinate of the region this sentence describes: <ref>a square</ref>",
    "<think>\nThe red square is on the left.\n</think>\n\n<box>[[12, 340, 200, 560]]</box>",
] * 20
FAMILY = "internvl"
CASES = [("fp8", None), ("int4_awq", None), ("fp8", "fp8")]


@pytest.fixture(scope="module")
def ivl_ckpt(tmp_path_factory):
    from egm_edge.reference.checkpoint import write_tiny_checkpoint
    from egm_edge.synth.tokenizer import build_tokenizer, write_tokenizer_files

    tok = tmp_path_factory.mktemp("ivl_tok")
    write_tokenizer_files(build_tokenizer(CORPUS, 320, family=FAMILY), tok, family=FAMILY)
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ivl_ckpt") / "tiny-internvl", tok, seed=0, family=FAMILY)


@pytest.fixture(scope="module")
def ivl_items(tmp_path_factory, ivl_ckpt, make_calib):
    """Rendered calibration sequences (2 calibration + 2 held out) with up to 4 tiles + thumbnail per image."""
    from tokenizers import Tokenizer

    from egm_edge.quantize import calibset
    from egm_edge.quantize.calibration import sample_task, select_samples
    from egm_edge.runtime.tiling import TilingConfig

    recipe = make_calib(max_pixels="model")
    calib, hold, _ = select_samples(recipe, tmp_path_factory.mktemp("ivl_sources"))
    tok = Tokenizer.from_file(str(ivl_ckpt / "tokenizer.json"))
    tiles = TilingConfig.from_json(ivl_ckpt / "preprocessor_config.json")
    image_token = tok.token_to_id("<IMG_CONTEXT>")
    items = [calibset.render(s, sample_task(recipe, s), tok, tiles, image_token, FAMILY) for s in calib + hold]
    return items, image_token


def test_render_matches_the_reference_runner(ivl_ckpt, ivl_items, tmp_path, make_calib):
    from egm_edge.quantize import calibset
    from egm_edge.quantize.calibration import sample_task, select_samples
    from egm_edge.reference import ReferenceRunner
    from egm_edge.runtime.tiling import TilingConfig

    runner = ReferenceRunner.open(ivl_ckpt)
    recipe = make_calib(max_pixels="model")
    calib, _, _ = select_samples(recipe, tmp_path / "sources")
    s = calib[0]
    r = calibset.render(s, sample_task(recipe, s), runner.tokenizer, runner.image_config, runner.image_token_id, FAMILY)
    p = runner.build_prompt(s.image, s.expression, sample_task(recipe, s))
    assert r.input_ids.tolist() == p.ids and (r.pixel_values == p.image.pixel_values).all() and r.grid_thw.shape == (0, 3)
    kw = calibset.model_inputs(r, runner.image_token_id, "cpu", torch.float32)
    assert set(kw) == {"input_ids", "pixel_values"} and kw["pixel_values"].shape[1:] == (3, 112, 112)
    # The saved set reads back bit-exactly, empty grid included.
    calibset.save(tmp_path / "c.safetensors", [r], [], {"k": 1})
    back, _, meta = calibset.load(tmp_path / "c.safetensors")
    assert (back[0].input_ids == r.input_ids).all() and (back[0].pixel_values == r.pixel_values).all()
    assert back[0].grid_thw.shape == (0, 3) and meta == {"k": 1}
    # A recipe's pixel cap caps tiles, never above the model's.
    tiles = TilingConfig.from_json(ivl_ckpt / "preprocessor_config.json")
    assert calibset.image_config_for(tiles, 2 * 112 * 112, "model").max_patches == 2
    assert calibset.image_config_for(tiles, 10**9, 1).max_patches == tiles.max_patches
    assert calibset.image_config_for(tiles, 1, "model").max_patches == tiles.min_patches
    # With reasoning, the model's own continuation is appended.
    longer = calibset.with_reasoning(runner, r, 8)
    assert longer.n_prompt == r.n_prompt and 0 < longer.n_generated <= 8


def _quantize(root, ckpt, items, image_token, recipe, kv_cache):
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    from egm_edge.quantize import calibset, policy
    from egm_edge.quantize.recipes import QuantSpec, choose_int4_block

    cfg = json.loads((ckpt / "config.json").read_text())
    block = choose_int4_block(recipe, policy.config_widths(cfg).values())[0]
    spec = QuantSpec(recipe, kv_cache, "16bit", False, block)
    model = transformers.InternVLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    probe = calibset.model_inputs(items[-1], image_token, "cpu", torch.float32)
    with torch.inference_mode():
        full = model(**probe).logits[0]
    linears = policy.linear_counts(model, FAMILY)

    def loop(m):
        with torch.inference_mode():
            for it in items[:-2]:
                m(**calibset.model_inputs(it, image_token, "cpu", torch.float32))

    model = mtq.quantize(model, policy.build_modelopt_config(spec, FAMILY), forward_loop=loop)
    census = policy.count_quantizers(model, FAMILY)
    requantize_resmooth_fused_llm_layers(model)
    with torch.inference_mode():
        fake = model(**probe).logits[0]
        weights = {n: m.weight_quantizer(m.weight).detach().clone() for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and policy.quantizer_group(n + ".weight_quantizer", FAMILY) == "language_model"}
    out = root / "ckpt"
    export_hf_checkpoint(model, export_dir=out)
    return out, spec, census, linears, full, fake, weights


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(x or "none" for x in c))
def test_quantize_census_and_loader_round_trip(case, tmp_path, ivl_ckpt, ivl_items):
    from egm_edge.quantize import calibset, policy
    from egm_edge.quantize.loader import load_dequantized, read_tensors, split_checkpoint, to_model_names

    items, image_token = ivl_items
    out, spec, census, linears, full, fake, weights = _quantize(tmp_path, ivl_ckpt, items, image_token, *case)
    if spec.recipe == "int4_awq":
        assert spec.block_size == 64  # hidden 64: the largest block every width takes
    policy.check_counts(census, spec, linears)
    # 2 layers x (q, k, v, o, gate, up, down); vision tower and projector 16-bit; lm_head and embeddings off.
    assert census["language_model"]["weight"] == linears["language_model"] == 14
    assert linears["vision"] > 0 and census["vision"]["weight"] == census["vision"]["input"] == 0
    assert census["lm_head"]["weight"] == census["embeddings"]["weight"] == census["other"]["weight"] == 0
    assert census["kv_cache"]["kv"] == (4 if spec.kv_cache else 0)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["InternVLForConditionalGeneration"]

    model = load_dequantized(out)
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    modules = dict(model.named_modules())
    plain, extras = split_checkpoint(to_model_names(read_tensors(out), model))  # stored as transformers saves InternVL
    assert not any(k.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for k in extras)  # 16-bit vision
    for name, w in weights.items():
        got = modules[name].weight.detach()
        assert_same_grid_points(name, got, w, grid_step(plain[name + ".weight"], extras[name], got))
    with torch.inference_mode():
        got = model(**calibset.model_inputs(items[-1], image_token, "cpu", torch.float32)).logits[0]
    cos = torch.nn.functional.cosine_similarity(got, fake, dim=-1)
    assert float(cos.min()) >= COSINE_MIN, f"loader vs fake-quant cosine min {float(cos.min()):.6f}"
    vs_full = torch.nn.functional.cosine_similarity(got, full, dim=-1)
    assert 0.9 < float(vs_full.mean()) < 1.0


def test_quantize_api_end_to_end(tmp_path, ivl_ckpt, make_calib):
    """The public call on InternVL: manifest census equals the expected one, fidelity measured through the loader."""
    import egm_edge

    out = egm_edge.quantize(ivl_ckpt, "fp8", make_calib(max_pixels="model"), tmp_path / "q", kv_cache="fp8",
                            cache_dir=tmp_path / "cache", calib_with_reasoning=True, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["family"] == FAMILY and m["recipe"]["name"] == "fp8"
    census = m["quantizers"]["enabled"]
    assert census == m["quantizers"]["expected"] and census["language_model"]["weight"] == 14 and census["kv_cache"]["kv"] == 4
    assert m["calibration"]["calibration"]["generated_tokens_mean"] > 0  # the tiled prompt decoded for the reasoning
    assert json.loads((out / "config.json").read_text())["architectures"] == ["InternVLForConditionalGeneration"]
    assert {"tokenizer.json", "chat_template.jinja", "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    fid = m["fidelity"]
    assert fid["weights"]["layers"] == 14 and 25 < fid["weights"]["snr_db_min"] < 40  # FP8 e4m3: ~31 dB, as for Qwen3-VL
    # Measured 0.978: the tiny InternVL's text weights are drawn wide (initializer_range 0.2, so greedy decodes vary),
    # which amplifies FP8 rounding of weights, activations and the KV cache more than the Qwen3-VL tiny's (> 0.99). That
    # the loader computes what ModelOpt's fake quantization computes is checked at 0.999 in the round-trip test above.
    assert fid["logits"]["positions"] > 0 and fid["logits"]["logit_cosine_mean"] > 0.95

    from egm_edge.reference import ReferenceRunner

    runner = ReferenceRunner.open(out)  # the quantized checkpoint through the dequantizing loader
    assert type(runner.model).__name__ == "InternVLForConditionalGeneration"


def test_auto_quantize_on_internvl_maps_the_stored_layer_names_to_the_models(tmp_path, ivl_ckpt, make_calib):
    """Recipe auto on InternVL: ModelOpt names layers as the checkpoint stores them (`language_model.model.*`); the
    manifest's layer map uses the model's names, covers every language-model Linear, and the loader reads it back."""
    import egm_edge

    out = egm_edge.quantize(ivl_ckpt, "auto", make_calib(max_pixels="model"), tmp_path / "q", target="jetson-orin-nano-8gb",
                            effective_bits=6.0, cache_dir=tmp_path / "cache", progress=False)
    m = json.loads((out / "manifest.json").read_text())
    layers = m["auto"]["layers"]
    assert len(layers) == 14 and all(k.startswith("model.language_model.layers.") for k in layers)
    assert "int4_awq" in layers.values() and set(layers.values()) <= {"int4_awq", "int8_sq", "16-bit"}
    assert sum(f != "16-bit" for f in layers.values()) == m["quantizers"]["enabled"]["language_model"]["weight"]
    from egm_edge.reference import ReferenceRunner

    assert type(ReferenceRunner.open(out).model).__name__ == "InternVLForConditionalGeneration"
