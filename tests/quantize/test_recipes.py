"""Recipe registry and QuantSpec: validation, JSON round-trip, and the policy entries (pure, fast)."""

from __future__ import annotations

import fnmatch
import json

import pytest

from egm_edge.errors import InputError
from egm_edge.quantize.policy import policy_entries, quantizer_group, quantizer_kind
from egm_edge.quantize.recipes import KV_CACHE, RECIPES, VISION_MODES, QuantSpec, get_recipe


def all_specs():
    yield QuantSpec("auto", formats=("int4_awq", "int8_sq"), effective_bits=5.5, awq="awq_full")
    for r in RECIPES:
        if r == "auto":  # one language-model search, its own spec checks (tests/quantize/test_auto.py)
            continue
        for kv in (None, *KV_CACHE):
            for vision in VISION_MODES:
                for reasoning in (False, True):
                    yield QuantSpec(r, kv, vision, reasoning)


def test_registry_names():
    assert list(RECIPES) == ["fp8", "int4_awq", "w4a8_awq", "int8_sq", "nvfp4", "auto"]
    assert [r.name for r in RECIPES.values() if r.needs_cuda] == ["nvfp4"]


@pytest.mark.parametrize("spec", list(all_specs()), ids=lambda s: s.describe())
def test_spec_json_round_trip(spec):
    again = QuantSpec.from_json(spec.to_json())
    assert again == spec
    assert json.loads(again.to_json()) == json.loads(spec.to_json())


def test_unknown_recipe_lists_valid_ones():
    with pytest.raises(InputError) as e:
        get_recipe("int3")
    assert "fp8, int4_awq, w4a8_awq, int8_sq, nvfp4, auto" in str(e.value)
    with pytest.raises(InputError):
        QuantSpec("fp16")


@pytest.mark.parametrize("bad", [{"recipe": "fp8", "kv_cache": "int8"}, {"recipe": "fp8", "vision": "int4"},
                                 {"recipe": "fp8", "colour": 1}, {"recipe": "fp8", "version": 99}, {"kv_cache": "fp8"}])
def test_bad_specs_are_refused(bad):
    with pytest.raises(InputError):
        QuantSpec.from_dict(bad)


def test_changed_recipe_definition_is_refused():
    d = QuantSpec("fp8").to_dict()
    d["recipe_spec"]["block_size"] = 64
    with pytest.raises(InputError, match="different definition"):
        QuantSpec.from_dict(d)


QWEN3VL_QUANTIZERS = [
    "model.visual.patch_embed.proj.weight_quantizer",
    "model.visual.blocks.0.attn.qkv.input_quantizer",
    "model.visual.blocks.0.attn.k_bmm_quantizer",
    "model.visual.merger.linear_fc2.weight_quantizer",
    "model.visual.deepstack_merger_list.1.linear_fc1.weight_quantizer",
    "model.language_model.embed_tokens.weight_quantizer",
    "model.language_model.layers.3.self_attn.q_proj.weight_quantizer",
    "model.language_model.layers.3.self_attn.k_bmm_quantizer",
    "model.language_model.layers.3.self_attn.q_bmm_quantizer",
    "model.language_model.layers.3.mlp.down_proj.input_quantizer",
    "lm_head.weight_quantizer",
]


def test_groups_and_kinds():
    groups = [quantizer_group(n, "qwen3_vl") for n in QWEN3VL_QUANTIZERS]
    assert groups == ["vision"] * 5 + ["embeddings", "language_model", "kv_cache", "language_model", "language_model", "lm_head"]
    assert quantizer_kind(QWEN3VL_QUANTIZERS[2]) == "kv" and quantizer_kind(QWEN3VL_QUANTIZERS[8]) == "attn"


def _final_enable(entries, name):
    """Simulate ModelOpt's in-order application; bmm quantizers live on attention modules, the rest on Linears."""
    parent = "attention" if name.endswith("bmm_quantizer") else "nn.Linear"
    state = None
    for e in entries:
        if e.get("parent_class", parent) != parent:
            continue
        if fnmatch.fnmatch(name, e["quantizer_name"]):
            state = e.get("enable", True)
    return state


