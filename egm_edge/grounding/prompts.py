"""EGM prompts, exactly as EGM evaluates, and the chat prompt around them, for any registered family.

Pure Python. The strings themselves live in the family records (egm_edge.models.families),
the only place that names a family's prompts and tokens; this module cleans the expression
and asks the record. The strings are part of the model's input distribution: a changed
space changes accuracy, so tests pin them character for character.
"""

from __future__ import annotations

from egm_edge.models.families import TASKS, get_family

__all__ = ["TASKS", "chat_prompt", "check_choice", "clean_expression", "format_answer",
           "split_thinking", "user_text"]

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


def user_text(expression: str, task: str = "vanilla", family="qwen3_vl") -> str:
    """The user-turn text EGM sends with the image for this family (a name or a record) and task."""
    fam = get_family(family)
    return fam.user_text(clean_expression(expression), task)


def chat_prompt(text: str, n_image_tokens: int, family="qwen3_vl") -> str:
    """One user turn (image first, then text), no system prompt, then the family's generation prompt.

    Equals the family's chat template rendered with add_generation_prompt=True (for Qwen3-VL the
    Thinking one), with the image placeholder expanded to `n_image_tokens` image tokens as the HF
    processor does.
    """
    return get_family(family).chat_prompt(text, n_image_tokens)


def format_answer(box_norm1000, label: str) -> str:
    """The answer Qwen3-VL (and EGM) emits after `</think>\\n\\n`: a fenced JSON list."""
    x1, y1, x2, y2 = (int(round(v)) for v in box_norm1000)
    import json

    return f'```json\n[\n\t{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}], "label": {json.dumps(label)}}}\n]\n```'


def split_thinking(text: str, family="qwen3_vl") -> tuple[str, str, bool]:
    """(reasoning, answer, closed): the text before and after the last closing think tag of `family`.

    The generation prompt already opened the thinking, so an output without the
    closing tag is all reasoning (closed=False) and has no answer part.
    """
    tokens = get_family(family).tokens
    head, sep, tail = text.rpartition(tokens.think_close)
    if not sep:
        return text.strip(), "", False
    if tokens.think_open in head:
        head = head.split(tokens.think_open, 1)[1]
    return head.strip(), tail.strip(), True
