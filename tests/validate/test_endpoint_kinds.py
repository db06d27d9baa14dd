"""Endpoints by kind: each server gets the thinking budget in its own field, and TensorRT-LLM never an unknown one.

The fake servers validate request bodies with pydantic models that mirror the real request models'
budget fields and their handling of unknown fields (see egm_edge/validate/endpoint_kinds.py for the
upstream files and commits): TensorRT-LLM forbids extras (HTTP 400, as its OpenAIBaseModel does),
vLLM allows and drops them, SGLang ignores them.
"""

from __future__ import annotations

import json
from typing import Optional

import pytest

from egm_edge.errors import InputError
from egm_edge.runtime.settings import DecodeSettings
from egm_edge.validate import validate
from egm_edge.validate.endpoint import EndpointError, EndpointPredictor
from egm_edge.validate.endpoint_kinds import ENDPOINT_KINDS, detect_kind, get_kind

from validate_helpers import FakeChat, Scripted, exact

pydantic = pytest.importorskip("pydantic")
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator  # noqa: E402


class _Base(BaseModel):
    messages: list[dict]
    model: str
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stream: Optional[bool] = False


class TrtllmChatRequest(_Base):
    """TensorRT-LLM's ChatCompletionRequest: extra="forbid", max_tokens an alias of max_completion_tokens."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    max_completion_tokens: Optional[int] = Field(default=None, validation_alias="max_tokens")
    thinking_token_budget: Optional[int] = None


class VllmChatRequest(_Base):
    """vLLM's ChatCompletionRequest: extra="allow" (dropped with a debug log); a budget is >= 0 or -1."""

    model_config = ConfigDict(extra="allow")
    max_tokens: Optional[int] = None
    thinking_token_budget: Optional[int] = None

    @field_validator("thinking_token_budget")
    @classmethod
    def _budget(cls, v):
        if v is not None and v < -1:
            raise ValueError("thinking_token_budget must be a non-negative integer or -1 for unlimited")
        return v


class SglangChatRequest(_Base):
    """SGLang's ChatCompletionRequest: pydantic's default (unknown fields ignored); custom_params a dict."""

    max_tokens: Optional[int] = None
    custom_params: Optional[dict] = None


class OpenAIChatRequest(_Base):
    model_config = ConfigDict(extra="forbid")
    max_tokens: Optional[int] = None


class EgmChatRequest(_Base):
    model_config = ConfigDict(extra="forbid")
    max_tokens: Optional[int] = None
    think_budget: Optional[int] = None
    budget_mode: Optional[str] = None


REQUEST_MODELS = {"trtllm": TrtllmChatRequest, "vllm": VllmChatRequest, "sglang": SglangChatRequest,
                  "openai": OpenAIChatRequest, "egm": EgmChatRequest}
OWNED_BY = {"trtllm": "tensorrt_llm", "vllm": "vllm", "sglang": "sglang", "openai": "someone-else", "egm": "egm-edge"}


class FakeServer(FakeChat):
    """/v1/models with `owned_by`; chat completions validated by `model` (400 on a validation error), answering a box."""

    def __init__(self, request_model, owned_by: str | None, box=(100, 100, 500, 500)):
        def check(body):
            try:
                request_model.model_validate(body)
            except ValidationError as e:
                return str(e).splitlines()[0]

        def answer(body):
            return ({"content": json.dumps([{"bbox_2d": list(box), "label": "x"}]), "reasoning_content": "look"},
                    {"completion_tokens": 12, "completion_tokens_details": {"reasoning_tokens": 4}})

        super().__init__(answer, owned_by, check)


@pytest.fixture
def fake():
    servers = []

    def start(kind: str, owned_by: str | None = "same"):
        srv = FakeServer(REQUEST_MODELS[kind], OWNED_BY[kind] if owned_by == "same" else owned_by)
        servers.append(srv)
        return srv

    yield start
    for s in servers:
        s.close()


def _ground(pred, budget=32, mode="hard"):
    from PIL import Image

    return pred.predict(Image.new("RGB", (200, 100)), "the left one", "vanilla", DecodeSettings(budget, mode, 64, 256).resolved())


EXPECTED = {"egm": {"think_budget": 32, "budget_mode": "qwen"}, "trtllm": {"thinking_token_budget": 32},
            "vllm": {"thinking_token_budget": 32}, "sglang": {"custom_params": {"thinking_budget": 32}}, "openai": {}}
BASE_FIELDS = {"model", "messages", "temperature", "top_p", "max_tokens", "stream"}


@pytest.mark.parametrize("kind", sorted(ENDPOINT_KINDS))
def test_each_kind_is_detected_and_gets_its_own_budget_field(fake, kind):
    srv = fake(kind)
    pred = EndpointPredictor(srv.url, retries=0)
    assert pred.endpoint_kind.name == kind
    r = _ground(pred, 32, "qwen")
    assert r.box == (20.0, 10.0, 100.0, 50.0) and not srv.rejected
    body = srv.bodies[-1]
    assert {k: body[k] for k in set(body) - BASE_FIELDS} == EXPECTED[kind]
    d = pred.describe()
    assert d["endpoint_kind"] == kind and d["budget_field"] == ENDPOINT_KINDS[kind].budget_field
    if kind == "openai":
        assert d["budget_mechanism"].startswith("max_tokens 256 only: this server") and "not sent" in d["budget_mechanism"]
        assert "not detected (owned_by 'someone-else'" in d["endpoint_kind_source"]
    else:
        assert d["budget_mechanism"].startswith(f"{ENDPOINT_KINDS[kind].budget_field}=32")


