"""The synthetic grounding world: coloured shapes, verified referring expressions, EGM-style traces.

Public API: `generate(out_dir, n, seed, amodal_fraction=0.15) -> Path` (EGM eval
JSONL + PNGs), `draw(seed, i) -> Sample` (one in-memory sample), `render(scene)`,
`reasoning(scene, expr)` / `answer(scene, expr)` (the assistant target text).
Pure numpy + pillow; deterministic per seed.
"""

from egm_edge.synth.dataset import JSONL_NAME, Sample, draw, generate, read_jsonl
from egm_edge.synth.expressions import TYPES, Expression, resolve
from egm_edge.synth.traces import answer, assistant_ids, assistant_text, reasoning
from egm_edge.synth.world import Scene, Shape, render

__all__ = [
    "JSONL_NAME", "TYPES", "Expression", "Sample", "Scene", "Shape",
    "answer", "assistant_ids", "assistant_text", "draw", "generate", "read_jsonl", "reasoning", "render", "resolve",
]
