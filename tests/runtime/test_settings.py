"""Decode settings: the one think-budget parser, defaults vs unlimited, JSON round trips and store compatibility."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egm_edge.errors import InputError
from egm_edge.runtime.settings import (BUILTIN, MAX_BUDGET, MODES, UNLIMITED, DecodeSettings, SamplingSpec,
                                       add_think_budget_argument, budget_from_json, budget_to_json, parse_think_budget)


@pytest.mark.parametrize("text, want", [
    (None, None), (0, 0), (64, 64), ("0", 0), ("1024", 1024), (" 16 ", 16), (MAX_BUDGET, MAX_BUDGET),
    ("none", UNLIMITED), ("None", UNLIMITED), ("unlimited", UNLIMITED), ("UNLIMITED", UNLIMITED), (UNLIMITED, UNLIMITED),
])
def test_parser_accepts_tokens_and_unlimited(text, want):
    assert parse_think_budget(text) == want


@pytest.mark.parametrize("bad", [-1, "-1", "lots", "", "1.5", 1.5, True, False, MAX_BUDGET + 1, "1e3", [3], "١٢"])
def test_parser_refuses_everything_else_in_one_sentence(bad):
    with pytest.raises(InputError) as e:
        parse_think_budget(bad)
    msg = str(e.value)
    assert "think budget" in msg and "'none' for unlimited" in msg and msg.count(". ") == 0 and msg.endswith(".")


def test_none_means_the_default_and_unlimited_is_explicit():
    bundle = DecodeSettings(256, "qwen", 32)
    assert DecodeSettings().resolved(bundle).think_budget == 256  # not given: the bundle's
    assert DecodeSettings("none").resolved(bundle).think_budget == UNLIMITED  # asked for: unlimited, whatever the bundle says
    assert DecodeSettings(0).resolved(bundle).think_budget == 0
    assert DecodeSettings().resolved() == BUILTIN and BUILTIN.unlimited
    # A bundle whose generation_config.json says null (unlimited), read through the JSON form.
    assert DecodeSettings().resolved({"think_budget": None, "budget_mode": "hard"}).unlimited
    # Layers fill field by field, first given wins.
    r = DecodeSettings(max_new_tokens=40).resolved(DecodeSettings(budget_mode="qwen"), DecodeSettings(8, "hard", 16))
    assert (r.think_budget, r.budget_mode, r.max_answer_tokens, r.max_new_tokens) == (8, "qwen", 16, 40)


def test_override_ignores_what_was_not_given():
    s = DecodeSettings(64, "qwen")
    assert s.override(think_budget=None, budget_mode=None) == s
    assert s.override(think_budget="none").unlimited and s.override(max_answer_tokens=9).max_answer_tokens == 9


@pytest.mark.parametrize("kw, match", [
    (dict(budget_mode="soft"), "Choose from: hard, qwen, none"), (dict(max_answer_tokens=0), "max_answer_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens"), (dict(sampling={"temperature": 1}), "SamplingSpec"),
    (dict(think_budget="lots"), "think budget"),
])
def test_bad_settings_are_refused_when_built(kw, match):
    with pytest.raises(InputError, match=match):
        DecodeSettings(**kw)


budgets = st.one_of(st.none(), st.just(UNLIMITED), st.integers(0, MAX_BUDGET))
samplings = st.one_of(st.none(), st.builds(SamplingSpec, st.floats(0, 10), st.floats(0.01, 1), st.integers(0, 50),
                                           st.one_of(st.none(), st.integers(0, 2**31))))
any_settings = st.builds(DecodeSettings, budgets, st.one_of(st.none(), st.sampled_from(MODES)),
                         st.one_of(st.none(), st.integers(1, 4096)), st.one_of(st.none(), st.integers(1, 1 << 16)), samplings)


@settings(max_examples=200, deadline=None)
@given(any_settings)
def test_json_round_trip(s):
    d = s.to_dict()
    assert DecodeSettings.from_dict(json.loads(json.dumps(d))) == s
    assert ("think_budget" in d) == (s.think_budget is not None)  # not given: absent; unlimited: null
    if s.unlimited:
        assert d["think_budget"] is None
    assert DecodeSettings.from_dict(s.resolved().to_dict()) == s.resolved()


def test_json_form_of_budgets():
    assert budget_to_json(UNLIMITED) is None and budget_to_json("none") is None and budget_to_json(7) == 7
    assert budget_from_json(None) == UNLIMITED and budget_from_json(7) == 7 and budget_from_json("unlimited") == UNLIMITED
    with pytest.raises(ValueError):
        budget_to_json(None)  # "not given" has no JSON value: the key is left out


@pytest.mark.parametrize("d, match", [
    ({"think_budget": 4, "budget": 3}, "Unknown decode setting 'budget'"), ([1], "JSON object"),
    ({"think_budget": "x"}, "think budget"), ({"sampling": {"temperature": "hot"}}, "'temperature' must be a number"),
    ({"sampling": {"tempo": 1}}, "Unknown sampling setting"),
])
def test_from_dict_refuses_in_one_sentence(d, match):
    with pytest.raises(InputError, match=match):
        DecodeSettings.from_dict(d)


def test_resolved_dict_keeps_validate_store_hashes():
    """validate hashes settings.to_dict() into its prediction stores: resolved settings must give the dict (and
    so the hash) the old DecodeSettings dataclass gave, or every store would run again."""
    from egm_edge.validate.store import config_hash

    fp = {"kind": "bundle", "manifest_sha256": "ab" * 32}
    old_unlimited = {"think_budget": None, "budget_mode": "hard", "max_answer_tokens": 128, "max_new_tokens": 4096}
    old_budget = {"think_budget": 16, "budget_mode": "qwen", "max_answer_tokens": 32, "max_new_tokens": 512}
    assert config_hash(fp, DecodeSettings("none").resolved().to_dict()) == config_hash(fp, old_unlimited)
    assert config_hash(fp, DecodeSettings(16, "qwen", 32, 512).resolved().to_dict()) == config_hash(fp, old_budget)
    assert list(DecodeSettings(16, "qwen", 32, 512).to_dict()) == list(old_budget)  # report.json keeps its key order


def test_sweep_records_keep_their_keys_and_null_budgets():
    from egm_edge.sweep.api import _check_budgets
    from egm_edge.sweep.records import record_key

    assert _check_budgets(("0", 16, "none")) == (0, 16, UNLIMITED)
    assert _check_budgets((None,)) == (UNLIMITED,)  # the sweep bundles' default: unlimited
    assert record_key("full", UNLIMITED, "cpu", "k") == record_key("full", None, "cpu", "k") == "full|none|cpu|k"
    with pytest.raises(InputError, match="without repeats"):
        _check_budgets((None, "none"))
    with pytest.raises(InputError, match="not a whole number"):
        _check_budgets((-1,))


def test_from_request_reads_an_openai_body():
    s = DecodeSettings.from_request({"messages": [], "think_budget": None, "budget_mode": "qwen", "max_tokens": 40,
                                     "temperature": 0.7, "top_k": -1, "seed": 3})
    assert s.unlimited and s.budget_mode == "qwen" and s.max_new_tokens == 40
    assert s.sampling == SamplingSpec(0.7, 1.0, 0, 3)
    plain = DecodeSettings.from_request({"messages": [], "temperature": None})
    assert plain == DecodeSettings()  # absent think_budget: the server's default; no sampling field: greedy
    assert DecodeSettings.from_request({"think_budget": "none"}).unlimited
    assert DecodeSettings.from_request({"max_completion_tokens": 9, "max_tokens": 50}).max_new_tokens == 9
    for body, match in (({"think_budget": "x"}, "integer"), ({"think_budget": -1}, "think budget"),
                        ({"think_budget": True}, "think budget"), ({"budget_mode": "soft"}, "'budget_mode'"),
                        ({"max_tokens": 0}, "'max_tokens' must be a positive integer"), ({"top_p": 0}, "top_p"),
                        ({"temperature": "hot"}, "'temperature' must be a number")):
        with pytest.raises(InputError, match=match):
            DecodeSettings.from_request(body)


def test_from_generation_config_reads_null_as_unlimited():
    from egm_edge.runtime.bundle import GenerationConfig

    assert DecodeSettings.from_generation_config(GenerationConfig()).unlimited
    g = DecodeSettings.from_generation_config(GenerationConfig(think_budget=64, budget_mode="qwen", max_answer_tokens=9))
    assert g == DecodeSettings(64, "qwen", 9)


def test_cli_option_keeps_the_text_for_the_one_parser():
    import argparse

    p = argparse.ArgumentParser()
    add_think_budget_argument(p, "budget", "1024")
    assert p.parse_args([]).think_budget is None
    assert parse_think_budget(p.parse_args(["--think-budget", "none"]).think_budget) == UNLIMITED
    assert parse_think_budget(p.parse_args(["--think-budget", "64"]).think_budget) == 64
    assert "default: 1024" in p.format_help()


def test_the_module_is_pure():
    code = ("import sys, egm_edge.runtime.settings, egm_edge.runtime.budget; "
            "bad = {'numpy', 'torch', 'onnxruntime', 'tokenizers'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
