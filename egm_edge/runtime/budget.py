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

The close may be several tokens (a tokenizer without a `</think>` token): the phase
switches when the emitted ids end with it (`ThinkTokens`), and think_tokens, which
count each reasoning id as it comes, then drop the close's ids again.

Invariants: think_tokens (tokens before `</think>`, forced ones included) never
exceed the budget once the reasoning is closed; budget 0 answers at once; the answer is capped separately by
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
from egm_edge.runtime.settings import MAX_BUDGET, MODES, DecodeSettings

__all__ = ["MAX_BUDGET", "MODES", "BudgetPolicy", "DecodeSettings", "ThinkTokens"]


@dataclass(frozen=True)
class ThinkTokens:
    """Token ids the policy needs, read from the tokenizer (never hard-coded).

    think_close: the ids of the reasoning's closing tag: one id where the tokenizer has the tag as a token
    (Qwen3-VL's `</think>`), else the tag's text encoded (InternVL's Qwen2.5 tokenizer: `</`, `think`, `>`).
    A BPE merges the tag's edges with the text around it (`>` and the newlines after it are one token), so
    the first id may be any of `close_first` and the last any of `close_last` (tokens whose text ends, resp.
    starts, with the edge's; empty: the edge id itself). hard_close: ids of the family's hard close
    ("\\n</think>\\n\\n" for Qwen3-VL); qwen_close: ids of its stop-thinking sentence, which ends with the
    close; stop: ids that end generation.
    """

    think_close: tuple[int, ...]
    hard_close: tuple[int, ...]
    qwen_close: tuple[int, ...]
    stop: tuple[int, ...]
    close_first: frozenset[int] = frozenset()
    close_last: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        close = (self.think_close,) if isinstance(self.think_close, int) else tuple(int(i) for i in self.think_close)
        if not close:
            raise ValueError("think_close must hold at least one token id")
        object.__setattr__(self, "think_close", close)
        if len(close) == 1:  # a tag that is one token is matched exactly
            object.__setattr__(self, "close_first", frozenset(close))
            object.__setattr__(self, "close_last", frozenset(close))
        else:
            object.__setattr__(self, "close_first", frozenset(self.close_first) | {close[0]})
            object.__setattr__(self, "close_last", frozenset(self.close_last) | {close[-1]})

    @classmethod
    def from_tokenizer(cls, tok, generation=None) -> "ThinkTokens":
        """Build from a `tokenizers.Tokenizer` (or anything with token_to_id/encode) and a bundle's
        `GenerationConfig` (its closing tag and stop tokens by name, its family's forced texts);
        without one, the Qwen3-VL defaults. The tag is one token where the tokenizer has it; where the
        tokenizer has no token for the family's own tag either (its tags are text), it is a sequence."""
        if generation is None:
            from egm_edge.runtime.bundle import GenerationConfig

            generation = GenerationConfig()
        family = get_family(generation.family)

        def enc(text):
            return tuple(tok.encode(text, add_special_tokens=False).ids)

        one = tok.token_to_id(generation.think_close)
        first = last = frozenset()
        if one is not None:
            close = (one,)
        elif tok.token_to_id(family.tokens.think_close) is None and enc(generation.think_close):
            close = enc(generation.think_close)
            first, last = _edge_tokens(tok, close)
        else:
            raise InputError(f"The tokenizer has no {generation.think_close!r} token; it is not a {family.title} Thinking tokenizer.")
        stop = tuple(i for i in (tok.token_to_id(name) for name in generation.stop_tokens) if i is not None)
        if not stop:
            names = ", ".join(generation.stop_tokens) or "(none named)"
            raise InputError(f"The tokenizer has none of the stop tokens {names}; cannot tell when to stop.")
        ids = cls(close, enc(family.hard_close), enc(family.tokens.stop_thinking), stop, first, last)
        if ids.close_start(ids.hard_close) is None or ids.close_start(ids.qwen_close) is None:
            raise CheckpointError(
                f"The bundle's generation_config.json closes the reasoning with {generation.think_close!r}, but the "
                f"{family.title} family closes it with {family.tokens.think_close!r}; the bundle mixes files, rebuild it."
            )
        return ids

    # -- matching the close -----------------------------------------------------------------------------------
    def _matches(self, window) -> bool:
        """Whether `window` (len(think_close) ids) is the close."""
        c = self.think_close
        if len(c) == 1:
            return window[0] == c[0]
        return window[0] in self.close_first and window[-1] in self.close_last and tuple(window[1:-1]) == c[1:-1]

    def close_start(self, ids) -> int | None:
        """Index in `ids` where the first complete close begins, or None."""
        n = len(self.think_close)
        for k in range(len(ids) - n + 1):
            if self._matches(ids[k : k + n]):
                return k
        return None

    def close_end(self, ids) -> int | None:
        """Index in `ids` just after the first complete close (what follows is the answer), or None."""
        k = self.close_start(ids)
        return None if k is None else k + len(self.think_close)

    def partial_close(self, ids) -> int:
        """How many ids at the end of `ids` are the start of a close not yet complete (0 when none)."""
        c = self.think_close
        for j in range(min(len(c) - 1, len(ids)), 0, -1):
            tail = ids[len(ids) - j :]
            if tail[0] in self.close_first and tuple(tail[1:]) == c[1:j]:
                return j
        return 0

    def _split(self, seq: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        k = self.close_start(seq)
        return seq[:k], seq[k:]

    def reserve(self, max_answer_tokens: int) -> int:
        """Output tokens an answer needs after the reasoning: the longest close from `</think>` on,
        the answer cap and the stop token (BudgetPolicy refuses less room than this)."""
        return max(len(self._split(s)[1]) for s in (self.hard_close, self.qwen_close)) + max_answer_tokens + 1


def _edge_tokens(tok, close: tuple[int, ...]) -> tuple[frozenset[int], frozenset[int]]:
    """Ids whose token text ends with the close's first token's (`.</`) and starts with its last's (`>\\n\\n`)."""
    vocab = tok.get_vocab(with_added_tokens=True) if _takes_added(tok) else tok.get_vocab()
    head, tail = tok.id_to_token(close[0]), tok.id_to_token(close[-1])
    if head is None or tail is None:
        return frozenset(), frozenset()
    return (frozenset(i for s, i in vocab.items() if s.endswith(head)), frozenset(i for s, i in vocab.items() if s.startswith(tail)))


def _takes_added(tok) -> bool:
    try:
        tok.get_vocab(with_added_tokens=True)
        return True
    except TypeError:
        return False


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
        self._close, self._post = pre + post, post
        self._trigger_at = self.budget - len(pre)
        # The last think-phase ids, enough to see a close of several tokens end.
        self._tail: deque[int] = deque(maxlen=len(ids.think_close))
        self.queue: deque[int] = deque()
        self.phase = "think"
        self.think_tokens = 0
        self.answer_tokens = 0
        self.emitted = 0
        self.budget_forced = False
        self.closed = False  # the reasoning's close has been emitted
        self.truncated = False  # the answer hit its cap before a stop token

    @property
    def done(self) -> bool:
        return self.phase == "done"

    @property
    def pending(self) -> int:
        """Reasoning ids just emitted that begin a close not yet complete (always 0 for a one-token close): a
        stream holds their text back until it knows whether they close the reasoning."""
        return self.ids.partial_close(tuple(self._tail)) if self.phase == "think" else 0

    def forced(self) -> int | None:
        """The token to emit next instead of sampling, or None to sample."""
        if self.done:
            return None
        if not self.queue and self.phase == "think" and self.think_tokens >= self._trigger_at:
            # A close the model has begun is completed, not started again.
            j = self.pending
            self.queue.extend(self._post[j:] if j else self._close)
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
            self._tail.append(token)
            if len(self._tail) == self._tail.maxlen and self.ids._matches(tuple(self._tail)):
                self.phase, self.closed = "answer", True
                self.think_tokens -= len(self._tail) - 1  # the close's earlier ids were counted as they came
            else:
                self.think_tokens += 1
        else:
            self.answer_tokens += 1
        if self.emitted >= self.max_new_tokens:
            self.truncated = self.truncated or self.phase != "done"
            self.phase = "done"
            self.queue.clear()
