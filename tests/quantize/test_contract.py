"""Contract: the checkpoint's quantization metadata is what TensorRT-LLM's and vLLM's ModelOpt loaders read.

Neither engine installs here, so the fields they read are kept below as data, with
where they come from; the test fails if an export adds, drops or renames any of them.

TensorRT-LLM, tensorrt_llm/_torch/model_config.py (ModelConfig._build_modelopt_quant_config /
load_modelopt_quant_config, main branch as stored in Nov 2026): reads hf_quant_config.json
["quantization"]: quant_algo and kv_cache_quant_algo (each must be a QuantAlgo value or null),
group_size, exclude_modules, has_zero_point, pre_quant_scale; MIXED_PRECISION also reads
quantized_layers (per layer quant_algo, group_size, has_zero_point, pre_quant_scale).
QuantAlgo values: tensorrt_llm/quantization/mode.py; KV_CACHE_QUANT_ALGO_LIST = FP8, INT8, NVFP4.

vLLM, vllm/model_executor/layers/quantization/modelopt.py (commit 00155cde, ModelOptQuantConfigBase.
from_config): hf_quant_config.json ["quantization"]: quant_algo, kv_cache_quant_algo (str or null),
group_size (int or null), exclude_modules (list of fnmatch wildcards); or the flat config.json
quantization_config: quant_method starting with "modelopt", quant_algo, ignore (list),
kv_cache_scheme {"type": "float", "num_bits": 8} for an FP8 KV cache, group_size.
Its ModelOpt path serves QUANT_ALGOS = FP8, FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO, NVFP4,
W4A16_NVFP4, MXFP8, MIXED_PRECISION; KV_CACHE_QUANT_ALGOS = FP8, NVFP4.
"""

from __future__ import annotations

import fnmatch
import json

import pytest

from egm_edge.quantize.recipes import RECIPES

TRTLLM_QUANT_ALGOS = {
    "W8A16", "W4A16", "W4A16_AWQ", "W4A8_AWQ", "W8A16_GPTQ", "W4A16_GPTQ", "W8A8_SQ_PER_CHANNEL",
    "W8A8_SQ_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", "W4A8_QSERVE_PER_GROUP", "W4A8_QSERVE_PER_CHANNEL", "FP8",
    "FP8_PER_CHANNEL_PER_TOKEN", "FP8_BLOCK_SCALES", "INT8", "MIXED_PRECISION", "NVFP4", "W4A8_NVFP4_FP8",
    "W4A8_MXFP4_FP8", "W4A8_MXFP4_MXFP8", "W4A16_MXFP4", "NO_QUANT",
}
TRTLLM_KV_ALGOS = {"FP8", "INT8", "NVFP4"}
TRTLLM_KEYS = {"quant_algo", "kv_cache_quant_algo", "group_size", "exclude_modules", "has_zero_point", "pre_quant_scale",
               "quantized_layers"}
