"""The thinking budget: a pure per-request policy with a queue of tokens to force.

The decode loop asks `policy.forced()` before sampling; when it returns a token id,
that token is emitted instead of a sampled one. Every emitted token (sampled or
forced) goes back through `policy.observe(token)`. The policy knows nothing about
models, tensors or executors; it is tested with a scripted fake model.

Modes (DESIGN.md):
- `hard`: when the reasoning reaches the budget, force the natural close
  "\\n</think>\\n\\n" (the Thinking template's own separator; `Family.hard_close`).
- `qwen`: force Qwen's stop-thinking sentence, then the close (`FamilyTokens.stop_thinking`). If the budget is
  too small to hold the sentence, it degrades to `hard`.
- `none`: no budget; the model thinks until it closes the reasoning itself.

Invariants: think_tokens (tokens before `</think>`, forced ones included) never
exceed the budget; budget 0 answers at once; the answer is capped separately by
`max_answer_tokens`; the whole output never exceeds `max_new_tokens` (derived
from the bundle's planned maximum sequence), reserving room for the close and
the answer. The policy reads whole `DecodeSettings` (egm_edge.runtime.settings);
fields not given take the built-in defaults there.

The token texts come from the bundle, never from here: `ThinkTokens.from_tokenizer`
reads the closing tag and the stop tokens from the bundle's generation_config.json
and the forced texts from its family's record (egm_edge.models.families).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from egm_edge.errors import CheckpointError, InputError
from egm_edge.models.families import get_family
from egm_edge.runtime.settings import MAX_BUDGET, MODES, UNLIMITED, DecodeSettings

__all__ = ["MAX_BUDGET", "MODES", "BudgetPolicy", "DecodeSettings", "ThinkTokens"]


@dataclass(frozen=True)
class ThinkTokens:
    """Token ids the policy needs, read from the tokenizer (never hard-coded).

    hard_close: ids of the family's hard close ("\\n</think>\\n\\n" for Qwen3-VL); qwen_close: ids
    of its stop-thinking sentence, which ends with the close; stop: ids that end generation.
    """

    think_close: int
    hard_close: tuple[int, ...]
    qwen_close: tuple[int, ...]
    stop: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tok, generation=None) -> "ThinkTokens":
        """Build from a `tokenizers.Tokenizer` (or anything with token_to_id/encode) and a bundle's
        `GenerationConfig` (its closing tag and stop tokens by name, its family's forced texts);
        without one, the Qwen3-VL defaults."""
        if generation is None:
            from egm_edge.runtime.bundle import GenerationConfig

            generation = GenerationConfig()
        family = get_family(generation.family)

        def enc(text):
            return tuple(tok.encode(text, add_special_tokens=False).ids)

        close = tok.token_to_id(generation.think_close)
        if close is None:
            raise InputError(f"The tokenizer has no {generation.think_close!r} token; it is not a {family.title} Thinking tokenizer.")
        stop = tuple(i for i in (tok.token_to_id(name) for name in generation.stop_tokens) if i is not None)
        if not stop:
            names = ", ".join(generation.stop_tokens) or "(none named)"
            raise InputError(f"The tokenizer has none of the stop tokens {names}; cannot tell when to stop.")
        hard, sentence = enc(family.hard_close), enc(family.tokens.stop_thinking)
        if close not in hard or close not in sentence:
            raise CheckpointError(
                f"The bundle's generation_config.json closes the reasoning with {generation.think_close!r}, but the "
                f"{family.title} family closes it with {family.tokens.think_close!r}; the bundle mixes files, rebuild it."
            )
        return cls(close, hard, sentence, stop)

    def _split(self, seq: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        k = seq.index(self.think_close)
        return seq[:k], seq[k:]

    def reserve(self, max_answer_tokens: int) -> int:
        """Output tokens an answer needs after the reasoning: the longest close from `</think>` on,
        the answer cap and the stop token (BudgetPolicy refuses less room than this)."""
        return max(len(self._split(s)[1]) for s in (self.hard_close, self.qwen_close)) + max_answer_tokens + 1


class BudgetPolicy:
    """Per-request state: phase, counts and the queue of tokens to force."""

    def __init__(self, settings: DecodeSettings, ids: ThinkTokens, max_new_tokens: int):
        # Settings not given fall back to the built-in defaults; callers resolve against a bundle's first.
        self.settings = spec = settings.resolved()
        self.ids = ids
        hard_pre, hard_post = ids._split(ids.hard_close)
        qwen_pre, qwen_post = ids._split(ids.qwen_close)
        reserve = ids.reserve(spec.max_answer_tokens)
        if max_new_tokens < reserve:
            raise InputError(
                f"Only {max_new_tokens} new tokens fit (the max_new_tokens cap, or what the planned sequence leaves after "
                f"the prompt), fewer than the {reserve} an answer needs (the reasoning's close, {spec.max_answer_tokens} answer "
                "tokens and the stop); raise max_new_tokens, lower max_answer_tokens, or use a shorter prompt, a smaller "
                "image or a bundle planned for longer sequences."
            )
        room = max_new_tokens - reserve
        capped = spec.budget_mode != "none" and not spec.unlimited
        self.budget = min(spec.think_budget, room) if capped else room
        self.max_new_tokens = max_new_tokens
        use_qwen = spec.budget_mode == "qwen" and self.budget >= len(qwen_pre)
        pre, post = (qwen_pre, qwen_post) if use_qwen else (hard_pre, hard_post)
        if self.budget < len(pre):
            pre = ()
        self._close = pre + post
        self._trigger_at = self.budget - len(pre)
        self.queue: deque[int] = deque()
        self.phase = "think"
        self.think_tokens = 0
        self.answer_tokens = 0
        self.emitted = 0
        self.budget_forced = False
        self.truncated = False  # the answer hit its cap before a stop token

    @property
    def done(self) -> bool:
        return self.phase == "done"

    def forced(self) -> int | None:
        """The token to emit next instead of sampling, or None to sample."""
        if self.done:
            return None
        if not self.queue and self.phase == "think" and self.think_tokens >= self._trigger_at:
            self.queue.extend(self._close)
            self.budget_forced = True
        if not self.queue and self.phase == "answer" and self.answer_tokens >= self.settings.max_answer_tokens:
            self.truncated = True
            self.queue.append(self.ids.stop[0])
        return self.queue.popleft() if self.queue else None

    def observe(self, token: int) -> None:
        """Account for an emitted token (sampled or forced)."""
        if self.done:
            raise RuntimeError("observe() after the policy is done")
        self.emitted += 1
        if token in self.ids.stop:
            self.phase = "done"
            self.queue.clear()
            return
        if self.phase == "think":
            if token == self.ids.think_close:
                self.phase = "answer"
            else:
                self.think_tokens += 1
        else:
            self.answer_tokens += 1
        if self.emitted >= self.max_new_tokens:
            self.truncated = self.truncated or self.phase != "done"
            self.phase = "done"
            self.queue.clear()
