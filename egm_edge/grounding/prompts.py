"""EGM prompts, exactly as EGM evaluates, and the Qwen3-VL Thinking chat prompt.

Pure Python. The strings here are part of the model's input distribution: a
changed space changes accuracy, so tests pin them character for character.
"""

from __future__ import annotations

FAMILIES = ("qwen3_vl", "internvl")
TASKS = ("vanilla", "amodal")

_TEMPLATES = {
    ("qwen3_vl", "vanilla"): "Locate {expr}, output its bbox coordinates using JSON format",
    ("qwen3_vl", "amodal"): "Locate {expr} amodally, output its bbox coordinates using JSON format",
    ("internvl", "vanilla"): "Please provide the bounding box coordinate of the region this sentence describes: <ref>{expr}</ref>",
    ("internvl", "amodal"): "Please provide the amodal bounding box coordinate of the region this sentence describes: <ref>{expr}</ref>",
}

# Qwen's own thinking-budget method: inserted when the budget runs out.
QWEN_STOP_THINKING = (
    "Considering the limited time by the user, I have to give the solution based on the thinking directly now.\n"
    "</think>\n\n"
)

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# The Thinking template's generation prompt; the model's output then starts inside
# the reasoning and contains only the closing tag.
GENERATION_PROMPT = "<|im_start|>assistant\n<think>\n"

MAX_EXPRESSION_CHARS = 1000


def check_choice(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        from egm_edge.errors import InputError

        raise InputError(f"Unknown {what} {value!r}. Choose from: {', '.join(choices)}.")
    return value


def clean_expression(expression: str) -> str:
    """The referring expression as it goes into the prompt; empty or huge ones are refused."""
    from egm_edge.errors import InputError

    if not isinstance(expression, str):
        raise InputError(f"The expression must be text, got {type(expression).__name__}.")
    try:
        expression.encode("utf-8")
    except UnicodeEncodeError as e:
        # Python keeps argv bytes that are not UTF-8 as surrogates U+DC80..U+DCFF (surrogateescape).
        c = ord(expression[e.start])
        what = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"U+{c:04X}"
        raise InputError(f"The expression is not valid UTF-8 text ({what} at character {e.start + 1}); "
                         "pass it in UTF-8 (check the terminal's or the client's encoding).") from None
    expr = " ".join(expression.split())
    if not expr:
        raise InputError("The expression is empty; give a referring expression such as 'the red car on the left'.")
    if len(expr) > MAX_EXPRESSION_CHARS:
        raise InputError(
            f"The expression has {len(expr)} characters, over the limit of {MAX_EXPRESSION_CHARS}; shorten it."
        )
    return expr


def user_text(expression: str, task: str = "vanilla", family: str = "qwen3_vl") -> str:
    """The user-turn text EGM sends with the image for this family and task."""
    check_choice(family, FAMILIES, "model family")
    check_choice(task, TASKS, "task")
    return _TEMPLATES[(family, task)].format(expr=clean_expression(expression))


def qwen_chat_prompt(text: str, n_image_tokens: int) -> str:
    """One user turn (image first, then text), no system prompt, Thinking generation prompt.

    Equals the Qwen3-VL chat template rendered with add_generation_prompt=True, with
    the image placeholder expanded to `n_image_tokens` pads as the HF processor does.
    """
    if n_image_tokens < 0:
        raise ValueError(f"n_image_tokens must be >= 0, got {n_image_tokens}")
    image = "<|vision_start|>" + "<|image_pad|>" * n_image_tokens + "<|vision_end|>" if n_image_tokens else ""
    return f"<|im_start|>user\n{image}{text}<|im_end|>\n{GENERATION_PROMPT}"


def format_answer(box_norm1000, label: str) -> str:
    """The answer Qwen3-VL (and EGM) emits after `</think>\\n\\n`: a fenced JSON list."""
    x1, y1, x2, y2 = (int(round(v)) for v in box_norm1000)
    import json

    return f'```json\n[\n\t{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}], "label": {json.dumps(label)}}}\n]\n```'


def split_thinking(text: str) -> tuple[str, str, bool]:
    """(reasoning, answer, closed): the text before and after the last `</think>`.

    The generation prompt already opened the thinking, so an output without the
    closing tag is all reasoning (closed=False) and has no answer part.
    """
    head, sep, tail = text.rpartition(THINK_CLOSE)
    if not sep:
        return text.strip(), "", False
    if THINK_OPEN in head:
        head = head.split(THINK_OPEN, 1)[1]
    return head.strip(), tail.strip(), True
