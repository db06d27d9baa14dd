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

import time
from collections import OrderedDict
from typing import Iterator

import numpy as np

from egm_edge.errors import CheckpointError, InputError
from egm_edge.grounding import GroundingResult, user_text
from egm_edge.runtime.budget import ThinkTokens
from egm_edge.runtime.bundle import Bundle, load_tokenizer, open_bundle
from egm_edge.runtime.executors import make_executor
from egm_edge.runtime.image import load_image
from egm_edge.runtime.integrity import check_files
from egm_edge.runtime.mrope import decode_position_ids, plain_position_ids, rope_index
from egm_edge.runtime.preprocess import preprocess_image
from egm_edge.runtime.sampling import Sampler, SamplingSpec
from egm_edge.runtime.sequence import Pixels, Sequence, TokenEvent
from egm_edge.runtime.settings import DecodeSettings
from egm_edge.runtime.tiling import image_token_count, tile_image
from egm_edge.runtime.vision_inputs import vision_grid_inputs

__all__ = ["Grounder", "TokenEvent"]


def _runtime_family(bundle: Bundle):
    """The bundle's family record, refused in one sentence when this loop cannot drive it."""
    family = bundle.family
    family.require("runtime", f"The bundle at {bundle.path}")
    family.require_layout(f"The bundle at {bundle.path}", "the runtime")
    return family


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
        d = bundle.decoder
        self._no_image = (np.zeros((0, d.hidden_size), np.float32), np.zeros((d.num_deepstack, 0, d.hidden_size), np.float32))

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
    def _pixels(self, img) -> Pixels:
        cfg = self.bundle.image_processor
        if self.family.preprocessor == "tiling":
            tiles = tile_image(img, cfg)
            return Pixels(tiles, image_token_count(tiles.shape[0], cfg))
        prep = preprocess_image(img, cfg)
        return Pixels(prep.pixel_values, prep.n_image_tokens, tuple(prep.grid_thw))

    def _positions(self, prompt_ids: np.ndarray, px: Pixels) -> tuple[np.ndarray, np.ndarray]:
        """Prefill position ids [3, 1, S] and the delta decode steps add (0 for 1-D RoPE)."""
        if self.family.positions == "rope1d":
            return plain_position_ids(prompt_ids.shape[1]), np.zeros(1, np.int64)
        return rope_index(prompt_ids, [px.grid], self.image_token_id, self.bundle.vision.spatial_merge_size)

    def _encode(self, px: Pixels):
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

    def start(self, image, text: str, *, settings: DecodeSettings | None = None, think_budget=None,
              budget_mode: str | None = None, sampling: SamplingSpec | None = None, max_answer_tokens: int | None = None,
              max_new_tokens: int | None = None, exif_transpose: bool = True) -> Sequence:
        """Everything before the graphs run: settings resolved, image read and preprocessed, prompt tokenized and
        checked against the bundle's planned sequence and rotary tables. Bad input fails here, in one sentence."""
        gen = self.bundle.generation
        settings = (settings or DecodeSettings()).override(
            think_budget=think_budget, budget_mode=budget_mode, sampling=sampling, max_answer_tokens=max_answer_tokens,
            max_new_tokens=max_new_tokens).resolved(self.defaults)  # bad settings are refused before the image is read
        t0 = time.perf_counter()
        img = load_image(image, exif_transpose=exif_transpose)
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
        positions, deltas = self._positions(prompt_ids, px)
        limit = self.bundle.decoder.rope_positions
        if limit and int(positions.max()) + room >= limit:
            raise InputError(
                f"This prompt plus up to {room} new tokens reaches rotary position {int(positions.max()) + room}, past the "
                f"{limit} positions this bundle's decoder has tables for; lower --max-new-tokens or use a smaller image."
            )
        sampler = Sampler(settings.sampling or SamplingSpec(), banned=(self.image_token_id,))
        return Sequence(tok=self.tok, ids=self.ids, family=self.family, settings=settings, sampler=sampler, px=px,
                        prompt_ids=prompt_ids, positions=positions, deltas=deltas, room=room, size=img.size, t0=t0)

    def prefill(self, seq: Sequence, cache) -> tuple[np.ndarray, object]:
        """The vision graph (or the cached encoding) and the prompt through the decoder into `cache` (an empty
        cache of one sequence); returns (the last prompt row's logits [V], the cache)."""
        (feats, deep), seq.cached = self._encode(seq.px)
        seq.marks["encoded"] = time.perf_counter()
        n = seq.n_prompt
        logits, cache = self.executor.decode(
            {
                "input_ids": seq.prompt_ids,
                "image_features": feats,
                "deepstack_features": deep,
                "position_ids": seq.positions,
                "attention_mask": np.ones((1, n), np.int64),
                "logits_index": np.asarray([[n - 1]], np.int64),
            },
            cache,
        )
        seq.marks["prefilled"] = time.perf_counter()
        return logits[0, -1], cache

    def decode_feeds(self, seqs: list[Sequence], attention_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """One decode step's feeds for `seqs`, each feeding its `token` at its own position. `attention_mask`
        [B, P+1] comes from a batch's cache; a sequence alone sees its whole history."""
        feats, deep = self._no_image
        if attention_mask is None:
            (seq,) = seqs
            attention_mask = np.ones((1, seq.n_total + 1), np.int64)
        return {
            "input_ids": np.asarray([[s.token] for s in seqs], np.int64),
            "image_features": feats,
            "deepstack_features": deep,
            "position_ids": decode_position_ids([s.n_total for s in seqs], np.concatenate([s.deltas for s in seqs]), 1),
            "attention_mask": attention_mask,
            "logits_index": np.zeros((len(seqs), 1), np.int64),
        }

    def _run(self, image, text: str, **kw) -> Iterator[TokenEvent]:
        """One request alone: its own cache, one decode call per token."""
        seq = self.start(image, text, **kw)
        logits, past = self.prefill(seq, self.executor.new_cache(seq.capacity))
        while True:
            ev = seq.step(logits)
            if ev is None:
                break
            yield ev
            if seq.done:
                break
            out, past = self.executor.decode(self.decode_feeds([seq]), past)
            seq.fed()
            logits = out[0, -1]
        yield seq.finish()
