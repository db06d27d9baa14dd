import re

import pytest

from egm_edge.errors import InputError
from egm_edge.grounding import chat_prompt, format_answer, parse_box, split_thinking, user_text
from egm_edge.models.families import INTERNVL, QWEN3_VL


def test_qwen_prompts_are_egms_exactly():
    assert user_text("the man in red") == "Locate the man in red, output its bbox coordinates using JSON format"
    assert (
        user_text("the man in red", task="amodal")
        == "Locate the man in red amodally, output its bbox coordinates using JSON format"
    )


def test_internvl_prompts_are_egms_exactly():
    # EGM's verl/scripts/sglang_infer.py: the grounding template ends with "</ref> " (a trailing space), amodal does not.
    assert (
        user_text("left dog", family="internvl")
        == "Please provide the bounding box coordinate of the region this sentence describes: <ref>left dog</ref> "
    )
    assert (
        user_text("left dog", task="amodal", family="internvl")
        == "Please provide the amodal bounding box coordinate of the region this sentence describes: <ref>left dog</ref>"
    )


def test_prompts_come_from_the_family_record():
    for fam in (QWEN3_VL, INTERNVL):
        for task in ("vanilla", "amodal"):
            assert user_text("  the  dog ", task, fam.name) == fam.user_text("the dog", task) == user_text("the dog", task, fam)
        assert chat_prompt("t", 3, fam.name) == fam.chat_prompt("t", 3)
    assert chat_prompt("t", 3) == QWEN3_VL.chat_prompt("t", 3)
    with pytest.raises(InputError, match="Unknown model family 'llava'. Choose from: qwen3_vl, internvl"):
        user_text("x", family="llava")


def test_internvl_chat_prompt_wraps_the_image_in_img_tags():
    p = chat_prompt(user_text("left dog", family="internvl"), 2, family="internvl")
    assert p == (
        "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\n"
        "Please provide the bounding box coordinate of the region this sentence describes: <ref>left dog</ref> "
        "<|im_end|>\n<|im_start|>assistant\n"
    )


def test_thinking_chat_prompt_is_one_user_turn_image_first():
    p = chat_prompt("Locate x, output its bbox coordinates using JSON format", 4)
    assert p == (
        "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>"
        "Locate x, output its bbox coordinates using JSON format<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )
    assert p.endswith(QWEN3_VL.generation_prompt)
    assert "system" not in p


def test_chat_prompt_matches_the_real_template(qwen_tokenizer_dir):
    """Render the shipped Qwen3-VL template (Thinking generation prompt) and compare."""
    jinja2 = pytest.importorskip("jinja2")
    tpl = (qwen_tokenizer_dir / "chat_template.instruct.jinja").read_text()
    env = jinja2.Environment()
    rendered = env.from_string(tpl).render(
        messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Locate a, output its bbox coordinates using JSON format"}]}],
        add_generation_prompt=True,
    )
    # The Thinking variant differs only in opening the reasoning in the generation prompt.
    rendered = rendered + "<think>\n"
    ours = chat_prompt("Locate a, output its bbox coordinates using JSON format", 1)
    assert ours == rendered


@pytest.mark.parametrize("bad", ["", "   ", "\n\t"])
def test_empty_expression_is_refused(bad):
    with pytest.raises(InputError, match="empty"):
        user_text(bad)


def test_huge_expression_is_refused():
    with pytest.raises(InputError, match="over the limit"):
        user_text("a" * 5000)


def test_unknown_task_lists_choices():
    with pytest.raises(InputError, match="Choose from: vanilla, amodal"):
        user_text("x", task="modal")


def test_expression_whitespace_is_normalised():
    assert user_text("  the   red\ncar ") == "Locate the red car, output its bbox coordinates using JSON format"


def test_format_answer_round_trips_through_the_parser():
    text = "Two dogs; the left one.\n</think>\n\n" + format_answer((120, 50, 480, 990), 'dog "left"')
    r = parse_box(text, 1000, 1000)
    assert r.method == "bbox_2d" and r.raw == (120, 50, 480, 990)


def test_split_thinking():
    assert split_thinking("a b\n</think>\n\nans") == ("a b", "ans", True)
    assert split_thinking("<think>\nx\n</think>y") == ("x", "y", True)
    assert split_thinking("still thinking") == ("still thinking", "", False)
    assert QWEN3_VL.tokens.stop_thinking.endswith("</think>\n\n")
    assert split_thinking("<think>\nx\n</think>y", family="internvl") == ("x", "y", True)


def test_split_thinking_uses_the_familys_tags():
    from dataclasses import replace

    from egm_edge.models.families import register, unregister

    toy = replace(INTERNVL, name="toy_reasoner", architectures=("ToyForGrounding",), model_types=("toy",),
                  tokens=replace(INTERNVL.tokens, think_open="<reason>", think_close="</reason>"))
    register(toy)
    try:
        assert split_thinking("<reason>a</reason>b</think>", family="toy_reasoner") == ("a", "b</think>", True)
        assert split_thinking("a</think>b", family="toy_reasoner") == ("a</think>b", "", False)
    finally:
        unregister("toy_reasoner")


@pytest.mark.parametrize("expr, where", [("the caf\udce9 sign", "byte 0xe9"), ("a \ud800 b", "U+D800")])
def test_expression_that_is_not_utf8_is_refused(expr, where):
    # "\udce9": the byte 0xe9 in argv, as Python keeps undecodable bytes (surrogateescape); "\ud800": a lone surrogate.
    with pytest.raises(InputError, match=re.escape(f"not valid UTF-8 text ({where}")):
        user_text(expr)
