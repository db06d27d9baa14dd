"""The model-family registry: one record per family, the only place that names a family's tokens,
prompts, module prefixes and architectures (issue 18)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from egm_edge.errors import CheckpointError, InputError, UnsupportedError
from egm_edge.models.families import STAGES, TASKS, families, family_names, family_of_config, get_family

PACKAGE = Path(__file__).resolve().parents[1] / "egm_edge"
REGISTRY_DIR = PACKAGE / "models" / "families"


def _family_literals() -> set[str]:
    """What only the registry may spell out: special tokens, prompt texts, prefixes, architecture names."""
    out: set[str] = set()
    for f in families():
        out.update(f.tokens.all())
        out.update(f.architectures)
        out.update(t.split("{expr}")[0] for t in f.templates.values())  # the fixed head of each template
        out.update((f.generation_prompt, f.language_prefix, f.vision_stem, *f.vision_prefixes))
        out.add(f.tokens.stop_thinking.split("\n")[0])
    # Tokens shared by every family's chat format are still family facts: keep them in the records.
    return {s for s in out if len(s.strip()) >= 4}


def _string_literals(path: Path):
    """(line, text) of every string constant in `path` that is not a docstring."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_no_family_literal_outside_the_registry():
    literals = _family_literals()
    stray = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if REGISTRY_DIR in path.parents:
            continue
        for line, text in _string_literals(path):
            hits = [lit for lit in literals if lit in text]
            if hits:
                stray.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {sorted(hits)[0]!r}")
    assert not stray, "family literals outside egm_edge/models/families:\n" + "\n".join(stray)


def test_the_scan_sees_what_it_looks_for(tmp_path):
    """The scan itself: a token in code is found, the same token in a docstring is not."""
    p = tmp_path / "m.py"
    p.write_text('"""Mentions <|image_pad|> in prose."""\nTOKEN = "<|image_pad|>"\n')
    assert [t for _, t in _string_literals(p)] == ["<|image_pad|>"]
    assert "<|image_pad|>" in _family_literals() and "model.visual." in _family_literals()


def test_registry_lists_both_families_with_whole_records():
    assert set(family_names()) >= {"qwen3_vl", "internvl"}
    for f in families():
        assert set(f.templates) == set(TASKS) and set(f.stages) <= set(STAGES)
        assert f.generation_prompt and f.tokens.image and f.tokens.stop and f.tokens.stop_thinking.endswith(f.tokens.think_close + "\n\n")
    with pytest.raises(InputError, match="Unknown model family 'llava'"):
        get_family("llava")


def test_egm_prompts_exactly():
    """EGM's evaluation templates (verl/scripts/sglang_infer.py): InternVL's grounding one ends with a space."""
    q, i = get_family("qwen3_vl"), get_family("internvl")
    assert q.user_text("the dog") == "Locate the dog, output its bbox coordinates using JSON format"
    assert q.user_text("the dog", "amodal") == "Locate the dog amodally, output its bbox coordinates using JSON format"
    assert i.user_text("the dog") == (
        "Please provide the bounding box coordinate of the region this sentence describes: <ref>the dog</ref> ")
    assert i.user_text("the dog", "amodal") == (
        "Please provide the amodal bounding box coordinate of the region this sentence describes: <ref>the dog</ref>")
    assert q.chat_prompt("T", 2) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>T<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert i.chat_prompt("T", 2) == "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nT<|im_end|>\n<|im_start|>assistant\n"


def test_family_of_config_reads_architecture_then_model_type():
    assert family_of_config({"architectures": ["Qwen3VLForConditionalGeneration"]}).name == "qwen3_vl"
    assert family_of_config({"architectures": ["InternVLChatModel"]}).name == "internvl"
    assert family_of_config({"model_type": "internvl"}).name == "internvl"
    with pytest.raises(CheckpointError, match="Unsupported architecture 'LlamaForCausalLM'"):
        family_of_config({"architectures": ["LlamaForCausalLM"]})


def test_a_stage_a_family_does_not_run_is_one_sentence():
    import dataclasses

    i = dataclasses.replace(get_family("internvl"), stages=frozenset({"plan"}))
    with pytest.raises(UnsupportedError) as e:
        i.require("export", "Checkpoint /m")
    msg = str(e.value)
    assert msg.count(". ") == 0 and "InternVL-3" in msg and "Qwen3-VL" in msg
    get_family("qwen3_vl").require("export", "Checkpoint /m")
