"""Reasoning traces and answers: EGM's format, parseable back to the target box, ids read from the tokenizer."""

from __future__ import annotations

import pytest

from egm_edge.grounding import iou, parse_box, split_thinking, to_norm1000
from egm_edge.models.families import QWEN3_VL
from egm_edge.synth import answer, assistant_ids, assistant_text, draw, reasoning
from egm_edge.synth.traces import box_norm, candidates, fmt_box

HARD_CLOSE_TEXT = QWEN3_VL.hard_close
QWEN_STOP_THINKING = QWEN3_VL.tokens.stop_thinking


@pytest.fixture(scope="module")
def tok():
    from egm_edge.grounding import chat_prompt, user_text
    from egm_edge.synth.tokenizer import build_tokenizer

    corpus = []
    for i in range(200):
        s = draw(100, i)
        corpus += [chat_prompt(user_text(s.expr.sent, s.task), 0), assistant_text(s.scene, s.expr)]
    return build_tokenizer(corpus + [QWEN_STOP_THINKING], 400)


def test_parse_box_of_the_target_text_gives_back_the_box():
    for i in range(40):
        s = draw(1, i)
        text = assistant_text(s.scene, s.expr)
        r = parse_box(text, s.scene.width, s.scene.height)
        assert r.box_norm1000 == to_norm1000(s.box, s.scene.width, s.scene.height)
        assert iou(r.box, s.box) > 0.95, (s.expr.sent, r.box, s.box)
        reasoning_part, answer_part, closed = split_thinking(text)
        assert closed and answer_part == answer(s.scene, s.expr) and reasoning_part == reasoning(s.scene, s.expr)


def test_reasoning_lists_the_candidates_and_picks_the_target():
    for i in range(40):
        s = draw(2, i)
        r = reasoning(s.scene, s.expr)
        order = candidates(s.scene, s.expr)
        for j in order:
            assert fmt_box(box_norm(s.scene, j)) in r
        assert fmt_box(box_norm(s.scene, s.expr.target)) in r
        if s.expr.type != "unique":
            pos = ["first", "second", "third", "fourth", "fifth", "sixth"][order.index(s.expr.target)]
            assert r.endswith(f"the {pos} one."), r


def test_assistant_ids_full_and_cut(tok):
    s = draw(3, 1)
    r, a = reasoning(s.scene, s.expr), answer(s.scene, s.expr)
    end = tok.token_to_id("<|im_end|>")
    full = assistant_ids(tok, r, a)
    assert full[-1] == end
    assert tok.decode(full[:-1], skip_special_tokens=False) == r + HARD_CLOSE_TEXT + a
    n = len(tok.encode(r, add_special_tokens=False).ids)
    for cut in (0, 1, n // 2):
        ids = assistant_ids(tok, r, a, cut=cut)
        text = tok.decode(ids[:-1], skip_special_tokens=False)
        assert text.endswith(HARD_CLOSE_TEXT + a) and r.startswith(text[: -len(HARD_CLOSE_TEXT + a)])
    ids = assistant_ids(tok, r, a, cut=0, qwen_stop=True)
    assert tok.decode(ids[:-1], skip_special_tokens=False) == QWEN_STOP_THINKING + a


def test_cut_answer_follows_the_reasoning_so_far(tok):
    """A cut trace answers the target once its listing reached it, the shape it was listing
    before that, and an unreasoned reading-order guess when nothing is listed yet; uncut it is
    the answer."""
    from egm_edge.synth.expressions import members
    from egm_edge.synth.traces import cut_answer, listing

    seen_types = set()
    for i in range(60):
        s = draw(4, i)
        e, r = s.expr, reasoning(s.scene, s.expr)
        n = len(tok.encode(r, add_special_tokens=False).ids)
        assert cut_answer(tok, s.scene, e, n) == answer(s.scene, e)
        marks = listing(s.scene, e, r)
        assert [j for _, j in marks] == candidates(s.scene, e)
        first = min(members(s.scene, e.group), key=lambda j: (s.scene.shapes[j].cx, s.scene.shapes[j].cy))
        said = parse_box(cut_answer(tok, s.scene, e, 0), s.scene.width, s.scene.height).box_norm1000
        assert said == box_norm(s.scene, first)
        if e.type in ("ordinal", "superlative") and candidates(s.scene, e)[0] != e.target:
            # cut just after the first candidate's "[": that candidate, not the target yet
            at = marks[0][0] + 1
            offsets = tok.encode(r, add_special_tokens=False).offsets
            cut = next(k for k in range(1, n + 1) if offsets[k - 1][1] >= at)
            if offsets[cut - 1][1] < marks[1][0] + 1:
                said = parse_box(cut_answer(tok, s.scene, e, cut), s.scene.width, s.scene.height).box_norm1000
                assert said == box_norm(s.scene, marks[0][1])
                seen_types.add(e.type)
    assert seen_types, "no sample exercised a partial listing"
