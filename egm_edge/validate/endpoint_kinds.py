"""Endpoint kinds: how each OpenAI-compatible server takes a thinking budget, and how to tell them apart.

Contract: `ENDPOINT_KINDS` is the registry (egm, trtllm, vllm, sglang, openai), one
frozen `EndpointKind` each; `get_kind(name)` refuses an unknown name in one
sentence naming the choices (`KIND_CHOICES` adds "auto" for the CLI).
`EndpointKind.budget_fields(settings)` is what a request body adds to carry the
thinking budget: the kind's own field, or nothing where the server has none or
the budget is unlimited (so a server that forbids unknown fields never sees
one). `mechanism(settings)` is the sentence a report prints for what capped the
reasoning. `detect_kind(listing)` names the kind from a GET /v1/models answer
(`owned_by`), "openai" (no budget field) when nothing identifies it. Pure.

Where each field was read (field names, not behaviour, are what a test can pin here):
- egm: egm_edge/runtime/server_request.py (`think_budget`, `budget_mode`); `egm-edge serve` lists
  its model with owned_by "egm-edge".
- trtllm: NVIDIA/TensorRT-LLM tensorrt_llm/serve/openai_protocol.py @ 0076e939 (PR #14665):
  `ChatCompletionRequest.thinking_token_budget: Optional[int]`, model_config extra="forbid";
  `ModelCard.owned_by = "tensorrt_llm"`. Released in 1.3.0rc24 (tensorrt_llm.llmapi.thinking_budget).
- vllm: vllm-project/vllm vllm/entrypoints/openai/chat_completion/protocol.py @ 002032ee:
  `thinking_token_budget: ThinkingTokenBudget` (a non-negative int, -1 unlimited; the server needs a
  reasoning parser); unknown fields are allowed and dropped with a debug log; owned_by "vllm".
- sglang: sgl-project/sglang python/sglang/srt/entrypoints/openai/protocol.py @ 004c82e0: no budget
  field of its own; `custom_params: Optional[Dict]` carries `{"thinking_budget": N}`, enforced only
  when the server runs `--enable-strict-thinking` (or the thinking-budget custom logit processor),
  see docs.sglang.io/docs/advanced_features/thinking_budget and sglang issue #25536; unknown fields
  are ignored (pydantic's default); `ModelCard.owned_by = "sglang"`.
- openai: the OpenAI API has no token budget for reasoning; max_tokens is the only cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from egm_edge.errors import InputError

AUTO = "auto"


@dataclass(frozen=True)
class EndpointKind:
    """One kind of OpenAI-compatible server and how it takes a thinking budget."""

    name: str
    label: str
    owned_by: tuple[str, ...]  # /v1/models owned_by values that identify it
    budget_field: str | None  # dotted path of the request field carrying the budget; None: the server has none
    modes: bool  # whether it also takes egm-edge's budget_mode (hard close or Qwen's soft message)
    enforced: str  # how the server keeps the budget, for the report

    def budget_fields(self, settings) -> dict[str, Any]:
        """Request-body fields for `settings`' think budget ({} for none or unlimited, except egm, see below)."""
        budget = settings.think_budget
        if self.name == "egm":
            if budget is None:
                return {}
            # null for unlimited: egm-edge serve then does not fall back to its bundle's budget.
            return {"think_budget": settings.to_dict()["think_budget"], "budget_mode": settings.budget_mode}
        if self.budget_field is None or not isinstance(budget, int):
            return {}
        head, _, tail = self.budget_field.partition(".")
        return {head: {tail: budget}} if tail else {head: budget}

    def mechanism(self, settings) -> str:
        """The sentence a report prints for what capped the reasoning under `settings`."""
        cap = f"max_tokens {settings.max_new_tokens}" if settings.max_new_tokens else "max_tokens"
        budget = settings.think_budget
        if not isinstance(budget, int):
            return f"no thinking budget asked (unlimited); {cap} caps the whole output"
        if self.budget_field is None:
            return f"{cap} only: this server ({self.label}) has no thinking budget, so the {budget}-token budget was not sent"
        mode = f" ({settings.budget_mode} close)" if self.modes else " (the server's own close; budget_mode is not sent)"
        return f"{self.budget_field}={budget}{mode}, {self.enforced}; {cap} caps the whole output"


ENDPOINT_KINDS: dict[str, EndpointKind] = {
    k.name: k
    for k in (
        EndpointKind("egm", "egm-edge serve", ("egm-edge",), "think_budget", True,
                     "kept by egm-edge's decode loop"),
        EndpointKind("trtllm", "TensorRT-LLM trtllm-serve", ("tensorrt_llm",), "thinking_token_budget", False,
                     "kept by TensorRT-LLM's thinking-budget logits processor (1.3.0rc24 and later; 1.2 rejects the field)"),
        EndpointKind("vllm", "vLLM", ("vllm",), "thinking_token_budget", False,
                     "kept by vLLM when it runs a reasoning parser (it refuses the request otherwise)"),
        EndpointKind("sglang", "SGLang", ("sglang",), "custom_params.thinking_budget", False,
                     "kept only when SGLang runs --enable-strict-thinking (otherwise ignored: max_tokens only)"),
        EndpointKind("openai", "an OpenAI-compatible server", (), None, False, ""),
    )
}
KIND_CHOICES = (AUTO, *ENDPOINT_KINDS)


def get_kind(name: str) -> EndpointKind:
    if name not in ENDPOINT_KINDS:
        raise InputError(f"Unknown endpoint kind {name!r}. Choose from: {', '.join(KIND_CHOICES)}.")
    return ENDPOINT_KINDS[name]


def detect_kind(listing: dict | None) -> tuple[EndpointKind, str]:
    """(kind, how it was told) from a GET /v1/models answer; "openai" (no budget field) when nothing identifies it."""
    owners = sorted({str(m.get("owned_by")) for m in ((listing or {}).get("data") or [])
                     if isinstance(m, dict) and m.get("owned_by")})
    for kind in ENDPOINT_KINDS.values():
        hit = next((o for o in owners if o in kind.owned_by), None)
        if hit:
            return kind, f"detected from /v1/models owned_by {hit!r}"
    why = f"owned_by {', '.join(map(repr, owners))} names no known server" if owners else "/v1/models names no owner"
    return ENDPOINT_KINDS["openai"], f"not detected ({why}); treated as openai, pass --endpoint-kind to send a budget"
