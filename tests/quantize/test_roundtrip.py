"""Every CPU recipe quantizes the tiny Qwen3-VL, exports, and loads back through the dequantizing loader.

Metrics: (1) the loader's dequantized weights equal the weights the fake-quantized
ModelOpt model computes with (relative error <= 1e-6: the formats are decoded
exactly); (2) cosine of the loader's logits against the fake-quantized model (FP8
KV cache included) on a held-out image+prompt, per position. The residual in (2) comes from input
fake-quant: ModelOpt scales by 448/amax, the checkpoint stores amax/448, and the
two float roundings occasionally put a value on the other side of an FP8 rounding
boundary; a random 2-layer model amplifies that. Measured minimum 0.99956
(w4a8_awq), >= 0.99998 for the others. Threshold 0.999.
"""

from __future__ import annotations

import pytest
import torch

from egm_edge.quantize import calibset, policy
from egm_edge.quantize.loader import load_dequantized

COSINE_MIN = 0.999
CASES = [("fp8", None, "16bit"), ("int4_awq", None, "16bit"), ("w4a8_awq", None, "16bit"), ("int8_sq", None, "16bit"),
         ("fp8", "fp8", "fp8"), ("int4_awq", None, "fp8")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(x or "none" for x in c))
def test_round_trip_matches_fake_quant(case, quantized, calib_items):
    q = quantized(*case)
    items, image_token = calib_items
    policy.check_counts(q.census, q.spec, q.linears)  # raises on any contradiction
    assert q.census["language_model"]["weight"] == q.linears["language_model"] > 0
    assert q.census["lm_head"]["weight"] == q.census["embeddings"]["weight"] == 0
    assert (q.census["vision"]["weight"] > 0) == (q.spec.vision == "fp8")
    assert q.census["kv_cache"]["kv"] == (2 * q.linears["layers"] if q.spec.kv_cache else 0)

    model = load_dequantized(q.out_dir)
    modules = dict(model.named_modules())
    for name, w in q.fake_weights.items():
        err = float((modules[name].weight - w).norm() / w.norm())
        assert err <= 1e-6, f"{name}: dequantized weight differs from ModelOpt's by {err:.2e}"
    with torch.inference_mode():
        got = model(**calibset.model_inputs(items[-1], image_token, "cpu", torch.float32)).logits[0]
    cos = torch.nn.functional.cosine_similarity(got, q.fake_logits, dim=-1)
    assert float(cos.min()) >= COSINE_MIN, f"loader vs fake-quant cosine min {float(cos.min()):.6f}"
    # And quantization did something, without wrecking the model.
    full = torch.nn.functional.cosine_similarity(got, q.full_logits, dim=-1)
    assert 0.9 < float(full.mean()) < 1.0


def test_loader_refuses_other_architectures(tmp_path):
    from egm_edge.errors import CheckpointError

    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(CheckpointError, match="Qwen3VLForConditionalGeneration"):
        load_dequantized(tmp_path)


def test_int4_unpacking_matches_modelopt_packing():
    from modelopt.torch.export.quant_utils import pack_int4_in_uint8

    from egm_edge.quantize.loader import dequantize_weight

    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 256, generator=g)
    scale = w.reshape(6, 2, 128).abs().amax(-1) / 7
    packed = pack_int4_in_uint8(w, scale, 128)
    expect = torch.round(w / scale.repeat_interleave(128, 1)).clamp(-8, 7) * scale.repeat_interleave(128, 1)
    torch.testing.assert_close(dequantize_weight(packed, {"weight_scale": scale}), expect)


def test_nvfp4_unpacking_matches_modelopt():
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    from egm_edge.quantize.loader import dequantize_weight

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=g)
    qt, scale, scale2 = NVFP4QTensor.quantize(w, 16)
    expect = qt.dequantize(dtype=torch.float32, scale=scale, double_scale=scale2, block_sizes={-1: 16})
    got = dequantize_weight(qt._quantized_data, {"weight_scale": scale, "weight_scale_2": scale2})
    torch.testing.assert_close(got, expect)
