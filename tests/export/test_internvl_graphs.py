"""InternVL-3 graphs: vision.onnx and decoder.onnx of a tiny random InternVLForConditionalGeneration against transformers.

The model is built from a config (Qwen2 language model: 2 layers, hidden 64, 4/2 heads, qkv bias; InternViT:
2 layers, hidden 64, 112 px tiles of 14 px patches, so 16 `<IMG_CONTEXT>` tokens per tile). Both graphs are
written with the export stage's own helpers (`export_graph`, the fused translation table) and run in ONNX
Runtime: image features vs `get_image_features` (cosine), prefill logits vs the HF forward on the same ids and
pixels, and 8 greedy decode steps with the KV cache vs `generate(do_sample=False)`.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

VOCAB, IMG_START, IMG_END, IMG_CONTEXT = 300, 297, 298, 299
TILE = 112
STEPS = 8


def _cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def model():
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    cfg = InternVLConfig(
        text_config=dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=1024, initializer_range=0.2,
                         rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}),
        vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=TILE,
                           patch_size=14, attention_bias=True, initializer_range=0.1),
        image_token_id=IMG_CONTEXT, downsample_ratio=0.5, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    m = InternVLForConditionalGeneration(cfg).eval()
    emb = m.model.vision_tower.embeddings
    with torch.no_grad():  # HF initialises these to zeros / constants: random values make their handling visible
        emb.position_embeddings.normal_(0.0, 0.5)
        emb.cls_token.normal_(0.0, 0.5)
        for layer in m.model.vision_tower.encoder.layer:
            layer.lambda_1.uniform_(0.5, 1.5)
            layer.lambda_2.uniform_(0.5, 1.5)
    m.generation_config.pad_token_id = 0
    m.generation_config.eos_token_id = None
    return m


@pytest.fixture(scope="module")
def pixel_values():
    """Three tiles and the thumbnail of a rendered picture, as the runtime's InternVL tiling makes them."""
    from egm_edge.export.validate import _render
    from egm_edge.runtime.tiling import TilingConfig, tile_image

    px = tile_image(_render(150, 420, np.random.default_rng(3)), TilingConfig(tile_size=TILE, patch_size=14, max_patches=4))
    assert px.shape == (4, 3, TILE, TILE)
    return px


def _io(path):
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    return {v.name: dims(v) for v in g.input}, {v.name: dims(v) for v in g.output}, [n.op_type for n in g.node]


@pytest.fixture(scope="module")
def vision_onnx(model, tmp_path_factory):
    from egm_edge.export.graphs_internvl import InternVLVisionGraph, internvl_vision_export_spec, internvl_vision_io_names
    from egm_edge.export.onnx_io import export_graph, weight_bytes

    module = InternVLVisionGraph(model).eval()
    args, shapes, dims = internvl_vision_export_spec(model.config)
    path = tmp_path_factory.mktemp("internvl") / "vision.onnx"
    names = internvl_vision_io_names()
    export_graph(module, args, path, names[0], names[1], shapes, dims, weight_bytes(module))
    return path


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "fused"])
def decoder_onnx(request, model, tmp_path_factory):
    from egm_edge.export.graphs import DecoderGraph, decoder_export_spec, decoder_io_names
    from egm_edge.export.graphs_internvl import internvl_decoder_config
    from egm_edge.export.onnx_io import export_graph, weight_bytes

    fused = request.param
    dcfg = internvl_decoder_config(model)
    module = DecoderGraph(model, dcfg["image_token_id"], fused_attention=fused).eval()
    translations = None
    if fused:
        from egm_edge.export.fused import translation_table

        translations = translation_table()
    args, shapes, dims = decoder_export_spec(dcfg)
    path = tmp_path_factory.mktemp("internvl") / "decoder.onnx"
    names = decoder_io_names(dcfg["num_layers"])
    export_graph(module, args, path, names[0], names[1], shapes, dims, weight_bytes(module), translations=translations)
    if fused:
        from egm_edge.export.fused import drop_unused_norm_statistics

        drop_unused_norm_statistics(path)
    return fused, dcfg, path


def test_vision_graph_io_and_features_match_transformers(model, pixel_values, vision_onnx):
    from egm_edge.export.graphs_internvl import internvl_vision_io_names, tokens_per_tile
    from egm_edge.runtime.tiling import TilingConfig, image_token_count

    ins, outs, ops = _io(vision_onnx)
    assert (list(ins), list(outs)) == internvl_vision_io_names()
    assert ins["pixel_values"] == ["tiles", 3, TILE, TILE]
    assert outs["image_features"] == ["image_tokens", 64] and outs["deepstack_features"] == [0, "image_tokens", 64]
    assert "Resize" not in ops  # position embeddings used at the native tile size, never interpolated
    from egm_edge.builder.trt_contract import check_graph

    report = check_graph(vision_onnx)
    assert report.ok, report.problems

    sess = ort.InferenceSession(str(vision_onnx), providers=["CPUExecutionProvider"])
    feats, deep = sess.run(["image_features", "deepstack_features"], {"pixel_values": pixel_values})
    with torch.no_grad():
        ref = model.get_image_features(torch.from_numpy(pixel_values)).pooler_output.numpy()
    n_tiles = pixel_values.shape[0]
    assert tokens_per_tile(model.config) == 16
    assert feats.shape == (image_token_count(n_tiles, TilingConfig(tile_size=TILE, patch_size=14)), 64) == (n_tiles * 16, 64)
    assert deep.shape == (0, n_tiles * 16, 64)
    ref = ref.reshape(feats.shape)
    assert _cosine(feats, ref) >= 0.99999
    assert np.abs(feats - ref).max() <= 1e-4 * np.abs(ref).max()
    one = sess.run(["image_features"], {"pixel_values": pixel_values[:1]})[0]  # one tile: rows are per tile
    np.testing.assert_allclose(one, feats[:16], rtol=0, atol=1e-5 * np.abs(ref).max())


