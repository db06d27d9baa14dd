"""Torch-free grounding on a bundle: image + expression -> box, with the reasoning capped.

`Grounder.open(bundle_dir)` loads the graphs; `ground(image, expression, ...)`
runs one request: preprocess (numpy) -> vision graph (cached per image) ->
prefill -> decode loop. The loop owns the KV cache, the M-RoPE positions, the
sampler and the thinking-budget policy; the executor only runs graphs.

- `generate(image, text, ...)` takes the user text as sent (e.g. by an OpenAI
  client); `ground` builds EGM's prompt from an expression first.
- `stream(...)` yields `TokenEvent`s as tokens are produced; the last event
  carries the finished `GroundingResult`.
- Decode settings come whole (`settings=DecodeSettings(...)`) or as the same
  keywords (think_budget, budget_mode, max_answer_tokens, max_new_tokens,
  sampling), which override it; None means "the bundle's default" and an
  unlimited budget is `UNLIMITED` ("none" reads the same).
- A repeated image (same pixels after preprocessing) reuses its encoding from a
  small LRU cache, so several expressions on one camera frame pay for the vision
  tower once.

The prompt, the image token and the forced budget texts come from the family record
the bundle's generation_config.json names (egm_edge.models.families); its think tags
and stop tokens from that file. The record's `preprocessor` and `positions` pick the host
side: Qwen3-VL's smart resize + patches with M-RoPE ids, or InternVL's tiles (`tile_image`,
one `pixel_values` input) with three equal rows of plain positions (1-D RoPE). A bundle of a
family whose record does not list the runtime stage, or of another layout, is refused at open.
A close of the reasoning that is several tokens (a tokenizer without a `</think>` token) is
held back from the reasoning stream until it is known to be one (`BudgetPolicy.pending`).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from egm_edge.errors import CheckpointError, InputError
from egm_edge.grounding import GroundingResult, user_text
from egm_edge.runtime.budget import BudgetPolicy, ThinkTokens
from egm_edge.runtime.bundle import Bundle, load_tokenizer, open_bundle
from egm_edge.runtime.executors import make_executor
from egm_edge.runtime.image import load_image
from egm_edge.runtime.integrity import check_files
from egm_edge.runtime.mrope import decode_position_ids, plain_position_ids, rope_index
from egm_edge.runtime.preprocess import preprocess_image
from egm_edge.runtime.sampling import Sampler, SamplingSpec
from egm_edge.runtime.settings import DecodeSettings
from egm_edge.runtime.tiling import image_token_count, tile_image
from egm_edge.runtime.vision_inputs import vision_grid_inputs

# (preprocessor, positions) of the family records this loop drives.


@dataclass(frozen=True)
class TokenEvent:
    """One emitted token: its text delta, the phase it belongs to, and whether the budget forced it."""

    token_id: int
    text: str
    phase: str  # "reasoning" | "content"
    forced: bool
    result: GroundingResult | None = None  # set on the final event only


class _Detok:
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


def _runtime_family(bundle: Bundle):
    """The bundle's family record, refused in one sentence when this loop cannot drive it."""
    family = bundle.family
    family.require("runtime", f"The bundle at {bundle.path}")
    family.require_layout(f"The bundle at {bundle.path}", "the runtime")
    return family


@dataclass(frozen=True)
class _Pixels:
    """One image as its vision graph takes it: Qwen3-VL patches and their grid, or InternVL tiles (grid None)."""

    values: np.ndarray
    n_image_tokens: int
    grid: tuple[int, int, int] | None = None

    @property
    def key(self) -> str:
        return hashlib.sha256(self.values.tobytes() + repr(self.grid or self.values.shape).encode()).hexdigest()


