"""One request's decode state: what the decode loop keeps per sequence, whether it runs alone or in a batch.

A `Sequence` is made by `Grounder.start` (image preprocessed, prompt tokenized, settings resolved; nothing
run yet). Whoever drives it (the one-request loop in egm_edge.runtime.grounder or the in-flight batch in
egm_edge.runtime.scheduler) runs the vision graph and the prefill, then for each step hands it that row's
logits: `step(logits)` picks the token (forced by the budget policy or sampled), updates the policy, the held
close of several tokens and the detokenizers, and returns the token's event; `token`/`position` feed the next
decode call. `finish()` builds the final `GroundingResult`. The sequence knows nothing about executors,
caches or batching: its tokens depend only on its own logits, so a row decoded in a batch emits what it would
alone (given the same logits).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from egm_edge.grounding import GroundingResult
from egm_edge.runtime.budget import BudgetPolicy, ThinkTokens
from egm_edge.runtime.sampling import Sampler
from egm_edge.runtime.settings import DecodeSettings


@dataclass(frozen=True)
class TokenEvent:
    """One emitted token: its text delta, the phase it belongs to, and whether the budget forced it."""

    token_id: int
    text: str
    phase: str  # "reasoning" | "content"
    forced: bool
    result: GroundingResult | None = None  # set on the final event only


class Detok:
    """Incremental detokenizer: emits only complete characters."""

    def __init__(self, tok):
        self.tok, self.ids, self.text = tok, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        full = self.tok.decode(self.ids, skip_special_tokens=False)
        if full.endswith("\ufffd"):
            return ""
        delta, self.text = full[len(self.text):], full
        return delta


@dataclass(frozen=True)
class Pixels:
    """One image as its vision graph takes it: Qwen3-VL patches and their grid, or InternVL tiles (grid None)."""

    values: np.ndarray
    n_image_tokens: int
    grid: tuple[int, int, int] | None = None

    @property
    def key(self) -> str:
        import hashlib

        return hashlib.sha256(self.values.tobytes() + repr(self.grid or self.values.shape).encode()).hexdigest()


class Sequence:
    """Per-request state from the prompt to the result (see the module docstring)."""

    def __init__(self, *, tok, ids: ThinkTokens, family, settings: DecodeSettings, sampler: Sampler, px: Pixels,
                 prompt_ids: np.ndarray, positions: np.ndarray, deltas: np.ndarray, room: int, size: tuple[int, int],
                 t0: float):
        self.tok, self.ids, self.family, self.settings = tok, ids, family, settings
        self.px, self.prompt_ids, self.positions, self.deltas, self.room = px, prompt_ids, positions, deltas, room
        self.width, self.height = size
        self.policy = BudgetPolicy(settings, ids, max_new_tokens=room)
        self.sampler = sampler
        self.detok = {"reasoning": Detok(tok), "content": Detok(tok)}
        self.out_ids: list[int] = []
        self.held: list[int] = []  # reasoning ids that may begin a close of several tokens: their text waits
        self.n_prompt = int(prompt_ids.shape[1])
        self.n_total = self.n_prompt  # tokens in the cache once the last emitted token is fed
        self.decode_steps = 0
        self.token: int | None = None  # the token to feed next
        self.done = False
        self.marks = {"start": t0, "prepared": time.perf_counter()}
        self.cached = False
        self.batch_sizes: list[int] = []  # rows decoded together at each of this sequence's steps

    @property
    def capacity(self) -> int:
        """Cache rows this sequence may need: its prompt plus every token it may still generate."""
        return self.n_prompt + self.room

    def step(self, logits: np.ndarray) -> TokenEvent | None:
        """Take this row's next-token logits [V]; returns the emitted token's event, or None when generation ended
        (a stop token). After it, `done` says whether another decode call is needed for this row."""
        policy = self.policy
        forced = policy.forced()
        token = forced if forced is not None else self.sampler(logits)
        phase = "reasoning" if policy.phase == "think" else "content"
        policy.observe(token)
        if token in self.ids.stop:
            self.done, self.token = True, None
            return None
        self.out_ids.append(token)
        if phase == "content":
            piece = self.detok[phase].push(token)
        elif policy.closed:  # this token completed the close: it and the held ones are the tag, not reasoning
            self.held, piece = [], ""
        else:
            self.held.append(token)
            keep = policy.pending
            flush, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep:]
            piece = "".join(self.detok[phase].push(t) for t in flush)
        self.done = policy.done
        self.token = None if self.done else token
        return TokenEvent(token, piece, phase, forced is not None)

    def fed(self, batch: int = 1) -> None:
        """The token from `step` went through a decode call of `batch` rows: the cache holds one more row."""
        self.n_total += 1
        self.decode_steps += 1
        self.batch_sizes.append(batch)

    def finish(self) -> TokenEvent:
        """The final event, carrying the `GroundingResult` with its timing breakdown."""
        m = self.marks
        end = m.setdefault("end", time.perf_counter())
        ms = lambda a, b: round((b - a) * 1000.0, 3)  # noqa: E731
        decode_from = m.get("prefilled", end)
        timings = {
            "preprocess": ms(m["start"], m["prepared"]),
            "vision": ms(m.get("queued_until", m["prepared"]), m.get("encoded", m["prepared"])),
            "prefill": ms(m.get("encoded", m["prepared"]), decode_from),
            "decode": ms(decode_from, end),
            "total": ms(m["start"], end),
            "ms_per_token": round((end - decode_from) * 1000.0 / max(1, self.decode_steps), 3),
            "vision_cached": self.cached,
            "prompt_tokens": self.n_prompt,
            "output_tokens": len(self.out_ids),
        }
        if "queued_until" in m:  # admitted to a batch: how long it waited, and how many rows shared its steps
            timings["queued"] = ms(m["prepared"], m["queued_until"])
            timings["mean_batch"] = round(float(np.mean(self.batch_sizes)), 2) if self.batch_sizes else 1.0
        result = GroundingResult.from_output(
            self.tok.decode(self.out_ids, skip_special_tokens=False), self.width, self.height,
            think_tokens=self.policy.think_tokens, answer_tokens=self.policy.answer_tokens,
            budget_forced=self.policy.budget_forced, family=self.family, timings=timings,
            truncated=self.policy.truncated,
        )
        return TokenEvent(-1, "", "content", False, result=result)
