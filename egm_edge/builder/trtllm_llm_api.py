"""The Python `LLM(...)` launch written next to a TensorRT-LLM serving config: the same options, in-process.

Contract: `write_llm_api_example(out_dir, checkpoint, plan, target, version, names)` writes
`llm_api_example.py`, a script for the GPU host that reads llm_api_options.yaml (so it
can never disagree with what launch.sh serves), builds `tensorrt_llm.LLM(model=CKPT,
backend=..., kv_cache_config=KvCacheConfig(...), cuda_graph_config=CudaGraphConfig(...),
**the rest)`, renders EGM's prompt for one image with
`tensorrt_llm.inputs.default_multimodal_input_loader` (the checkpoint's own chat
template, which prefills `<think>`) and decodes greedily with
`SamplingParams(max_tokens=think budget + close + answer, temperature=0.0)`. The
thinking budget goes in `SamplingParams.thinking_token_budget` only where the pinned
release's SamplingParams has that field (`names["sampling_params"]`, from
egm_edge/builder/data/trtllm_options.toml): 1.2 has none (it came in 1.3.0rc24, PR
#14665), so there max_tokens is the only cap and the script says so. Every name the
script uses is checked against tests/builder/data/trtllm_upstream_names.toml
(tests/builder/test_trtllm_upstream.py). Pure Python; returns what the manifest records.
"""

from __future__ import annotations

from pathlib import Path

LLM_API_FILE = "llm_api_example.py"
BUDGET_FIELD = "thinking_token_budget"
_SENTINEL = "EGM_EDGE_EXPRESSION"

_SCRIPT = '''#!/usr/bin/env python3
"""Ground one image with TensorRT-LLM {version}'s Python LLM API, with the options launch.sh serves with.

Written by egm-edge build for {model} ({precision}) on {target}. Usage on the GPU host:

    python {file} IMAGE "the expression"

{budget_note}
"""
import json
import sys
from pathlib import Path

from tensorrt_llm import LLM, SamplingParams
from tensorrt_llm.inputs import default_multimodal_input_loader
from tensorrt_llm.llmapi import CudaGraphConfig, KvCacheConfig

CHECKPOINT = {checkpoint!r}
PROMPT = {prompt!r}  # EGM's user text; the image goes first
MAX_TOKENS = {max_tokens}  # think budget {think} + budget close {close} + answer {answer}


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: python {file} IMAGE EXPRESSION")
    image, expression = sys.argv[1], sys.argv[2]
    lines = (Path(__file__).resolve().parent / {options_file!r}).read_text().splitlines()
    options = json.loads("\\n".join(line for line in lines if not line.lstrip().startswith("#")))
    llm = LLM(model=CHECKPOINT, backend={backend!r},
              kv_cache_config=KvCacheConfig(**options.pop("kv_cache_config")),
              cuda_graph_config=CudaGraphConfig(**options.pop("cuda_graph_config")), **options)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0{budget_kwarg})
    model_type = json.loads((Path(CHECKPOINT) / "config.json").read_text())["model_type"]
    inputs = default_multimodal_input_loader(tokenizer=llm.tokenizer, model_dir=CHECKPOINT, model_type=model_type,
                                             modality="image", prompts=[PROMPT.replace({sentinel!r}, expression)],
                                             media=[image])
    for output in llm.generate(inputs, params):
        print(output.outputs[0].text)  # the reasoning, its close tag, then the box (0..1000 of the image)


if __name__ == "__main__":
    main()
'''


def budget_sentence(version: str, names: dict, think_budget: int) -> tuple[bool, str]:
    """(whether the release takes the budget in SamplingParams, the sentence that says how the reasoning is capped)."""
    if BUDGET_FIELD in names.get("sampling_params", ()):
        return True, f"SamplingParams.{BUDGET_FIELD}={think_budget} caps the reasoning; max_tokens caps the whole output"
    return False, (f"TensorRT-LLM {version}'s SamplingParams has no {BUDGET_FIELD} (it came in 1.3.0rc24), so only "
                   f"max_tokens caps the output and the {think_budget}-token think budget is not enforced")


def write_llm_api_example(out_dir, checkpoint, plan, target, version: str, names: dict) -> dict:
    """Write llm_api_example.py into `out_dir` (see the module docstring); returns {"file", "budget"}."""
    from egm_edge.builder.trtllm import OPTIONS_FILE
    from egm_edge.grounding import user_text

    takes_budget, sentence = budget_sentence(version, names, plan.think_budget)
    text = _SCRIPT.format(
        version=version, model=plan.model, precision=plan.precision, target=target.name, file=LLM_API_FILE,
        budget_note=sentence[0].upper() + sentence[1:] + ".", checkpoint=str(checkpoint),
        prompt=user_text(_SENTINEL, family=plan.family), sentinel=_SENTINEL, options_file=OPTIONS_FILE,
        backend=names["backend"], think=plan.think_budget, close=plan.close_tokens, answer=plan.answer_tokens,
        max_tokens=plan.think_budget + plan.close_tokens + plan.answer_tokens,
        budget_kwarg=f", {BUDGET_FIELD}={plan.think_budget}" if takes_budget else "")
    path = Path(out_dir) / LLM_API_FILE
    path.write_text(text)
    return {"file": LLM_API_FILE, "budget": sentence}