class Grounder:
    def __init__(self, bundle: Bundle, executor, tokenizer, image_cache_size: int = 4):
        self.bundle, self.executor, self.tok = bundle, executor, tokenizer
        self.family = _runtime_family(bundle)
        self.ids = ThinkTokens.from_tokenizer(tokenizer, bundle.generation)
        image = self.family.tokens.image
        self.image_token_id = tokenizer.token_to_id(image)
        if self.image_token_id is None or self.image_token_id != bundle.decoder.image_token_id:
            raise CheckpointError(
                f"The bundle's tokenizer maps {image} to {self.image_token_id}, but its decoder expects "
                f"{bundle.decoder.image_token_id}; the bundle mixes files from different models, rebuild it."
            )
        self._cache: OrderedDict[str, tuple] = OrderedDict()
        self._cache_size = image_cache_size

    @classmethod
    def open(cls, bundle_dir, executor: str = "auto", threads: int | None = None, verify: bool = False,
             image_cache_size: int = 4) -> "Grounder":
        """Load a bundle after checking its files against the sha256 its manifest records.

        A file unchanged since its last good hash (same size, mtime, change time, inode) is not read again;
        `verify=True` re-reads and hashes every file (egm_edge.runtime.integrity). A bundle of a family the
        runtime does not drive is refused before any file is hashed or graph loaded.
        """
        bundle = open_bundle(bundle_dir)
        _runtime_family(bundle)
        check_files(bundle.path, bundle.manifest, full=verify)
        tok = load_tokenizer(bundle.file("tokenizer.json"))
        return cls(bundle, make_executor(bundle, executor, threads=threads), tok, image_cache_size=image_cache_size)

    @property
    def model_name(self) -> str:
        return self.bundle.name

    # -- public calls -------------------------------------------------------------------------------------
    @property
    def defaults(self) -> DecodeSettings:
        """The bundle's decode defaults; max_new_tokens up to its planned sequence."""
        gen = self.bundle.generation
        return DecodeSettings.from_generation_config(gen).override(max_new_tokens=gen.max_seq_len)

    def ground(self, image, expression: str, think_budget=None, task: str = "vanilla", **kw) -> GroundingResult:
        text = user_text(expression, task=task, family=self.family)
        return self.generate(image, text, think_budget=think_budget, **kw)

    def ground_batch(self, requests, **kw) -> list[GroundingResult]:
        """requests: iterable of (image, expression) or dicts with image/expression/task/think_budget.

        Runs them in order at batch size 1 (the fastest on a CPU), sharing image encodings.
        """
        out = []
        for r in requests:
            r = r if isinstance(r, dict) else {"image": r[0], "expression": r[1]}
            out.append(self.ground(**{**kw, **r}))
        return out

    def generate(self, image, text: str, **kw) -> GroundingResult:
        result = None
        for ev in self._run(image, text, **kw):
            result = ev.result or result
        return result

    def stream(self, image, expression: str, think_budget=None, task: str = "vanilla", **kw) -> Iterator[TokenEvent]:
        text = user_text(expression, task=task, family=self.family)
        return self._run(image, text, think_budget=think_budget, **kw)

    def stream_text(self, image, text: str, **kw) -> Iterator[TokenEvent]:
        return self._run(image, text, **kw)

    # -- the loop -----------------------------------------------------------------------------------------
    def _pixels(self, img) -> _Pixels:
        cfg = self.bundle.image_processor
        if self.family.preprocessor == "tiling":
            tiles = tile_image(img, cfg)
            return _Pixels(tiles, image_token_count(tiles.shape[0], cfg))
        prep = preprocess_image(img, cfg)
        return _Pixels(prep.pixel_values, prep.n_image_tokens, tuple(prep.grid_thw))

    def _positions(self, prompt_ids: np.ndarray, px: _Pixels) -> tuple[np.ndarray, np.ndarray]:
        """Prefill position ids [3, 1, S] and the delta decode steps add (0 for 1-D RoPE)."""
        if self.family.positions == "rope1d":
            return plain_position_ids(prompt_ids.shape[1]), np.zeros(1, np.int64)
        return rope_index(prompt_ids, [px.grid], self.image_token_id, self.bundle.vision.spatial_merge_size)

    def _encode(self, px: _Pixels):
        key = px.key
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key], True
        grid = vision_grid_inputs([px.grid], self.bundle.vision) if px.grid is not None else {}
        enc = self.executor.encode_image(px.values, grid)
        self._cache[key] = enc
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return enc, False

    def _run(self, image, text: str, *, settings: DecodeSettings | None = None, think_budget=None, budget_mode: str | None = None,
             sampling: SamplingSpec | None = None, max_answer_tokens: int | None = None,
             max_new_tokens: int | None = None, exif_transpose: bool = True) -> Iterator[TokenEvent]:
        gen = self.bundle.generation
        settings = (settings or DecodeSettings()).override(
            think_budget=think_budget, budget_mode=budget_mode, sampling=sampling, max_answer_tokens=max_answer_tokens,
            max_new_tokens=max_new_tokens).resolved(self.defaults)  # bad settings are refused before the image is read
        t0 = time.perf_counter()
        img = load_image(image, exif_transpose=exif_transpose)
        width, height = img.size
        px = self._pixels(img)
        prompt = self.family.chat_prompt(text, px.n_image_tokens)
        prompt_ids = np.asarray([self.tok.encode(prompt, add_special_tokens=False).ids], dtype=np.int64)
        n_prompt = prompt_ids.shape[1]
        room = min(gen.max_seq_len - n_prompt, settings.max_new_tokens)
        if room <= 0:
            raise InputError(
                f"The prompt takes {n_prompt} tokens ({px.n_image_tokens} for the image), at or over the bundle's "
                f"planned maximum sequence of {gen.max_seq_len}; use a smaller image or a bundle built for longer sequences."
            )
        policy = BudgetPolicy(settings, self.ids, max_new_tokens=room)
        sampler = Sampler(settings.sampling or SamplingSpec(), banned=(self.image_token_id,))
        t1 = time.perf_counter()

        (feats, deep), cached = self._encode(px)
        t2 = time.perf_counter()

        positions, deltas = self._positions(prompt_ids, px)
        limit = self.bundle.decoder.rope_positions
        if limit and int(positions.max()) + room >= limit:
            raise InputError(
                f"This prompt plus up to {room} new tokens reaches rotary position {int(positions.max()) + room}, past the "
                f"{limit} positions this bundle's decoder has tables for; lower --max-new-tokens or use a smaller image."
            )
        past = self.executor.new_cache(n_prompt + room)
        logits, past = self.executor.decode(
            {
                "input_ids": prompt_ids,
                "image_features": feats,
                "deepstack_features": deep,
                "position_ids": positions,
                "attention_mask": np.ones((1, n_prompt), np.int64),
                "logits_index": np.asarray([[n_prompt - 1]], np.int64),
            },
            past,
        )
        t3 = time.perf_counter()

        empty_feats = np.zeros((0, feats.shape[1]), np.float32)
        empty_deep = np.zeros((deep.shape[0], 0, deep.shape[2]), np.float32)
        detok = {"reasoning": _Detok(self.tok), "content": _Detok(self.tok)}
        out_ids: list[int] = []
        held: list[int] = []  # reasoning ids that may begin a close of several tokens: their text waits
        n_total = n_prompt
        decode_steps = 0
        while True:
            forced = policy.forced()
            token = forced if forced is not None else sampler(logits[0, -1])
            phase = "reasoning" if policy.phase == "think" else "content"
            policy.observe(token)
            if token in self.ids.stop:
                break
            out_ids.append(token)
            if phase == "content":
                piece = detok[phase].push(token)
            elif policy.closed:  # this token completed the close: it and the held ones are the tag, not reasoning
                held, piece = [], ""
            else:
                held.append(token)
                keep = policy.pending
                flush, held = held[: len(held) - keep], held[len(held) - keep :]
                piece = "".join(detok[phase].push(t) for t in flush)
            yield TokenEvent(token, piece, phase, forced is not None)
            if policy.done:
                break
            logits, past = self.executor.decode(
                {
                    "input_ids": np.asarray([[token]], np.int64),
                    "image_features": empty_feats,
                    "deepstack_features": empty_deep,
                    "position_ids": decode_position_ids([n_total], deltas, 1),
                    "attention_mask": np.ones((1, n_total + 1), np.int64),
                    "logits_index": np.zeros((1, 1), np.int64),
                },
                past,
            )
            n_total += 1
            decode_steps += 1
        t4 = time.perf_counter()

        text_out = self.tok.decode(out_ids, skip_special_tokens=False)
        ms = lambda a, b: round((b - a) * 1000.0, 3)  # noqa: E731
        timings = {
            "preprocess": ms(t0, t1),
            "vision": ms(t1, t2),
            "prefill": ms(t2, t3),
            "decode": ms(t3, t4),
            "total": ms(t0, t4),
            "ms_per_token": round((t4 - t3) * 1000.0 / max(1, decode_steps), 3),
            "vision_cached": cached,
            "prompt_tokens": n_prompt,
            "output_tokens": len(out_ids),
        }
        result = GroundingResult.from_output(
            text_out, width, height,
            think_tokens=policy.think_tokens, answer_tokens=policy.answer_tokens,
            budget_forced=policy.budget_forced, family=self.family, timings=timings,
            truncated=policy.truncated,
        )
        yield TokenEvent(-1, "", "content", False, result=result)