VLLM_QUANT_ALGOS = {"FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "NVFP4", "W4A16_NVFP4", "MXFP8", "MIXED_PRECISION"}
VLLM_KV_ALGOS = {"FP8", "NVFP4"}
VLLM_KEYS = {"quant_algo", "kv_cache_quant_algo", "group_size", "exclude_modules"}
VLLM_FLAT_KEYS = {"quant_method", "quant_algo", "ignore", "kv_cache_scheme", "group_size"}
# Per-layer tensors the engines' weight loaders take (beside `weight`), by recipe.
LAYER_TENSORS = {
    "fp8": {"weight_scale", "input_scale"},
    "int4_awq": {"weight_scale", "pre_quant_scale"},
    "w4a8_awq": {"weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale"},
    "int8_sq": {"weight_scale", "input_scale", "pre_quant_scale"},
}
# Who serves which recipe from this checkpoint (data for docs and the build stage).
SERVED_BY = {"fp8": {"tensorrt_llm", "vllm"}, "int4_awq": {"tensorrt_llm"}, "w4a8_awq": {"tensorrt_llm"},
             "int8_sq": {"tensorrt_llm"}, "nvfp4": {"tensorrt_llm", "vllm"}}
CASES = [("fp8", None), ("int4_awq", None), ("w4a8_awq", None), ("int8_sq", None), ("fp8", "fp8")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(x or "none" for x in c))
def test_hf_quant_config_is_what_the_engines_read(case, quantized):
    recipe, kv = case
    q = quantized(recipe, kv)
    hf = json.loads((q.out_dir / "hf_quant_config.json").read_text())
    assert set(hf) == {"producer", "quantization"} and hf["producer"]["name"] == "modelopt"
    quant = hf["quantization"]
    assert set(quant) <= TRTLLM_KEYS, f"keys no engine reads: {set(quant) - TRTLLM_KEYS}"
    assert VLLM_KEYS - {"group_size"} <= set(quant)
    algo = quant["quant_algo"]
    assert algo == RECIPES[recipe].quant_algo and algo in TRTLLM_QUANT_ALGOS
    assert (algo in VLLM_QUANT_ALGOS) == ("vllm" in SERVED_BY[recipe])
    kv_algo = quant["kv_cache_quant_algo"]
    assert kv_algo == ("FP8" if kv else None)
    assert kv_algo is None or (kv_algo in TRTLLM_KV_ALGOS and kv_algo in VLLM_KV_ALGOS)
    if RECIPES[recipe].weights == "int4":
        assert quant["group_size"] == 128 and quant["has_zero_point"] is False and quant["pre_quant_scale"] is True
    excl = quant["exclude_modules"]
    assert isinstance(excl, list) and all(isinstance(p, str) for p in excl)
    for module in ("lm_head", "model.language_model.embed_tokens", "model.visual.blocks.0.attn.qkv",
                   "model.visual.merger.linear_fc1", "model.visual.deepstack_merger_list.0.linear_fc2"):
        assert any(fnmatch.fnmatch(module, p) for p in excl), f"{module} is not excluded by {excl}"
    assert not any(fnmatch.fnmatch("model.language_model.layers.0.mlp.down_proj", p) for p in excl)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(x or "none" for x in c))
def test_config_json_quantization_config(case, quantized):
    recipe, kv = case
    q = quantized(recipe, kv)
    cfg = json.loads((q.out_dir / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "modelopt"
    assert qc["quant_algo"] == RECIPES[recipe].quant_algo
    assert isinstance(qc["ignore"], list)
    hf = json.loads((q.out_dir / "hf_quant_config.json").read_text())["quantization"]
    assert sorted(qc["ignore"]) == sorted(hf["exclude_modules"])
    if kv:
        assert qc["kv_cache_scheme"]["type"] == "float" and qc["kv_cache_scheme"]["num_bits"] == 8
    else:
        assert "kv_cache_scheme" not in qc
    assert cfg["architectures"] == ["Qwen3VLForConditionalGeneration"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(x or "none" for x in c))
def test_layer_tensors(case, quantized):
    from safetensors import safe_open

    recipe, kv = case
    q = quantized(recipe, kv)
    with safe_open(str(q.out_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for layer in ("self_attn.o_proj", "mlp.down_proj"):  # never folded into a norm
            prefix = f"model.language_model.layers.0.{layer}"
            got = {k[len(prefix) + 1:] for k in keys if k.startswith(prefix + ".")} - {"weight"}
            assert got == LAYER_TENSORS[recipe], f"{recipe} {layer}: {sorted(got)}"
        if kv:
            assert {"model.language_model.layers.0.self_attn.k_proj.k_scale", "model.language_model.layers.0.self_attn.v_proj.v_scale"} <= keys
        assert not any(k.startswith("model.visual.") and k.endswith("_scale") for k in keys)
        assert f.get_slice("lm_head.weight").get_dtype() in ("F32", "BF16", "F16")
