"""Arbitrate a max-abs miss of an fp32 export against exact arithmetic: a float64 run of the same reference.

PyTorch's fp32 reference is not exact. In a deep model with long prompts its own rounding error grows past the
fixed max-abs bound: at the InternVL3-1B architecture (24 layers, a 784-token prompt, random weights) PyTorch fp32
is 6.6e-3 of max |logit| away from the same model run in float64, while the exported graphs in ONNX Runtime are
3.2e-3 away (benchmarks/README.md). Comparing two fp32 computations then measures both roundings, not the export.
So when an fp32-compute export (full precision, weight-only int4) passes every cosine bound but misses a max-abs
bound, the reference runs once more in float64 (loaded again: the fp32 model is gone by then, one model in
memory at a time), fed the same tokens, and each missed output passes iff the export is no further from float64
than `SLACK` times PyTorch fp32's own distance from it. A wrong graph (a transposed weight, a shifted position)
is orders of magnitude further than fp32 rounding, so it still fails.
"""

from __future__ import annotations

import gc
from typing import Callable

import numpy as np

from egm_edge.artifacts import available_host_memory
from egm_edge.errors import EgmError

# The export may round up to SLACK times as much as PyTorch's fp32 does: different summation orders, and a max over a
# small output is decided by a handful of roundings (export / PyTorch ratios 0.54-1.59 on the tiny test model;
# at InternVL3-1B 0.49-0.94 for the fp32 export, 0.61-1.93 for weight-only int4). A wrong graph is off by orders of magnitude more than fp32 rounding.
SLACK = 4.0


def _rel(got: np.ndarray, exact: np.ndarray) -> float:
    """max |got - exact| relative to max |exact| (the validation's own measure)."""
    from egm_edge.export.validate import _metric

    return _metric(got, exact)["rel_max_abs"]


def float64_outputs(refs: list, load: Callable[[], object]) -> list[dict]:
    """The reference outputs again, from `load()`'s model in float64, fed each case's fp32 reference tokens."""
    from egm_edge.export.validate import _reference

    model = load()
    extra = 4 * sum(p.numel() for p in model.parameters())  # float64 minus the float32 copy it replaces
    free = available_host_memory()
    if free is not None and extra > free:
        raise EgmError(f"Checking the export against a float64 reference needs {extra / 2**30:.1f} GiB more memory, "
                       f"{free / 2**30:.1f} GiB are available; free memory and run the export again.")
    model = model.double()
    try:
        return [_reference(model, case, 0, tokens=ref["tokens"]) for case, ref in refs]
    finally:
        del model
        gc.collect()


def arbitrate(misses: list, refs: list, gots: list[dict], load: Callable[[], object]) -> dict:
    """{"case/output": {"export_vs_float64", "reference_vs_float64", "passed"}} for each (case, output, metric) miss."""
    exact = dict(zip([case.name for case, _ in refs], float64_outputs(refs, load)))
    by_case = {case.name: (ref, got) for (case, ref), got in zip(refs, gots)}
    verdicts = {}
    for case, name, _metric in misses:
        ref, got = by_case[case]
        e_export, e_ref = _rel(got[name], exact[case][name]), _rel(ref[name], exact[case][name])
        verdicts[f"{case}/{name}"] = {"export_vs_float64": e_export, "reference_vs_float64": e_ref,
                                      "passed": bool(e_export <= SLACK * e_ref)}
    return verdicts
