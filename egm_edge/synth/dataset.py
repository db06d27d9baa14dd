"""Synthetic grounding sets: deterministic samples and EGM eval JSONL + PNG files on disk.

Contract: sample `i` of seed `s` is a pure function of (s, i, amodal_fraction):
`draw(seed, i)` gives the same scene, expression and task every time, whatever
else was drawn before, so training streams and on-disk sets never drift apart.
`generate(out_dir, n, seed)` writes `images/NNNNNN.png` and `samples.jsonl`
with EGM's fields (`image` relative to the JSONL's folder, `sent`, `bbox` xyxy
pixels, `height`, `width`) plus `split` (the expression type) and `task`
("vanilla" or "amodal"), in a sibling folder renamed into place when complete;
an existing set is replaced only on force, other files never. Same seed, same bytes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from egm_edge.synth.expressions import TYPES, Expression, make_sample, make_warmup_sample
from egm_edge.synth.world import Scene, render

JSONL_NAME = "samples.jsonl"
DEFAULT_AMODAL_FRACTION = 0.15
_IMAGE_NAME = re.compile(r"\d{6}\.png")


@dataclass(frozen=True)
class Sample:
    scene: Scene
    expr: Expression
    task: str  # "vanilla" | "amodal"

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.scene.shapes[self.expr.target].box

    def record(self, image: str) -> dict:
        return {
            "image": image,
            "sent": self.expr.sent,
            "bbox": list(self.box),
            "height": self.scene.height,
            "width": self.scene.width,
            "split": self.expr.type,
            "task": self.task,
        }


def draw(seed: int, i: int, amodal_fraction: float = DEFAULT_AMODAL_FRACTION) -> Sample:
    """Sample `i` of the stream `seed`; expression types cycle so every split is balanced."""
    rng = np.random.default_rng([int(seed), int(i)])
    amodal = bool(rng.random() < amodal_fraction)
    scene, expr = make_sample(rng, TYPES[i % len(TYPES)], amodal=amodal)
    return Sample(scene, expr, "amodal" if amodal else "vanilla")


def draw_warmup(seed: int, i: int) -> Sample:
    """Curriculum sample `i` of stream `seed`: 1-2 shapes, a unique expression (training only)."""
    rng = np.random.default_rng([int(seed), int(i), 1])
    scene, expr = make_warmup_sample(rng)
    return Sample(scene, expr, "vanilla")


def is_synth_set(d) -> bool:
    """Whether `d` is a set `generate` wrote: samples.jsonl and images/ of NNNNNN.png, nothing else."""
    d = Path(d)
    if not (d / JSONL_NAME).is_file() or {p.name for p in d.iterdir()} - {JSONL_NAME, "images"}:
        return False
    images = d / "images"
    return not images.exists() or (images.is_dir() and all(p.is_file() and _IMAGE_NAME.fullmatch(p.name) for p in images.iterdir()))


def generate(out_dir, n: int, seed: int, amodal_fraction: float = DEFAULT_AMODAL_FRACTION, *, force: bool = False) -> Path:
    """Write `n` samples of stream `seed` under `out_dir`; returns the JSONL path.

    The set is written beside `out_dir` and renamed into place once complete. `out_dir` must be new or
    empty; `force` replaces a set this function wrote (or another egm-edge artifact), never other files."""
    from egm_edge.artifacts import staged_output
    from egm_edge.errors import InputError

    if n < 1:
        raise InputError(f"The number of samples must be at least 1, got {n}.")
    if not 0.0 <= amodal_fraction <= 1.0:
        raise InputError(f"The amodal fraction must be between 0 and 1, got {amodal_fraction}.")
    out = Path(out_dir)
    with staged_output(out, force, own=is_synth_set, complete=JSONL_NAME) as tmp:
        (tmp / "images").mkdir()
        lines = []
        for i in range(n):
            s = draw(seed, i, amodal_fraction)
            name = f"images/{i:06d}.png"
            render(s.scene).save(tmp / name, format="PNG")
            lines.append(json.dumps(s.record(name)))
        (tmp / JSONL_NAME).write_text("\n".join(lines) + "\n")
    return out / JSONL_NAME


def read_jsonl(path) -> list[dict]:
    """The records of a synthetic (or any EGM eval) JSONL file, with `image` made absolute."""
    path = Path(path)
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            r["image"] = str((path.parent / r["image"]).resolve())
            records.append(r)
    return records
