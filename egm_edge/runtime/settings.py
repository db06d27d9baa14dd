"""Decode settings: how one request decodes (think budget, budget mode, answer cap, output cap, sampling),
one frozen value parsed once at the edge and passed whole.

Edges: the CLI (`add_think_budget_argument`; `parse_think_budget` is the one parser), an HTTP body
(`DecodeSettings.from_request`), JSON (`from_dict`/`to_dict`) and the Python API (`DecodeSettings(...)`,
or the same keywords on `Grounder.ground`, `ReferenceRunner.ground` and `validate`).

Not given vs unlimited: in Python, None in any field means only "not given: use the default" (a
bundle's, else `BUILTIN`: unlimited, hard, 128 answer tokens, 4096 new tokens, greedy). An unlimited
think budget is `UNLIMITED` ("unlimited"; the word "none" reads as the same). `resolved(*defaults)`
fills what was not given from each layer in turn, then from `BUILTIN`.

JSON form: a field not given is absent and an unlimited budget is null, as the HTTP extension field,
bundles' generation_config.json, validate's settings and sweep records have always written it; so a
resolved value's dict is exactly what validate hashed into its prediction stores before this type.

Pure: the standard library only, shared by the torch-free runtime, the planner and the compiler.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from egm_edge.errors import InputError

UNLIMITED = "unlimited"
UNLIMITED_WORDS = ("none", "unlimited")
MODES = ("hard", "qwen", "none")
MAX_BUDGET = 1 << 20
_KEYS = ("think_budget", "budget_mode", "max_answer_tokens", "max_new_tokens", "sampling")


def parse_think_budget(value) -> int | str | None:
    """The one think-budget parser: None stays None (not given); a whole number 0..MAX_BUDGET (an int or its
    digits) is that many tokens; 'none' or 'unlimited' (any case) is `UNLIMITED`. Anything else: InputError."""
    if value is None or value == UNLIMITED:
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in UNLIMITED_WORDS:
            return UNLIMITED
        if text.isascii() and text.isdigit():
            value = int(text)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_BUDGET:
        return value
    raise InputError(f"The think budget {value!r} is not a whole number of tokens (an integer from 0 to {MAX_BUDGET}) "
                     "or 'none' for unlimited.")


def budget_to_json(budget) -> int | None:
    """A given think budget in the JSON form: tokens, or null for unlimited."""
    budget = parse_think_budget(budget)
    if budget is None:
        raise ValueError("a think budget that was not given has no JSON form; leave the key out")
    return None if budget == UNLIMITED else budget


def budget_from_json(value) -> int | str:
    """A think budget read from JSON: null is unlimited (see the module docstring)."""
    return UNLIMITED if value is None else parse_think_budget(value)


def add_think_budget_argument(p: argparse.ArgumentParser, what: str, default: str, *, required: bool = False) -> None:
    """The --think-budget option every command shares. argparse keeps the text; the command parses it with
    `parse_think_budget` when it builds its settings (before any work), so a bad value is the project's one
    sentence and exit status 2 rather than argparse's usage dump. Not given is None: the default."""
    p.add_argument("--think-budget", default=None, required=required, metavar="N|none",
                   help=f"{what}: N tokens (0 answers at once) or none for unlimited" + (f" (default: {default})" if default else ""))


MAX_SEED = 2**64 - 1


def _clip(v, n: int = 40) -> str:
    text = repr(v)
    return text if len(text) <= n else text[: n - 3] + "..."


