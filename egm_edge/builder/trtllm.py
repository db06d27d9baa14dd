"""Datacenter serving: a TensorRT-LLM (PyTorch backend) configuration for the quantized checkpoint.

Contract: `llm_api_options(plan, target, ...)` returns the LLM-API options that
`trtllm-serve CKPT --backend pytorch --extra_llm_api_options FILE` loads into
TorchLlmArgs: max_batch_size, max_input_len (prompt text with room for longer
expressions + the planned image's tokens), max_seq_len (that + think budget +
budget close + answer), max_num_tokens,
kv_cache_config (dtype from --kv-cache, free_gpu_memory_fraction sized from the
plan), cuda_graph_config batch sizes up to max_batch_size. `check_options`
lists every name the pinned TensorRT-LLM version (target profile
software.tensorrt_llm) does not accept, from the option names kept as data in
egm_edge/builder/data/trtllm_options.toml (with the llm_args.py source they came
from). `write_trtllm(dir, checkpoint, plan, target)` refuses unknown names and
writes llm_api_options.yaml, launch.sh, the same options as a Python `LLM(...)`
launch (`trtllm_llm_api`: llm_api_example.py) and README.md. Pure Python.

The options name the reasoning parser `REASONING_PARSER` so the server splits
EGM's reasoning into `reasoning_content`: EGM's chat template ends the prompt
with `<think>\n`, so the output holds only `</think>`, which TensorRT-LLM's
"deepseek-r1" parser reads (reasoning_at_start=True); its "qwen3" key needs the
opening tag in the output and would return the reasoning as content
(tensorrt_llm/llmapi/reasoning_parser.py @ 033a9d09). The thinking budget is
per request, not an LLM-API option: TensorRT-LLM 1.3.0rc24 and later take
`thinking_token_budget` on ChatCompletionRequest / SamplingParams (PR #14665;
`egm-edge validate --endpoint-kind trtllm` sends it), 1.2 rejects the field
(extra="forbid"), so there clients cap the reasoning through max_tokens only.
The option names are also checked against the upstream list in
tests/builder/data/trtllm_upstream_names.toml.
"""

from __future__ import annotations

import functools
import json
import shlex
from pathlib import Path

from egm_edge.builder.trtllm_llm_api import LLM_API_FILE, write_llm_api_example
from egm_edge.errors import CheckpointError, UnsupportedError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib

DATA = Path(__file__).resolve().parent / "data" / "trtllm_options.toml"
OPTIONS_FILE = "llm_api_options.yaml"
DEFAULT_PORT = 8000
REASONING_PARSER = "deepseek-r1"  # see the module docstring: EGM's template prefills <think>


@functools.lru_cache(maxsize=None)
def option_names(version: str) -> dict:
    """{"top_level", "kv_cache_config", "cuda_graph_config", "kv_cache_dtypes", "source", ...} for `version`."""
    with DATA.open("rb") as f:
        table = tomllib.load(f)["trtllm"]
    if version not in table:
        raise UnsupportedError(f"No TensorRT-LLM option list for version {version!r}; known: {', '.join(table)}. "
                               "Add the version's llm_args.py field names to egm_edge/builder/data/trtllm_options.toml.")
    return table[version]


def check_options(options: dict, version: str) -> list[str]:
    """Dotted names in `options` that TensorRT-LLM `version` would reject (empty when all are known)."""
    names = option_names(version)
    bad = [k for k in options if k not in names["top_level"]]
    for section in ("kv_cache_config", "cuda_graph_config"):
        sub = options.get(section)
        if isinstance(sub, dict):
            bad += [f"{section}.{k}" for k in sub if k not in names[section]]
    kv = (options.get("kv_cache_config") or {}).get("dtype")
    if kv is not None and kv not in names["kv_cache_dtypes"]:
        bad.append(f"kv_cache_config.dtype={kv}")
    return bad


def serving_version(target) -> str:
    version = (target.software or {}).get("tensorrt_llm")
    if target.kind != "gpu" or not version:
        raise UnsupportedError(f"Target {target.name} has no TensorRT-LLM serving profile (software.tensorrt_llm); "
                               "serving configs are for datacenter GPU targets such as h100.")
    return str(version)


