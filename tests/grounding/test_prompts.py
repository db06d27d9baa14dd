import re

import pytest

from egm_edge.errors import InputError
from egm_edge.grounding import (
    GENERATION_PROMPT,
    QWEN_STOP_THINKING,
    format_answer,
    parse_box,
    qwen_chat_prompt,
    split_thinking,
    user_text,
)


def test_qwen_prompts_are_egms_exactly():
    assert user_text("the man in red") == "Locate the man in red, output its bbox coordinates using JSON format"
    assert (
        user_text("the man in red", task="amodal")
        == "Locate the man in red amodally, output its bbox coordinates using JSON format"
    )


def test_internvl_prompts_are_egms_exactly():
    assert (
        user_text("left dog", family="internvl")
        == "Please provide the bounding box coordinate of the region this sentence describes: <ref>left dog</ref>"
    )
    assert user_text("left dog", task="amodal", family="internvl").startswith(
        "Please provide the amodal bounding box coordinate"
    )


def test_thinking_chat_prompt_is_one_user_turn_image_first():
    p = qwen_chat_prompt("Locate x, output its bbox coordinates using JSON format", 4)
    assert p == (
        "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>"
        "Locate x, output its bbox coordinates using JSON format<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )
    assert p.endswith(GENERATION_PROMPT)
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
    ours = qwen_chat_prompt("Locate a, output its bbox coordinates using JSON format", 1)
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
    assert QWEN_STOP_THINKING.endswith("</think>\n\n")


@pytest.mark.parametrize("expr, where", [("the caf\udce9 sign", "byte 0xe9"), ("a \ud800 b", "U+D800")])
def test_expression_that_is_not_utf8_is_refused(expr, where):
    # "\udce9": the byte 0xe9 in argv, as Python keeps undecodable bytes (surrogateescape); "\ud800": a lone surrogate.
    with pytest.raises(InputError, match=re.escape(f"not valid UTF-8 text ({where}")):
        user_text(expr)
