"""TensorRT-LLM serving config: the options file validates against the pinned version's option names (kept as data)."""

from __future__ import annotations

import pytest

from egm_edge.errors import UnsupportedError

SERVING = ("a100", "l40s", "h100", "h200", "b200")


def _plan(target: str, precision: str = "int4_awq", budget: int = 1024):
    from egm_edge.plan import plan

    return plan("egm-8b", target, precision, budget)


def test_option_names_are_data_with_their_source():
    from egm_edge.builder.trtllm import option_names

    n = option_names("1.2")
    assert n["source"].endswith("tensorrt_llm/llmapi/llm_args.py") and n["serve_flag"] == "--extra_llm_api_options"
    assert {"max_batch_size", "max_seq_len", "kv_cache_config", "cuda_graph_config"} <= set(n["top_level"])
    assert {"dtype", "free_gpu_memory_fraction"} <= set(n["kv_cache_config"]) and "batch_sizes" in n["cuda_graph_config"]
    with pytest.raises(UnsupportedError, match="1.2"):
        option_names("0.9")


def test_every_serving_target_pins_a_version_we_have_names_for():
    from egm_edge.builder.trtllm import option_names, serving_version
    from egm_edge.targets import list_targets, load_target

    serving = [t for t in list_targets() if (load_target(t).software or {}).get("tensorrt_llm")]
    assert set(SERVING) <= set(serving)
    for t in serving:
        option_names(serving_version(load_target(t)))


@pytest.mark.parametrize("target", SERVING)
def test_options_validate_and_follow_the_plan(target):
    from egm_edge.builder.trtllm import check_options, llm_api_options, serving_version
    from egm_edge.targets import load_target

    tg = load_target(target)
    p = _plan(target)
    o = llm_api_options(p, tg, max_batch_size=16)
    assert check_options(o, serving_version(tg)) == []
    assert o["max_input_len"] >= p.prompt_tokens + p.image.image_tokens
    assert o["max_seq_len"] == o["max_input_len"] + 1024 + p.close_tokens + p.answer_tokens
    assert o["max_batch_size"] == 16 and o["cuda_graph_config"]["batch_sizes"] == [1, 2, 4, 8, 16]
    assert 0 < o["kv_cache_config"]["free_gpu_memory_fraction"] <= 0.9 and o["kv_cache_config"]["dtype"] == "auto"
    assert o["trust_remote_code"] is False


def test_unknown_names_are_caught():
    from egm_edge.builder.trtllm import check_options

    bad = check_options({"max_seq_length": 1, "kv_cache_config": {"fraction": 0.5, "dtype": "int4"},
                         "cuda_graph_config": {"padding": True}, "max_batch_size": 1}, "1.2")
    assert bad == ["max_seq_length", "kv_cache_config.fraction", "cuda_graph_config.padding", "kv_cache_config.dtype=int4"]


def test_kv_cache_dtype_follows_the_target():
    from egm_edge.builder.trtllm import llm_api_options
    from egm_edge.targets import load_target

    assert llm_api_options(_plan("h100"), load_target("h100"), kv_cache="fp8")["kv_cache_config"]["dtype"] == "fp8"
    with pytest.raises(UnsupportedError, match="SM 8.0 has no FP8"):
        llm_api_options(_plan("a100"), load_target("a100"), kv_cache="fp8")
    with pytest.raises(UnsupportedError, match="no TensorRT-LLM serving profile"):
        llm_api_options(_plan("jetson-agx-orin-64gb"), load_target("jetson-agx-orin-64gb"))


def test_written_files_parse_and_name_the_launch(tmp_path):
    from egm_edge.builder.trtllm import OPTIONS_FILE, check_options, read_options, write_trtllm
    from egm_edge.targets import load_target

    info = write_trtllm(tmp_path / "trtllm", tmp_path / "ckpt", _plan("h200", "fp8"), load_target("h200"), kv_cache="fp8")
    opts = read_options(tmp_path / "trtllm" / OPTIONS_FILE)
    assert opts == info["options"] and check_options(opts, "1.2") == []
    yaml = pytest.importorskip("yaml")  # what trtllm-serve parses it with
    assert yaml.safe_load((tmp_path / "trtllm" / OPTIONS_FILE).read_text()) == opts
    launch = (tmp_path / "trtllm" / "launch.sh").read_text()
    assert "trtllm-serve" in launch and "--backend pytorch" in launch and "--extra_llm_api_options" in launch
    assert "egm-edge validate --candidate http://" in (tmp_path / "trtllm" / "README.md").read_text()
    assert info["launch"][:4] == ["trtllm-serve", str(tmp_path / "ckpt"), "--backend", "pytorch"]
