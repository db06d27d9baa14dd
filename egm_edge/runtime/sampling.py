"""Next-token selection from a logits row, in numpy: greedy (EGM's evaluation) or sampled.

Sampling order as in HF/vLLM: temperature, then top-k, then top-p (nucleus), then
a draw from a seeded numpy Generator. temperature 0 means greedy.
"""

from __future__ import annotations

import numpy as np

from egm_edge.runtime.settings import SamplingSpec  # the spec lives with the other decode settings

__all__ = ["Sampler", "SamplingSpec"]


class Sampler:
    """Picks the next token; `banned` ids are never picked (a model's image placeholder: the decoder graph
    places image features at those ids, and a decode step has none, so an emitted one could not be run)."""

    def __init__(self, spec: SamplingSpec, banned: tuple[int, ...] = ()):
        self.spec = spec
        self.rng = np.random.default_rng(spec.seed)
        self.banned = np.asarray(sorted(set(banned)), dtype=np.int64)

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, dtype=np.float32).reshape(-1)
        if self.banned.size:
            logits = logits.copy()
            logits[self.banned[self.banned < logits.size]] = -np.inf
        if self.spec.greedy:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.spec.temperature
        if self.spec.top_k and self.spec.top_k < z.size:
            kth = np.partition(z, -self.spec.top_k)[-self.spec.top_k]
            z = np.where(z < kth, -np.inf, z)
        z = z - np.max(z)
        p = np.exp(z)
        p /= p.sum()
        if self.spec.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cum, self.spec.top_p) + 1)]
            mask = np.zeros_like(p)
            mask[keep] = p[keep]
            p = mask / mask.sum()
        return int(self.rng.choice(p.size, p=p))
