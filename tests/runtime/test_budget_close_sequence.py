"""The thinking budget with a close of several tokens (InternVL's Qwen2.5 tokenizer has no `</think>` token).

A scripted fake model emits the close as text tokens `</`, `think`, `>`; a BPE merges the tag's last `>`
with the newlines after it (`>\\n\\n` is one token) and its first `</` with punctuation before it (`.</`),
so the policy accepts those edges too. Qwen3-VL's one-token close is covered by test_budget.py.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egm_edge.runtime.budget import BudgetPolicy, ThinkTokens
from egm_edge.runtime.settings import UNLIMITED, DecodeSettings
from test_budget import run  # noqa: E402  (the same policy driver as the single-token tests)

STOP, THINK, ANS, NL = 0, 5, 7, 10
LT_SLASH, WORD, GT, GT_NL2, DOT_LT_SLASH = 101, 102, 103, 104, 105  # "</", "think", ">", ">\n\n", ".</"
CLOSE = (LT_SLASH, WORD, GT)
IDS = ThinkTokens(think_close=CLOSE, hard_close=(NL, LT_SLASH, WORD, GT_NL2), qwen_close=(20, 21, 22, LT_SLASH, WORD, GT_NL2),
                  stop=(STOP,), close_first=frozenset({DOT_LT_SLASH}), close_last=frozenset({GT_NL2}))


def fake_model(natural_think: int, natural_answer: int, close=(LT_SLASH, WORD, GT_NL2)):
    """Thinks `natural_think` tokens, emits `close`, answers `natural_answer` tokens, stops."""

    def next_token(history):
        end = IDS.close_end(history)
        if end is None:
            if len(history) < natural_think:
                return THINK
            return close[len(history) - natural_think]
        return ANS if len(history) - end < natural_answer else STOP

    return next_token




@pytest.mark.parametrize("close", [(LT_SLASH, WORD, GT), (LT_SLASH, WORD, GT_NL2), (DOT_LT_SLASH, WORD, GT)])
def test_a_natural_close_of_three_tokens_switches_the_phase(close):
    p = BudgetPolicy(DecodeSettings(UNLIMITED), IDS, max_new_tokens=4096)
    out = run(p, fake_model(30, 8, close))
    assert out == [THINK] * 30 + list(close) + [ANS] * 8 + [STOP]
    assert p.think_tokens == 30 and p.answer_tokens == 8 and not p.budget_forced


def test_the_close_s_middle_must_match():
    ids = ThinkTokens(CLOSE, (LT_SLASH, WORD, GT), (LT_SLASH, WORD, GT), (STOP,))
    assert ids.close_end([THINK, LT_SLASH, THINK, GT]) is None and ids.close_end([LT_SLASH, LT_SLASH, WORD, GT, ANS]) == 4
    assert ids.partial_close([THINK, LT_SLASH]) == 1 and ids.partial_close([LT_SLASH, WORD]) == 2
    assert ids.partial_close([WORD, GT]) == 0 and ids.partial_close([]) == 0


def test_hard_budget_forces_the_encoded_close_and_counts_no_close_token():
    p = BudgetPolicy(DecodeSettings(12, "hard"), IDS, max_new_tokens=4096)
    out = run(p, fake_model(30, 3))
    assert out[:15] == [THINK] * 11 + [NL, LT_SLASH, WORD, GT_NL2]
    assert p.think_tokens == 12 and p.budget_forced and p.answer_tokens == 3


def test_qwen_mode_and_budget_zero():
    p = BudgetPolicy(DecodeSettings(12, "qwen"), IDS, max_new_tokens=4096)
    out = run(p, fake_model(30, 3))
    assert out[:15] == [THINK] * 9 + [20, 21, 22, LT_SLASH, WORD, GT_NL2] and p.think_tokens == 12
    p = BudgetPolicy(DecodeSettings(0), IDS, max_new_tokens=4096)
    out = run(p, fake_model(30, 3))
    assert out[:3] == [LT_SLASH, WORD, GT_NL2] and p.think_tokens == 0 and p.budget_forced


def test_a_close_begun_when_the_budget_runs_out_is_completed_not_restarted():
    # The model starts its close where the budget would force the hard close (after 6 of 7, its "\n" fitting
    # last): the policy forces only the rest of the close.
    p = BudgetPolicy(DecodeSettings(7, "hard"), IDS, max_new_tokens=4096)
    out = run(p, fake_model(5, 2))
    assert out[:8] == [THINK] * 5 + [LT_SLASH, WORD, GT_NL2]
    assert p.think_tokens == 5 and p.budget_forced and out.count(LT_SLASH) == 1


def test_pending_holds_only_a_partial_close():
    p = BudgetPolicy(DecodeSettings(UNLIMITED), IDS, max_new_tokens=4096)
    seen = []
    for t in [THINK, LT_SLASH, WORD, THINK, DOT_LT_SLASH, WORD, GT_NL2, ANS]:
        p.observe(t)
        seen.append(p.pending)
    assert seen == [0, 1, 2, 0, 1, 2, 0, 0] and p.phase == "answer" and p.think_tokens == 4


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 200), st.sampled_from(["hard", "qwen", "none"]), st.integers(0, 300), st.integers(0, 40),
       st.integers(1, 32), st.integers(60, 600), st.sampled_from([(LT_SLASH, WORD, GT), (DOT_LT_SLASH, WORD, GT_NL2)]))
def test_invariants(budget, mode, natural_think, natural_answer, max_answer, max_new, close):
    p = BudgetPolicy(DecodeSettings(budget, mode, max_answer), IDS, max_new_tokens=max_new)
    out = run(p, fake_model(natural_think, natural_answer, close))
    assert len(out) <= max_new
    if mode != "none":
        assert p.think_tokens <= budget
    assert p.answer_tokens <= max_answer
    end = IDS.close_end(out)
    assert end is not None and IDS.close_end(out[end:]) is None  # exactly one close, and an answer after it
    assert p.think_tokens == end - len(CLOSE)
    assert out[-1] == STOP


def test_from_tokenizer_encodes_a_text_tag(tmp_path):
    """A tokenizer without a `</think>` token (InternVL's): the close is the tag's text, edges from the vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from egm_edge.models.families import INTERNVL
    from egm_edge.runtime.bundle import GenerationConfig

    words = ["[unk]", "</", "think", ">", ">\n\n", "Considering", "\n", "now", ".", "x"]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[unk]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"</|>\n\n|>|\w+|\n|[^\w\s]"), behavior="isolated")
    tok.add_special_tokens(list(INTERNVL.tokens.stop))
    gen = GenerationConfig.for_family(INTERNVL)
    ids = ThinkTokens.from_tokenizer(tok, gen)
    assert ids.think_close == (1, 2, 3)
    assert 4 in ids.close_last and 3 in ids.close_last and ids.close_first >= {1}
    assert ids.stop == tuple(tok.token_to_id(t) for t in INTERNVL.tokens.stop)