@pytest.mark.parametrize("vision", VISION_MODES)
def test_policy_disables_vision_lm_head_embeddings_last(vision):
    # A base config that enables everything, then the KV config, then the policy.
    entries = [{"quantizer_name": "*", "cfg": {"num_bits": 8}}, {"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": (4, 3)}}]
    entries += policy_entries(QuantSpec("fp8", "fp8", vision), "qwen3_vl", {"num_bits": (4, 3)}, {"num_bits": (4, 3)})
    on = {n: _final_enable(entries, n) for n in QWEN3VL_QUANTIZERS}
    assert not on["lm_head.weight_quantizer"]
    assert not on["model.language_model.embed_tokens.weight_quantizer"]
    assert not on["model.visual.blocks.0.attn.k_bmm_quantizer"]
    assert not on["model.visual.patch_embed.proj.weight_quantizer"]
    assert on["model.language_model.layers.3.self_attn.k_bmm_quantizer"]
    vis = on["model.visual.merger.linear_fc2.weight_quantizer"], on["model.visual.deepstack_merger_list.1.linear_fc1.weight_quantizer"]
    assert vis == ((True, True) if vision == "fp8" else (False, False))


# InternVL-3's module names in transformers' InternVLForConditionalGeneration: two vision prefixes (tower, projector).
INTERNVL_QUANTIZERS = [
    "model.vision_tower.embeddings.patch_embeddings.projection.weight_quantizer",
    "model.vision_tower.encoder.layer.0.attention.q_proj.weight_quantizer",
    "model.multi_modal_projector.linear_1.weight_quantizer",
    "model.language_model.layers.1.self_attn.q_proj.weight_quantizer",
    "model.language_model.layers.1.self_attn.v_bmm_quantizer",
    "lm_head.weight_quantizer",
]


@pytest.mark.parametrize("vision", VISION_MODES)
def test_policy_prefixes_come_from_the_family_record(vision):
    """The same policy on another family's module names: its vision prefixes and stem, its language prefix."""
    assert [quantizer_group(n, "internvl") for n in INTERNVL_QUANTIZERS] == [
        "vision", "vision", "vision", "language_model", "kv_cache", "lm_head"]
    assert quantizer_group(INTERNVL_QUANTIZERS[2], "qwen3_vl") == "other"  # not a Qwen3-VL module
    entries = [{"quantizer_name": "*", "cfg": {"num_bits": 8}}]
    entries += policy_entries(QuantSpec("fp8", None, vision), "internvl", {"num_bits": (4, 3)}, {"num_bits": (4, 3)})
    on = {n: _final_enable(entries, n) for n in INTERNVL_QUANTIZERS}
    assert not on[INTERNVL_QUANTIZERS[0]] and on[INTERNVL_QUANTIZERS[3]] and not on["lm_head.weight_quantizer"]
    assert (on[INTERNVL_QUANTIZERS[1]], on[INTERNVL_QUANTIZERS[2]]) == ((True, True) if vision == "fp8" else (False, False))


def test_importing_the_stage_and_its_command_stays_torch_free():
    import subprocess
    import sys

    code = ("import sys, egm_edge, egm_edge.quantize, egm_edge.commands.quantize, egm_edge.quantize.calibration; "
            "assert callable(egm_edge.quantize); "
            "bad = [m for m in ('torch', 'transformers', 'modelopt') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("tamper, match", [
    (lambda c: c["vision"].__setitem__("weight", 3), "vision weight quantizers: 3, expected 0"),
    (lambda c: c["lm_head"].__setitem__("weight", 1), "lm_head weight quantizers: 1, expected 0"),
    (lambda c: c["language_model"].__setitem__("weight", 0), "no language-model weight is quantized"),
    (lambda c: c["kv_cache"].__setitem__("kv", 0), "kv_cache kv quantizers: 0, expected 4"),
])
def test_census_contradicting_the_recipe_fails(tamper, match):
    from egm_edge.errors import EgmError
    from egm_edge.quantize.policy import check_counts, expected_census

    spec = QuantSpec("fp8", "fp8")
    linears = {"language_model": 14, "vision": 12, "lm_head": 1, "layers": 2}
    census = expected_census(spec, linears)
    check_counts(census, spec, linears)  # the expected census passes
    tamper(census)
    with pytest.raises(EgmError, match=match):
        check_counts(census, spec, linears)


def test_block_width_check_from_config():
    from egm_edge.errors import UnsupportedError
    from egm_edge.quantize.policy import check_block_sizes, config_widths

    cfg = {"text_config": {"hidden_size": 192, "intermediate_size": 512, "num_attention_heads": 6, "head_dim": 32}}
    with pytest.raises(UnsupportedError, match="--block-size 64"):
        check_block_sizes(config_widths(cfg), QuantSpec("int4_awq"))
    check_block_sizes(config_widths(cfg), QuantSpec("int4_awq", block_size=64))
    check_block_sizes(config_widths(cfg), QuantSpec("fp8"))
