"""The thinking budget policy, driven by a scripted fake model (no weights, no executor)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egm_edge.errors import InputError
from egm_edge.runtime.budget import BudgetPolicy, ThinkTokens
from egm_edge.runtime.settings import UNLIMITED, DecodeSettings
from egm_edge.runtime.sampling import Sampler, SamplingSpec

STOP, THINK, ANS, CLOSE, NL, NL2 = 0, 5, 7, 100, 10, 11
IDS = ThinkTokens(think_close=CLOSE, hard_close=(NL, CLOSE, NL2), qwen_close=(20, 21, 22, 23, CLOSE, NL2), stop=(STOP,))


def fake_model(natural_think: int, natural_answer: int):
    """A model that thinks for `natural_think` tokens, closes, answers `natural_answer` tokens, stops."""

    def next_token(history):
        if CLOSE not in history:
            return THINK if len(history) < natural_think else CLOSE
        after = len(history) - history.index(CLOSE) - 1
        return ANS if after < natural_answer else STOP

    return next_token


def run(policy, model):
    out = []
    while not policy.done:
        t = policy.forced()
        if t is None:
            t = model(out)
        out.append(t)
        policy.observe(t)
    return out


def test_unlimited_budget_lets_the_model_close_itself():
    p = BudgetPolicy(DecodeSettings(UNLIMITED), IDS, max_new_tokens=4096)
    out = run(p, fake_model(30, 8))
    assert p.think_tokens == 30 and p.answer_tokens == 8 and not p.budget_forced
    assert out == [THINK] * 30 + [CLOSE] + [ANS] * 8 + [STOP]


def test_budget_zero_answers_at_once():
    p = BudgetPolicy(DecodeSettings(0), IDS, max_new_tokens=4096)
    out = run(p, fake_model(30, 3))
    assert p.think_tokens == 0 and p.budget_forced
    assert out[:2] == [CLOSE, NL2]  # the leading newline of the close does not fit a zero budget


def test_hard_budget_forces_the_natural_close():
    p = BudgetPolicy(DecodeSettings(12, "hard"), IDS, max_new_tokens=4096)
    out = run(p, fake_model(30, 3))
    assert p.think_tokens == 12 and p.budget_forced
    assert out[:14] == [THINK] * 11 + [NL, CLOSE, NL2]


def test_qwen_mode_forces_the_stop_sentence_inside_the_budget():
    p = BudgetPolicy(DecodeSettings(12, "qwen"), IDS, max_new_tokens=4096)
    out = run(p, fake_model(30, 3))
    assert p.think_tokens == 12
    assert out[:14] == [THINK] * 8 + [20, 21, 22, 23, CLOSE, NL2]


def test_qwen_mode_degrades_to_hard_when_the_sentence_does_not_fit():
    p = BudgetPolicy(DecodeSettings(2, "qwen"), IDS, max_new_tokens=4096)
    out = run(p, fake_model(30, 3))
    assert p.think_tokens == 2 and out[:4] == [THINK, NL, CLOSE, NL2]


def test_budget_not_reached_is_not_forced():
    p = BudgetPolicy(DecodeSettings(64), IDS, max_new_tokens=4096)
    run(p, fake_model(10, 3))
    assert not p.budget_forced and p.think_tokens == 10


def test_mode_none_ignores_the_budget():
    p = BudgetPolicy(DecodeSettings(3, "none"), IDS, max_new_tokens=4096)
    run(p, fake_model(10, 3))
    assert p.think_tokens == 10 and not p.budget_forced


def test_answer_is_capped_separately():
    p = BudgetPolicy(DecodeSettings(UNLIMITED, max_answer_tokens=5), IDS, max_new_tokens=4096)
    out = run(p, fake_model(4, 50))
    assert p.answer_tokens == 5 and p.truncated and out[-1] == STOP


def test_total_never_exceeds_the_planned_sequence():
    p = BudgetPolicy(DecodeSettings(UNLIMITED, max_answer_tokens=8), IDS, max_new_tokens=40)
    out = run(p, fake_model(10_000, 6))
    assert len(out) <= 40 and p.budget_forced and p.answer_tokens == 6


def test_too_little_room_is_a_clear_error():
    with pytest.raises(InputError, match="new tokens fit"):
        BudgetPolicy(DecodeSettings(UNLIMITED, max_answer_tokens=128), IDS, max_new_tokens=50)


@pytest.mark.parametrize("kw", [dict(think_budget=-1), dict(budget_mode="soft"), dict(max_answer_tokens=0)])
def test_bad_specs(kw):
    with pytest.raises(InputError):
        DecodeSettings(**kw)


def test_settings_not_given_take_the_builtin_defaults():
    p = BudgetPolicy(DecodeSettings(), IDS, max_new_tokens=4096)
    assert p.settings.unlimited and p.settings.budget_mode == "hard" and p.settings.max_answer_tokens == 128
    run(p, fake_model(30, 3))
    assert p.think_tokens == 30 and not p.budget_forced


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 200), st.sampled_from(["hard", "qwen", "none"]), st.integers(0, 300), st.integers(0, 40),
       st.integers(1, 32), st.integers(60, 600))
def test_invariants(budget, mode, natural_think, natural_answer, max_answer, max_new):
    p = BudgetPolicy(DecodeSettings(budget, mode, max_answer), IDS, max_new_tokens=max_new)
    out = run(p, fake_model(natural_think, natural_answer))
    assert len(out) <= max_new
    if mode != "none":
        assert p.think_tokens <= budget
    assert p.answer_tokens <= max_answer
    assert out.count(CLOSE) == 1  # an answer always follows a closed reasoning
    assert out[-1] == STOP


def test_real_tokenizer_ids(qwen_tokenizer_dir):
    from tokenizers import Tokenizer

    ids = ThinkTokens.from_tokenizer(Tokenizer.from_file(str(qwen_tokenizer_dir / "tokenizer.json")))
    assert ids.think_close == (151668,) and ids.hard_close == (198, 151668, 271)
    assert ids.qwen_close[-2:] == (151668, 271) and 151645 in ids.stop


def test_think_tokens_read_the_bundles_generation_config(qwen_tokenizer_dir):
    """The closing tag and the stop tokens are the bundle's (by name); the forced texts its family record's."""
    from tokenizers import Tokenizer

    from egm_edge.errors import CheckpointError
    from egm_edge.models.families import QWEN3_VL
    from egm_edge.runtime.bundle import GenerationConfig

    tok = Tokenizer.from_file(str(qwen_tokenizer_dir / "tokenizer.json"))
    assert GenerationConfig() == GenerationConfig.for_family("qwen3_vl")
    assert ThinkTokens.from_tokenizer(tok, GenerationConfig()) == ThinkTokens.from_tokenizer(tok)
    ids = ThinkTokens.from_tokenizer(tok, GenerationConfig(stop_tokens=("<|endoftext|>",)))
    assert ids.stop == (tok.token_to_id("<|endoftext|>"),)
    assert ids.qwen_close == tuple(tok.encode(QWEN3_VL.tokens.stop_thinking, add_special_tokens=False).ids)
    assert ids.hard_close == tuple(tok.encode(QWEN3_VL.hard_close, add_special_tokens=False).ids)
    with pytest.raises(InputError, match=r"no '<\|fim_end\|>' token; it is not a Qwen3-VL Thinking tokenizer\.$"):
        ThinkTokens.from_tokenizer(tok, GenerationConfig(think_close="<|fim_end|>"))
    with pytest.raises(InputError, match="none of the stop tokens <eos>; cannot tell when to stop"):
        ThinkTokens.from_tokenizer(tok, GenerationConfig(stop_tokens=("<eos>",)))
    # A closing tag the family's forced texts do not end with: the bundle mixes files.
    with pytest.raises(CheckpointError, match="closes the reasoning with '<think>'.*rebuild it"):
        ThinkTokens.from_tokenizer(tok, GenerationConfig(think_close="<think>"))


def test_sampler_greedy_and_seeded():
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    assert Sampler(SamplingSpec())(logits) == 1
    a = [Sampler(SamplingSpec(temperature=1.0, seed=7))(logits) for _ in range(5)]
    b = [Sampler(SamplingSpec(temperature=1.0, seed=7))(logits) for _ in range(5)]
    assert a == b
    s = Sampler(SamplingSpec(temperature=1.0, top_k=2, seed=0))
    assert {s(logits) for _ in range(200)} == {1, 2}
    s = Sampler(SamplingSpec(temperature=1.0, top_p=0.01, seed=0))
    assert {s(logits) for _ in range(50)} == {1}
    with pytest.raises(InputError):
        SamplingSpec(top_p=0)


def test_too_little_room_names_the_output_cap_too():
    # The room can be short because of the caller's max_new_tokens, not only the planned sequence: say both.
    with pytest.raises(InputError, match=r"Only 5 new tokens fit \(the max_new_tokens cap.*raise max_new_tokens") as e:
        BudgetPolicy(DecodeSettings(UNLIMITED, max_answer_tokens=8), IDS, max_new_tokens=5)
    assert "\n" not in str(e.value)
