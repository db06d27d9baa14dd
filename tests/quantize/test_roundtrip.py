"""Every CPU recipe quantizes the tiny Qwen3-VL, exports, and loads back through the dequantizing loader.

Metrics: (1) the loader's dequantized weights equal the weights the fake-quantized
ModelOpt model computes with, element by element, up to rounding ties (see
`assert_same_grid_points`); (2) cosine of the loader's logits against the fake-quantized model (FP8
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
from egm_edge.quantize.loader import load_dequantized, read_tensors, split_checkpoint

COSINE_MIN = 0.999
# Rounding ties (see assert_same_grid_points): the float rounding of the scaled value is at
# most one ulp of |q| <= 127 (2**-17), so an element flips only within ~2**-16 of a half
# step: at most ~3e-5 of the elements by chance (measured: 0 of 1,769,472 on an AMD EPYC with
# AVX-512; 1 in up_proj on an Intel AVX-512/AMX host). 1e-3 leaves a wide margin and still
# catches any real decoding error, which moves most elements.
TIE_FRACTION_MAX = 1e-3
EXACT = 1e-4  # in steps: q*s vs q/(1/s) in float32 differ by <= 2 ulp(127 s), ~2e-5 steps


def grid_step(stored: torch.Tensor, extras: dict, deq: torch.Tensor) -> torch.Tensor:
    """The quantization step at each element of a stored Linear weight, in float units."""
    ws = extras["weight_scale"].float()
    if stored.dtype == torch.float8_e4m3fn:  # e4m3: 3 mantissa bits, subnormal spacing 2**-9
        scale = ws.view(-1, 1) if ws.dim() == 1 else ws
        exp = torch.floor(torch.log2((deq / scale).abs().clamp_min(2.0 ** -6)))
        return torch.exp2(exp - 3) * scale
    if stored.dtype == torch.int8:  # per output channel
        return ws.view(-1, 1).expand(deq.shape)
    if stored.dtype == torch.uint8 and extras["weight_scale"].dtype != torch.float8_e4m3fn:  # INT4 blocks
        step = ws.repeat_interleave(deq.shape[1] // ws.shape[1], dim=1)
        if "weight_scale_2" in extras:  # W4A8: then rounded through FP8, which moves a value by <= 1/16
            step = step * (1 + 2.0 ** -4)
        return step
    raise AssertionError(f"no CPU recipe stores weights as {stored.dtype} with scale {tuple(ws.shape)}")


def assert_same_grid_points(name: str, got: torch.Tensor, want: torch.Tensor, step: torch.Tensor) -> None:
    """Each element equals ModelOpt's, or sits one quantization step away at a rounding tie.

    Why ties exist: ModelOpt's fake quant computes round(w * (127/amax)) while its export
    stores round(w / (amax/127)); the two float32 products differ in the last bit, and when
    w lands within that bit of a half step the two round to neighbouring grid points. Which
    elements land there depends on the calibration activations, whose matmul kernels differ
    by host (AVX2 vs AVX-512/AMX), so the count is host-dependent but always tiny.
    For FP8 the step is the e4m3 spacing at that magnitude (3 mantissa bits), times the scale.
    """
    d = (got - want).abs()
    exact = d <= EXACT * step
    ties = ~exact
    assert bool((d[ties] <= step[ties] * (1 + EXACT)).all()), (
        f"{name}: {int(ties.sum())} elements differ from ModelOpt's by more than one quantization step "
        f"(max {float((d / step).max()):.3f} steps)")
    frac = float(ties.float().mean())
    assert frac <= TIE_FRACTION_MAX, f"{name}: {frac:.2%} of elements are one step off ModelOpt's (ties: <= {TIE_FRACTION_MAX:.1%})"

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
    plain, extras = split_checkpoint(read_tensors(q.out_dir))
    for name, w in q.fake_weights.items():
        got = modules[name].weight.detach()
        assert_same_grid_points(name, got, w, grid_step(plain[name + ".weight"], extras[name], got))
    with torch.inference_mode():
        got = model(**calibset.model_inputs(items[-1], image_token, "cpu", torch.float32)).logits[0]
    cos = torch.nn.functional.cosine_similarity(got, q.fake_logits, dim=-1)
    assert float(cos.min()) >= COSINE_MIN, f"loader vs fake-quant cosine min {float(cos.min()):.6f}"
    # And quantization did something, without wrecking the model.
    full = torch.nn.functional.cosine_similarity(got, q.full_logits, dim=-1)
    assert 0.9 < float(full.mean()) < 1.0


def test_grid_check_allows_rare_ties_and_nothing_else():
    """The check accepts what the AVX-512/AMX host produced (one element of up_proj one step
    off: relative Frobenius error 1.3e-4) and refuses a real decoding error."""
    g = torch.Generator().manual_seed(0)
    step = torch.rand(256, 1, generator=g).add(0.5).expand(256, 128) / 127
    want = torch.randint(-127, 128, (256, 128), generator=g).float() * step
    tie = want.clone()
    tie[3, 7] += step[3, 7]
    assert_same_grid_points("up_proj", tie, want, step)
    two_steps = want.clone()
    two_steps[3, 7] += 2 * step[3, 7]
    with pytest.raises(AssertionError, match="more than one quantization step"):
        assert_same_grid_points("up_proj", two_steps, want, step)
    shifted = want + step * (torch.rand(256, 128, generator=g) < 0.01)  # 1% off by one step: a wrong code path
    with pytest.raises(AssertionError, match="one step off"):
        assert_same_grid_points("up_proj", shifted, want, step)


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
