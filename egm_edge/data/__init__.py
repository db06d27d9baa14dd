"""Grounding data: RefCOCO in EGM's eval format or the canonical `refer` release, and COCO as a calibration source.

Public API:
- `load_samples(path, *, image_root=None, strict=True, split=None, check_images=False) -> LoadResult`
  (`.samples`: list of `Sample`; `.skipped`: reason -> count; `.skipped_lines`; `.summary()`);
- `write_jsonl(samples, path)`: EGM's eval format, loads back equal;
- `load_coco_instances(path, image_root=None) -> list[CocoImage]`,
  `templated_expressions(coco_image, rng)`, `templated_samples(images, seed)`.
Pure Python + pillow (headers only); no torch. Pickles are never read with plain `pickle`.
"""

from egm_edge.data.coco import CocoImage, CocoInstance, Referring, load_coco_instances, templated_expressions, templated_samples
from egm_edge.data.jsonl import write_jsonl
from egm_edge.data.load import FORMATS, check_report, detect_format, load_samples
from egm_edge.data.refer import SafeUnpickler, safe_load_pickle
from egm_edge.data.samples import BOX_TOLERANCE_PX, LoadResult, Sample

__all__ = [
    "BOX_TOLERANCE_PX", "FORMATS",
    "CocoImage", "CocoInstance", "LoadResult", "Referring", "SafeUnpickler", "Sample",
    "check_report", "detect_format", "load_coco_instances", "load_samples", "safe_load_pickle",
    "templated_expressions", "templated_samples", "write_jsonl",
]