def test_decoder_prefill_and_greedy_decode_match_transformers(model, pixel_values, vision_onnx, decoder_onnx):
    from egm_edge.export.graphs import decoder_io_names

    fused, dcfg, path = decoder_onnx
    ins, outs, ops = _io(path)
    assert (list(ins), list(outs)) == decoder_io_names(2)
    assert ins["position_ids"] == [3, "batch", "seq"] and ins["deepstack_features"] == [0, "image_tokens", 64]
    assert ins["past_key_values.1.value"] == ["batch", 2, "past_seq", 16] and outs["logits"] == ["batch", "logit_rows", VOCAB]
    if fused:
        assert ops.count("GroupQueryAttention") == 2 and ops.count("MRotaryEmbedding") == 4 and "Softmax" not in ops
        assert ops.count("SkipSimplifiedLayerNormalization") == 4 and "Neg" not in ops
    else:  # the graph TensorRT bundles are built from
        from egm_edge.builder.trt_contract import check_graph

        report = check_graph(path)
        assert report.ok, report.problems

    n_image = pixel_values.shape[0] * 16
    rng = np.random.default_rng(0)
    text = lambda n: rng.integers(1, IMG_START, n).tolist()  # noqa: E731
    ids = np.asarray([text(5) + [IMG_START] + [IMG_CONTEXT] * n_image + [IMG_END] + text(9)], np.int64)
    s = ids.shape[1]

    t_ids, t_px = torch.from_numpy(ids), torch.from_numpy(pixel_values)
    with torch.no_grad():
        ref_logits = model(input_ids=t_ids, pixel_values=t_px).logits[0].numpy()
        out = model.generate(input_ids=t_ids, attention_mask=torch.ones_like(t_ids), pixel_values=t_px, max_new_tokens=STEPS,
                             min_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True)
    hf_tokens = out.sequences[0, s:].tolist()
    hf_step_logits = np.stack([x[0].numpy() for x in out.logits])

    vision = ort.InferenceSession(str(vision_onnx), providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feats, deep = vision.run(["image_features", "deepstack_features"], {"pixel_values": pixel_values})
    positions = lambda start, n: np.broadcast_to(np.arange(start, start + n), (3, 1, n)).copy()  # noqa: E731  1-D RoPE: 3 equal rows
    past = {f"past_key_values.{i}.{kv}": np.zeros((1, 2, 0, 16), np.float32) for i in range(2) for kv in ("key", "value")}
    feeds = {"input_ids": ids, "image_features": feats, "deepstack_features": deep, "position_ids": positions(0, s),
             "attention_mask": np.ones_like(ids), "logits_index": np.arange(s)[None]}
    res = decoder.run(None, {**feeds, **past})
    logits = res[0][0]
    assert _cosine(logits, ref_logits) >= 0.99999 and np.abs(logits - ref_logits).max() < 1e-3 * np.abs(ref_logits).max()

    # The graph reads row 0 only: other rows change nothing.
    scrambled = feeds["position_ids"].copy()
    scrambled[1:] = rng.integers(0, 500, scrambled[1:].shape)
    again = decoder.run(["logits"], {**feeds, "position_ids": scrambled, **past})[0][0]
    np.testing.assert_array_equal(again, logits)

    step_logits = [logits[-1]]
    past = dict(zip(past, res[1:]))
    for k in range(STEPS - 1):
        res = decoder.run(None, {"input_ids": np.asarray([[step_logits[-1].argmax()]]), "image_features": feats[:0],
                                 "deepstack_features": deep[:, :0], "position_ids": positions(s + k, 1),
                                 "attention_mask": np.ones((1, s + k + 1), np.int64), "logits_index": np.zeros((1, 1), np.int64), **past})
        step_logits.append(res[0][0, -1])
        past = dict(zip(past, res[1:]))
    assert [int(x.argmax()) for x in step_logits] == hf_tokens
    assert len(set(hf_tokens)) > 4  # a decode that repeats one token would prove little about the cache
    assert _cosine(step_logits, hf_step_logits) >= 0.99999
    assert past["past_key_values.0.key"].shape == (1, 2, s + STEPS - 1, 16)


def test_decoder_reads_the_language_model_from_its_structure(model):
    from egm_edge.export.graphs import DecoderGraph

    g = DecoderGraph(model, model.config.image_token_id)
    assert not g.qk_norm and g.n_deepstack == 0 and g.mrope_section == [8, 0, 0]
    assert g.model.language_model is model.model.language_model  # shared: initializer names follow the checkpoint
