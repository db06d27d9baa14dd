"""EGM-style reasoning traces and answers for synthetic samples, and their training token ids.

Contract: `reasoning(scene, e)` is a short chain of thought that lists the
candidate shapes with their boxes (0..1000 of the original image, EGM's
round(v*1000/W)) in an order that makes the pick a position (ordinal: along the
side; relational: the group along the relation's direction, then the anchor that
confirms it; superlative: by area), then names the pick ("... The largest is the
first one.").
Each listing step is a simpler question than the expression (the next shape along
an axis, the next largest), which is what the reasoning buys over answering at once. `answer(scene, e)` is exactly what
Qwen3-VL/EGM emits after the reasoning (`grounding.format_answer`).
`cut_answer(tok, scene, e, cut)` is the answer a model that answers from its reasoning
gives when the reasoning is cut after `cut` tokens: the target once the listing has
reached it, else the last shape the listing has started on, else (nothing listed yet)
the first member of the group in reading order, an unreasoned guess.
`assistant_ids(tok, reasoning, answer, cut=..., qwen_stop=...)` assembles the
assistant token ids as the runtime's budget policy produces them: reasoning ids
(optionally cut after `cut` tokens), the close (the hard "\\n</think>\\n\\n" or
Qwen's stop sentence, each tokenized on its own as the policy does), the answer
and <|im_end|>. Ids are always read from the tokenizer; the texts from the Qwen3-VL
family record (the tiny grounder's, `egm_edge.synth.tokenizer.FAMILY`).
"""

from __future__ import annotations

from egm_edge.grounding import format_answer, to_norm1000
from egm_edge.synth.expressions import ORDINALS, Expression, axis_key, members
from egm_edge.synth.tokenizer import FAMILY
from egm_edge.synth.world import Scene

# Listing a relational group along the relation's direction puts the target first: it is
# the only member on that side of the anchor, every other member is clearly on the other.
# The group comes before the anchor, so a reasoning cut early has already listed the target.
_RELATION_SIDE = {"left of": "left", "right of": "right", "above": "top", "below": "bottom"}
_SIDE_ORDER = {"left": "left to right", "right": "right to left", "top": "top to bottom", "bottom": "bottom to top"}


def box_norm(scene: Scene, i: int) -> tuple[int, int, int, int]:
    return to_norm1000(scene.shapes[i].box, scene.width, scene.height)


def fmt_box(b) -> str:
    return "[" + ", ".join(str(int(v)) for v in b) + "]"


def _listing(boxes: list[str]) -> str:
    if len(boxes) == 1:
        return boxes[0]
    return ", ".join(boxes[:-1]) + " and " + boxes[-1]


def _group_sentence(scene: Scene, e: Expression, order: list[int], how: str = "") -> str:
    boxes = [fmt_box(box_norm(scene, i)) for i in order]
    noun = e.group.noun(plural=len(order) > 1)
    verb = "are" if len(order) > 1 else "is"
    return f"The {noun}{how} {verb} at {_listing(boxes)}."


def candidates(scene: Scene, e: Expression) -> list[int]:
    """The shapes the reasoning lists, in the order it lists them."""
    group = members(scene, e.group)
    if e.type == "ordinal":
        return sorted(group, key=axis_key(scene, e.side))
    if e.type == "relational":
        return sorted(group, key=axis_key(scene, _RELATION_SIDE[e.relation]))
    if e.type == "superlative":
        sign = -1 if e.superlative == "largest" else 1
        return sorted(group, key=lambda i: (sign * scene.shapes[i].area, scene.shapes[i].cx))
    return sorted(group, key=_reading_order(scene))


def _reading_order(scene: Scene):
    return lambda i: (scene.shapes[i].cx, scene.shapes[i].cy)


def reasoning(scene: Scene, e: Expression) -> str:
    """The chain of thought for this sample (without the closing tag)."""
    order = candidates(scene, e)
    pos = ORDINALS[order.index(e.target)]
    if e.type == "unique":
        return f"The {e.group.noun()} is at {fmt_box(box_norm(scene, e.target))}."
    if e.type == "relational":
        (a,) = members(scene, e.anchor)
        how = f" from {_SIDE_ORDER[_RELATION_SIDE[e.relation]]}" if len(order) > 1 else ""
        return (
            f"{_group_sentence(scene, e, order, how)} The {e.anchor.noun()} is at {fmt_box(box_norm(scene, a))}. "
            f"The {e.group.noun()} {e.relation} it is the {pos} one."
        )
    if e.type == "superlative":
        other = "smallest" if e.superlative == "largest" else "largest"
        how = f" from {e.superlative} to {other}"
        return f"{_group_sentence(scene, e, order, how)} The {e.superlative} is the {pos} one."
    how = f" from {_SIDE_ORDER[e.side]}"
    pick = f"{e.side}most" if e.rank == 0 else f"{ORDINALS[e.rank]} from the {e.side}"
    return f"{_group_sentence(scene, e, order, how)} The {pick} is the {pos} one."


def listing(scene: Scene, e: Expression, text: str) -> list[tuple[int, int]]:
    """(offset of the box's "[" in `text`, shape) for each candidate the reasoning lists, in order
    (a relational reasoning's anchor box, after them, is not a candidate)."""
    pos, out = 0, []
    for i in candidates(scene, e):
        at = text.index(fmt_box(box_norm(scene, i)), pos)
        out.append((at, i))
        pos = at + 1
    return out


def cut_pick(scene: Scene, e: Expression, text: str, chars: int) -> int:
    """The shape the reasoning `text` cut after `chars` characters supports (see the module contract)."""
    seen = [i for at, i in listing(scene, e, text) if at < chars]
    if e.target in seen:
        return e.target
    if seen:
        return seen[-1]
    return min(members(scene, e.group), key=_reading_order(scene))


def cut_answer(tok, scene: Scene, e: Expression, cut: int) -> str:
    """The answer after the reasoning's first `cut` tokens (ids and offsets from `tok`)."""
    text = reasoning(scene, e)
    enc = tok.encode(text, add_special_tokens=False)
    cut = max(0, min(int(cut), len(enc.ids)))
    chars = enc.offsets[cut - 1][1] if cut else 0
    return format_answer(box_norm(scene, cut_pick(scene, e, text, chars)), e.sent)


def answer(scene: Scene, e: Expression) -> str:
    return format_answer(box_norm(scene, e.target), e.sent)


def assistant_text(scene: Scene, e: Expression) -> str:
    """The full natural output: reasoning, close, answer (no end-of-turn token)."""
    return reasoning(scene, e) + FAMILY.hard_close + answer(scene, e)


def _ids(tok, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False).ids)


def assistant_ids(tok, reasoning_text: str, answer_text: str, cut: int | None = None, qwen_stop: bool = False) -> list[int]:
    """Assistant token ids; `cut` keeps only that many reasoning tokens (a budget-forced close)."""
    r = _ids(tok, reasoning_text)
    if cut is not None:
        r = r[: max(0, int(cut))]
    close = _ids(tok, FAMILY.tokens.stop_thinking if qwen_stop else FAMILY.hard_close)
    end_of_turn = FAMILY.tokens.stop[0]
    end = tok.token_to_id(end_of_turn)
    if end is None:
        raise ValueError(f"the tokenizer has no {end_of_turn} token")
    return r + close + _ids(tok, answer_text) + [end]