def test_trtllm_never_receives_unknown_fields(fake):
    """The fake rejects what TensorRT-LLM's extra="forbid" model rejects: egm-edge's own fields (what every request
    carried before kinds) fail, and a trtllm-kind request carries only fields of its ChatCompletionRequest."""
    srv = fake("trtllm")
    old = EndpointPredictor(srv.url, retries=0, kind="egm")
    with pytest.raises(EndpointError, match="HTTP 400"):
        _ground(old)
    assert set(srv.rejected[-1]) - set(TrtllmChatRequest.model_fields) - {"max_tokens"} == {"think_budget", "budget_mode"}
    pred = EndpointPredictor(srv.url, retries=0)
    for budget in (0, 32, "unlimited"):
        _ground(pred, budget)
        assert set(srv.bodies[-1]) <= set(TrtllmChatRequest.model_fields) | {"max_tokens"}
    assert len(srv.rejected) == 1


def test_unlimited_sends_no_budget_field_except_egm_null(fake):
    for kind in ("trtllm", "vllm", "sglang", "egm"):
        srv = fake(kind)
        pred = EndpointPredictor(srv.url, retries=0)
        _ground(pred, "unlimited")
        extra = {k: v for k, v in srv.bodies[-1].items() if k not in BASE_FIELDS}
        assert extra == ({"think_budget": None, "budget_mode": "hard"} if kind == "egm" else {})
        assert pred.describe()["budget_mechanism"].startswith("no thinking budget asked (unlimited); max_tokens 256")


def test_a_given_kind_wins_over_detection_and_unknown_kinds_are_refused(fake):
    srv = fake("vllm", owned_by=None)
    assert EndpointPredictor(srv.url, retries=0).endpoint_kind.name == "openai"
    pred = EndpointPredictor(srv.url, retries=0, kind="vllm")
    _ground(pred, 16)
    assert srv.bodies[-1]["thinking_token_budget"] == 16 and pred.describe()["endpoint_kind_source"] == "given (--endpoint-kind)"
    with pytest.raises(InputError, match=r"Unknown endpoint kind 'tgi'\. Choose from: auto, egm, trtllm, vllm, sglang, openai\."):
        get_kind("tgi")
    kind, how = detect_kind({"data": [{"id": "m", "owned_by": "tensorrt_llm"}]})
    assert kind.name == "trtllm" and how == "detected from /v1/models owned_by 'tensorrt_llm'"


def test_egm_fingerprint_is_unchanged_so_old_predictions_resume(fake):
    """egm-edge serve's predictions made before kinds existed hashed {kind, url, model}: they still resume."""
    egm = EndpointPredictor(fake("egm").url, retries=0)
    assert egm.fingerprint() == {"kind": "endpoint", "url": egm.base, "model": "served"}
    trt = EndpointPredictor(fake("trtllm").url, retries=0)
    assert trt.fingerprint() == {"kind": "endpoint", "url": trt.base, "model": "served", "endpoint_kind": "trtllm"}


def test_the_report_says_which_mechanism_capped_the_reasoning(fake, dataset, tmp_path):
    path, recs = dataset
    srv = fake("trtllm")
    rep = validate(srv.url, Scripted(exact(recs)), path, out_dir=tmp_path / "o", limit=3, think_budget=32, progress=False)
    cand = rep.data["candidate"]
    assert cand["endpoint_kind"] == "trtllm" and cand["budget_mechanism"].startswith("thinking_token_budget=32")
    md = (tmp_path / "o" / "report.md").read_text()
    assert "- candidate budget: thinking_token_budget=32 (the server's own close" in md
    assert "candidate budget: thinking_token_budget=32" in rep.summary()
    assert not srv.rejected and all(b["thinking_token_budget"] == 32 for b in srv.bodies)


def test_cli_endpoint_kind_reaches_the_request(fake, dataset, tmp_path, capsys):
    from egm_edge.cli import main

    path, _ = dataset
    srv = fake("sglang", owned_by=None)
    code = main(["validate", "--candidate", srv.url, "--reference", srv.url, "--data", str(path), "--out", str(tmp_path / "o"),
                 "--limit", "2", "--think-budget", "8", "--endpoint-kind", "sglang", "--no-progress"])
    assert code == 0
    assert srv.bodies and all(b["custom_params"] == {"thinking_budget": 8} for b in srv.bodies)
    assert "--enable-strict-thinking" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["validate", "--candidate", srv.url, "--reference", srv.url, "--data", str(path), "--out", str(tmp_path / "p"),
              "--endpoint-kind", "tgi"])
    assert e.value.code == 2
