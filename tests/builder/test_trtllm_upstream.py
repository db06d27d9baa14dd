"""TensorRT-LLM names egm-edge emits against the list copied from upstream (tests/builder/data/trtllm_upstream_names.toml)."""

from __future__ import annotations

from pathlib import Path

import pytest

from egm_edge.builder import trtllm
from egm_edge.targets import load_target

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib

UPSTREAM = tomllib.loads((Path(__file__).parent / "data" / "trtllm_upstream_names.toml").read_text())


def _plan(target="h100", precision="fp8", budget=256):
    from egm_edge.plan import plan

    return plan("egm-8b", target, precision, budget)


def test_every_option_we_write_is_an_upstream_llm_args_name():
    up = UPSTREAM["llm_args"]
    opts = trtllm.llm_api_options(_plan(), load_target("h100"))
    assert set(opts) <= set(up["top_level"]), set(opts) - set(up["top_level"])
    for section in ("kv_cache_config", "cuda_graph_config"):
        assert set(opts[section]) <= set(up[section]), (section, set(opts[section]) - set(up[section]))


def test_the_reasoning_parser_reads_egm_output_that_starts_inside_the_reasoning():
    """EGM's template prefills <think>: only a reasoning_at_start parser splits its output."""
    assert trtllm.llm_api_options(_plan(), load_target("h100"))["reasoning_parser"] == trtllm.REASONING_PARSER
    assert trtllm.REASONING_PARSER in UPSTREAM["reasoning_parser"]["reasoning_at_start"]
    assert trtllm.REASONING_PARSER not in UPSTREAM["reasoning_parser"]["needs_open_tag"]


def test_the_launch_command_uses_upstream_serve_flags(tmp_path):
    cmd = trtllm.launch_command(tmp_path / "ckpt", "opts.yaml", "1.2")
    flags = [c for c in cmd if c.startswith("--")]
    assert flags and set(flags) <= set(UPSTREAM["serve"]["flags"]), set(flags) - set(UPSTREAM["serve"]["flags"])


def test_the_trtllm_request_fields_are_upstream_chat_completion_fields():
    from PIL import Image

    from egm_edge.runtime.settings import DecodeSettings
    from egm_edge.validate.endpoint import EndpointPredictor
    from egm_edge.validate.endpoint_kinds import ENDPOINT_KINDS

    up = UPSTREAM["openai_protocol"]
    kind = ENDPOINT_KINDS["trtllm"]
    assert kind.budget_field in up["chat_completion_request"] and up["model_card_owned_by"] in kind.owned_by
    pred = EndpointPredictor.__new__(EndpointPredictor)  # no server: only the body is built
    pred.model_name, pred.family, pred.endpoint_kind = "m", "qwen3_vl", kind
    body = pred.request_body(Image.new("RGB", (8, 8)), "x", "vanilla", DecodeSettings(16, "hard", 8, 64).resolved())
    assert set(body) <= set(up["chat_completion_request"]) and body["thinking_token_budget"] == 16


def test_the_readme_maps_the_budget_to_thinking_token_budget(tmp_path):
    trtllm.write_trtllm(tmp_path / "t", tmp_path / "ckpt", _plan(budget=128), load_target("h100"))
    readme = (tmp_path / "t" / "README.md").read_text()
    assert "`thinking_token_budget` (128)" in readme and "--endpoint-kind trtllm" in readme
    assert "1.2 rejects that field" in readme and "deepseek-r1 parser" in readme
    if not UPSTREAM["llm_args"]["commit"]:
        pytest.fail("the upstream list must name the commit it was read at")


def _calls(tree, name: str) -> list:
    import ast

    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == name]


def test_the_llm_api_example_uses_only_upstream_names(tmp_path):
    """The Python LLM(...) launch: its imports, LLM/SamplingParams/input-loader keywords are upstream names of the pinned
    release, its options come from the checked options file, and the budget field is not emitted for 1.2."""
    import ast

    info = trtllm.write_trtllm(tmp_path / "t", tmp_path / "ckpt", _plan(budget=64), load_target("h100"))
    script = (tmp_path / "t" / "llm_api_example.py").read_text()
    tree = ast.parse(script)
    imports = {n.module: sorted(a.name for a in n.names) for n in ast.walk(tree)
               if isinstance(n, ast.ImportFrom) and n.module.startswith("tensorrt_llm")}
    assert imports == {k: sorted(v) for k, v in UPSTREAM["llm_api"]["imports"].items()}
    (llm,) = _calls(tree, "LLM")
    assert [k.arg for k in llm.keywords if k.arg] == UPSTREAM["llm_api"]["llm_keywords"]
    assert [k.value.value for k in llm.keywords if k.arg == "backend"] == ["pytorch"]
    (params,) = _calls(tree, "SamplingParams")
    names = [k.arg for k in params.keywords]
    assert set(names) <= set(UPSTREAM["sampling_params"]["fields"]) and "max_tokens" in names
    assert "thinking_token_budget" in UPSTREAM["sampling_params"]["absent"] and "thinking_token_budget" not in names
    (loader,) = _calls(tree, "default_multimodal_input_loader")
    assert {k.arg for k in loader.keywords} <= set(UPSTREAM["input_loader"]["keywords"])
    assert "MAX_TOKENS = 135" in script  # think 64 + budget close 23 + answer 48
    assert "'Locate EGM_EDGE_EXPRESSION, output its bbox coordinates using JSON format'" in script
    assert "not enforced" in script and info["llm_api_example"] == "trtllm/llm_api_example.py"
    assert "python llm_api_example.py IMAGE" in (tmp_path / "t" / "README.md").read_text()


def test_a_release_with_the_budget_field_gets_it_in_sampling_params(tmp_path):
    from egm_edge.builder.trtllm_llm_api import write_llm_api_example

    names = {**trtllm.option_names("1.2"), "sampling_params": ["max_tokens", "temperature", "thinking_token_budget"]}
    write_llm_api_example(tmp_path, tmp_path / "ckpt", _plan(budget=32), load_target("h100"), "1.3.0rc24", names)
    (params,) = _calls(__import__("ast").parse((tmp_path / "llm_api_example.py").read_text()), "SamplingParams")
    assert {k.arg: getattr(k.value, "value", None) for k in params.keywords}["thinking_token_budget"] == 32
