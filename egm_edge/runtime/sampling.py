"""Next-token selection from a logits row, in numpy: greedy (EGM's evaluation) or sampled.

Sampling order as in HF/vLLM: temperature, then top-k, then top-p (nucleus), then
a draw from a seeded numpy Generator. temperature 0 means greedy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from egm_edge.errors import InputError


@dataclass(frozen=True)
class SamplingSpec:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
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


class Sampler:
    def __init__(self, spec: SamplingSpec):
        self.spec = spec
        self.rng = np.random.default_rng(spec.seed)

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, dtype=np.float32).reshape(-1)
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