def test_qwen25_bpe_merges_the_tag_with_the_newlines(qwen_tokenizer_dir):
    """Qwen's BPE without the `</think>` token (InternVL-3's Qwen2.5 tokenizer): the tag is `</`, `think`, `>`, but
    in "\\n</think>\\n\\n" the last piece is `>\\n\\n` (and `><` before a box);
    the hard close and the stop sentence are still found, and a model writing the tag either way closes its reasoning."""
    import json

    from tokenizers import Tokenizer

    from egm_edge.models.families import INTERNVL
    from egm_edge.runtime.bundle import GenerationConfig

    d = json.loads((qwen_tokenizer_dir / "tokenizer.json").read_text())
    d["added_tokens"] = [t for t in d["added_tokens"] if "think" not in t["content"]]
    tok = Tokenizer.from_str(json.dumps(d))
    ids = ThinkTokens.from_tokenizer(tok, GenerationConfig.for_family(INTERNVL))
    enc = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    assert ids.think_close == tuple(enc("</think>")) and len(ids.think_close) == 3
    assert ids.close_start(ids.hard_close) == 1 and ids.hard_close[-1] != ids.think_close[-1]
    for text in ("The dog.\n</think>\n\n<box>[[1, 2, 3, 4]]</box>", "The dog</think><box>", "The dog.</think>\n<box>"):
        out = enc(text)
        end = ids.close_end(out)
        assert end is not None and "</think>" in tok.decode(out[:end]) and "</" not in tok.decode(out[: end - 3]), text
    p = BudgetPolicy(DecodeSettings(UNLIMITED), ids, max_new_tokens=4096)
    for t in enc("The dog.\n</think>\n\n<box>[[1, 2, 3, 4]]</box>"):
        p.observe(t)
    assert p.closed and p.think_tokens == len(enc("The dog.\n"))