def cuda_graph_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to and including max_batch_size: the decode batches worth a captured graph."""
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch_size]


def llm_api_options(plan, target, *, kv_cache: str | None = None, max_batch_size: int = 8) -> dict:
    """The options dict (see the module docstring); `kv_cache` "fp8" quantizes the KV cache, None keeps the checkpoint's."""
    version = serving_version(target)
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise UnsupportedError(f"max_batch_size={max_batch_size!r} must be a positive whole number.")
    if kv_cache not in (None, "fp8"):
        raise UnsupportedError(f"Unsupported KV-cache dtype {kv_cache!r} for TensorRT-LLM. Choose from: fp8 (or leave it off).")
    if kv_cache == "fp8" and "fp8" not in target.kv_dtypes():
        raise UnsupportedError(f"Unsupported KV-cache dtype 'fp8' for target {target.name} (SM {target.sm_text} has no FP8). "
                               f"Choose from: {', '.join(target.kv_dtypes())}.")
    from egm_edge.builder.tensorrt import prompt_text_max

    prefill = prompt_text_max(plan) + plan.image.image_tokens  # the engines' slack for longer expressions, as on the device
    max_seq = prefill + plan.think_budget + plan.close_tokens + plan.answer_tokens
    # KV bytes the whole batch needs at max_seq_len, as a share of what is left after weights and overhead.
    free = plan.usable_bytes - sum(plan.weights.values()) - plan.overhead_bytes - plan.activation_bytes
    per_token = plan.kv_cache_bytes / max(plan.context_tokens, 1) * (0.5 if kv_cache == "fp8" and plan.kv_dtype != "fp8" else 1)
    need = per_token * max_seq * max_batch_size
    fraction = round(min(0.9, max(0.05, 1.25 * need / free)) if free > 0 else 0.9, 3)
    options = {
        "max_batch_size": max_batch_size,
        "max_seq_len": max_seq,
        "max_input_len": prefill,
        "max_num_tokens": max(8192, prefill * max_batch_size),
        "trust_remote_code": False,
        "kv_cache_config": {"dtype": kv_cache or "auto", "free_gpu_memory_fraction": fraction, "enable_block_reuse": True},
        "cuda_graph_config": {"batch_sizes": cuda_graph_batch_sizes(max_batch_size), "enable_padding": True},
        "disable_overlap_scheduler": False,
        "print_iter_log": False,
        "reasoning_parser": REASONING_PARSER,
    }
    bad = check_options(options, version)
    if bad:  # a bug here, not user input: the data file and this function disagree
        raise CheckpointError(f"The TensorRT-LLM {version} options use names it does not accept: {', '.join(bad)}.")
    return options


def launch_command(checkpoint, options_file, version: str, port: int = DEFAULT_PORT, host: str = "0.0.0.0") -> list[str]:
    names = option_names(version)
    return ["trtllm-serve", str(checkpoint), "--backend", names["backend"], "--host", host, "--port", str(port),
            names["serve_flag"], str(options_file)]


def write_trtllm(out_dir, checkpoint, plan, target, *, kv_cache: str | None = None, max_batch_size: int = 8,
                 port: int = DEFAULT_PORT) -> dict:
    """Write llm_api_options.yaml, launch.sh and README.md into `out_dir`; returns what the manifest records."""
    version = serving_version(target)
    options = llm_api_options(plan, target, kv_cache=kv_cache, max_batch_size=max_batch_size)
    prefill = options["max_input_len"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # JSON is YAML 1.2: PyYAML's safe_load (what trtllm-serve uses) reads it, and so can anything without PyYAML.
    header = (f"# TensorRT-LLM {version} LLM-API options for {plan.model} ({plan.precision}) on {target.name}, "
              f"think budget {plan.think_budget}; written by egm-edge build\n")
    (out_dir / OPTIONS_FILE).write_text(header + json.dumps(options, indent=2) + "\n")
    cmd = launch_command(checkpoint, f'"$(dirname "$0")/{OPTIONS_FILE}"', version, port)
    (out_dir / "launch.sh").write_text("#!/bin/sh\n# Serve the quantized checkpoint with TensorRT-LLM's PyTorch backend.\nexec "
                                       + " ".join(shlex.quote(c) if not c.startswith('"') else c for c in cmd) + "\n")
    (out_dir / "launch.sh").chmod(0o755)
    example = write_llm_api_example(out_dir, checkpoint, plan, target, version, option_names(version))
    (out_dir / "README.md").write_text(
        f"# Serving {plan.model} ({plan.precision}) on {target.name} with TensorRT-LLM {version}\n\n"
        f"Needs `pip install egm-edge[trtllm]` (tensorrt-llm {version}) on the GPU host, and the quantized checkpoint there: "
        f"launch.sh names it where it was built ({checkpoint}); copy it and edit the path if the server is another machine. "
        "Start the server:\n\n"
        f"    sh launch.sh     # = {' '.join(launch_command(checkpoint, OPTIONS_FILE, version, port))}\n\n"
        f"Or ground in Python with the LLM API and the same options: `python {LLM_API_FILE} IMAGE \"the expression\"` "
        f"({example['budget']}).\n\n"
        "Then score it against a reference with the same samples the bundle is validated on:\n\n"
        f"    egm-edge validate --candidate http://HOST:{port} ...\n\n"
        f"The think budget ({plan.think_budget} tokens) is per request, not a server option: TensorRT-LLM 1.3.0rc24 and later "
        f"take `thinking_token_budget` ({plan.think_budget}) on each chat completion (`egm-edge validate --endpoint-kind trtllm` "
        f"sends it); {version} " + ("rejects that field, so clients cap the reasoning through max_tokens. " if version == "1.2" else
        "takes it. ") + f"The server splits the reasoning out with the {REASONING_PARSER} parser. max_seq_len {options['max_seq_len']} = prompt text up to {prefill - plan.image.image_tokens} + image "
        f"{plan.image.image_tokens} (a {plan.image_wh[0]}x{plan.image_wh[1]} image; larger ones exceed max_input_len: rebuild with "
        f"--image) + think {plan.think_budget} + budget close {plan.close_tokens} + answer {plan.answer_tokens} tokens.\n"
    )
    return {"version": version, "options_file": f"trtllm/{OPTIONS_FILE}", "options": options, "checkpoint": str(checkpoint),
            "launch": launch_command(checkpoint, f"trtllm/{OPTIONS_FILE}", version, port), "port": port,
            "llm_api_example": f"trtllm/{LLM_API_FILE}"}


def read_options(path) -> dict:
    """Read an options file written by `write_trtllm` (comment lines, then JSON)."""
    text = "\n".join(line for line in Path(path).read_text().splitlines() if not line.lstrip().startswith("#"))
    return json.loads(text)