def _whole(name: str, v, lo: int, hi: int | None, what: str) -> int:
    """A whole number lo..hi from JSON (2.0 reads as 2); one sentence naming `what` otherwise."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        raise InputError(f"'{name}' must be {what}, got {_clip(v)}.")
    return v


def _finite(name: str, v, default: float) -> float:
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InputError(f"'{name}' must be a number, got {_clip(v)}.")
    try:
        f = float(v)
    except OverflowError:
        raise InputError(f"'{name}' must be a finite number, got {_clip(v)}.") from None
    if f != f or f in (float("inf"), float("-inf")):
        raise InputError(f"'{name}' must be a finite number, got {_clip(v)}.")
    return f


def _number(name: str, v, kind=float):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise InputError(f"'{name}' must be a {'whole ' if kind is int else ''}number, got {v!r}.")
    return kind(v)


@dataclass(frozen=True)
class SamplingSpec:
    """Next-token selection: temperature 0 is greedy (EGM's evaluation); top_k 0 is off; a seed makes draws repeatable."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self):
        if not (0.0 <= self.temperature <= 10.0):
            raise InputError(f"temperature must be between 0 and 10, got {self.temperature}.")
        if not (0.0 < self.top_p <= 1.0):
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise InputError(f"top_k must be 0 (off) or positive, got {self.top_k}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "SamplingSpec":
        if not isinstance(d, Mapping):
            raise InputError(f"Sampling settings must be a JSON object, got {type(d).__name__}.")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise InputError(f"Unknown sampling setting {unknown[0]!r}; choose from: temperature, top_p, top_k, seed.")
        seed = d.get("seed")
        return cls(_number("temperature", d.get("temperature", 0.0)), _number("top_p", d.get("top_p", 1.0)),
                   _number("top_k", d.get("top_k", 0), int), None if seed is None else _number("seed", seed, int))


@dataclass(frozen=True)
class DecodeSettings:
    """What a request decodes under; None in a field: not given, the default applies (see the module docstring)."""

    think_budget: int | str | None = None  # tokens, UNLIMITED, or None
    budget_mode: str | None = None  # MODES: how a spent budget closes the reasoning
    max_answer_tokens: int | None = None  # cap after </think>
    max_new_tokens: int | None = None  # cap on every output token
    sampling: SamplingSpec | None = None  # None: greedy

    def __post_init__(self) -> None:
        object.__setattr__(self, "think_budget", parse_think_budget(self.think_budget))
        if self.budget_mode is not None and self.budget_mode not in MODES:
            raise InputError(f"Unknown budget mode {self.budget_mode!r}. Choose from: {', '.join(MODES)}.")
        for name in ("max_answer_tokens", "max_new_tokens"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise InputError(f"{name} must be a whole number of at least 1, got {v!r}.")
        if self.sampling is not None and not isinstance(self.sampling, SamplingSpec):
            raise InputError(f"sampling must be a SamplingSpec or None (greedy), got {type(self.sampling).__name__}.")

    @property
    def unlimited(self) -> bool:
        return self.think_budget == UNLIMITED

    def override(self, **given) -> "DecodeSettings":
        """These settings with the keywords that were given (not None) put in place."""
        return replace(self, **{k: v for k, v in given.items() if v is not None})

    def resolved(self, *defaults) -> "DecodeSettings":
        """Every field filled: from self, else each of `defaults` (DecodeSettings, or dicts in the JSON form) in
        turn, else BUILTIN. Sampling stays None (greedy) unless one of them sets it."""
        layers = [self] + [d if isinstance(d, DecodeSettings) else DecodeSettings.from_dict(d) for d in defaults if d is not None]
        layers.append(BUILTIN)
        return DecodeSettings(**{k: next((getattr(s, k) for s in layers if getattr(s, k) is not None), None) for k in _KEYS})

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: fields not given left out, an unlimited budget as null."""
        d: dict[str, Any] = {}
        if self.think_budget is not None:
            d["think_budget"] = budget_to_json(self.think_budget)
        for k in ("budget_mode", "max_answer_tokens", "max_new_tokens"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.sampling is not None:
            d["sampling"] = self.sampling.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "DecodeSettings":
        """From the JSON form (`to_dict`); one sentence for an unknown key or a bad value."""
        if not isinstance(d, Mapping):
            raise InputError(f"Decode settings must be a JSON object, got {type(d).__name__}.")
        unknown = sorted(set(d) - set(_KEYS))
        if unknown:
            raise InputError(f"Unknown decode setting {unknown[0]!r}; choose from: {', '.join(_KEYS)}.")
        kw: dict[str, Any] = {k: d[k] for k in ("budget_mode", "max_answer_tokens", "max_new_tokens") if d.get(k) is not None}
        if "think_budget" in d:
            kw["think_budget"] = budget_from_json(d["think_budget"])
        if d.get("sampling") is not None:
            kw["sampling"] = SamplingSpec.from_dict(d["sampling"])
        return cls(**kw)

    @classmethod
    def from_request(cls, body: Mapping) -> "DecodeSettings":
        """From an OpenAI chat-completions body: the extension fields think_budget (absent: the server's
        default; null, 'none' or 'unlimited': unlimited), budget_mode and max_answer_tokens; max_completion_tokens
        or max_tokens as max_new_tokens; temperature, top_p, top_k (0 off; -1 off too, as vLLM and SGLang
        clients send it) and seed (0..2**64-1) as sampling (none of them: greedy). Null values of the other
        fields mean absent. InputError with one sentence."""
        if not isinstance(body, Mapping):
            raise InputError(f"The request body must be a JSON object, got {type(body).__name__}.")
        kw: dict[str, Any] = {}
        if "think_budget" in body:
            v = body["think_budget"]
            if isinstance(v, str) and v.strip().lower() not in UNLIMITED_WORDS:
                raise InputError(f"'think_budget' must be an integer, null or 'none' for unlimited, got {_clip(v)}.")
            kw["think_budget"] = budget_from_json(v)
        mode = body.get("budget_mode")
        if mode is not None:
            if mode not in MODES:
                raise InputError(f"'budget_mode' must be one of {', '.join(MODES)}, got {_clip(mode)}.")
            kw["budget_mode"] = mode
        for name, field in (("max_completion_tokens", "max_new_tokens"), ("max_tokens", "max_new_tokens"),
                            ("max_answer_tokens", "max_answer_tokens")):
            v = body.get(name)
            if v is not None and field not in kw:
                kw[field] = _whole(name, v, 1, None, "a positive integer")
        if any(body.get(k) is not None for k in ("temperature", "top_p", "top_k", "seed")):
            top_k = body.get("top_k")
            top_k = 0 if top_k is None else _whole("top_k", top_k, -1, None, "0 or -1 (off) or a positive integer")
            seed = body.get("seed")
            seed = None if seed is None else _whole("seed", seed, 0, MAX_SEED, f"an integer from 0 to {MAX_SEED}")
            kw["sampling"] = SamplingSpec(_finite("temperature", body.get("temperature"), 0.0),
                                          _finite("top_p", body.get("top_p"), 1.0), max(top_k, 0), seed)
        return cls(**kw)

    @classmethod
    def from_generation_config(cls, gen) -> "DecodeSettings":
        """A bundle's decode defaults (`runtime.bundle.GenerationConfig`, whose think_budget None is unlimited)."""
        return cls(budget_from_json(gen.think_budget), gen.budget_mode, gen.max_answer_tokens)


BUILTIN = DecodeSettings(UNLIMITED, "hard", 128, 4096)  # 4096 new tokens: EGM's evaluation cap
