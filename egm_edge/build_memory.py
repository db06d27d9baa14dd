"""Build memory: the TensorRT engine build's predicted peak host memory, and the refusal where it would not fit.

Contract: `predict_build_memory(plan, target)` returns a frozen `BuildMemory` for
the engines egm-edge builds on the device (TensorRT, so GPUs and Jetsons; None
for cpu, whose ONNX Runtime "build" copies files): the peak is the larger of
the two engines built one after the other (decoder: embeddings + language
blocks + lm_head; vision: blocks + mergers) times `BUILD_WEIGHT_FACTOR`, plus
`BUILD_FIXED_GIB`. It is judged against the memory the build can use only where
the profile knows it: Jetsons (`shared_memory`: host and GPU share the DRAM the
profile describes, so the build has what one process gets, `usable_gib`);
for discrete GPUs the host's RAM is not in the profile and the figure is
reported, not judged. `require_build_fit(plan, target)` raises UnsupportedError
in one sentence, before any work, where it does not fit. Pure Python.

The figure is a PREDICTION from one published observation, not a measurement:
TensorRT Edge-LLM issue #30 (github.com/NVIDIA/TensorRT-Edge-LLM/issues/30,
"llm_build requires ~3-4x model parameter count in RAM during engine build") saw
a 32B model's 16-bit build climb past 96 GB and 128 GB: 3-4 bytes per parameter,
i.e. about twice the 16-bit weight bytes the builder was given. We take the
upper end, 2x the bytes of the weights as the exported graph stores them (INT4
graphs carry INT4 initializers), and 1 GiB for the CUDA context and TensorRT's
builder kernel library on the host. TensorRT's weight streaming
(BuilderFlag.WEIGHT_STREAMING) streams weights at run time from host to device
memory; on a Jetson both are the same DRAM and the build still holds every
weight, so it is no way out here: the build is refused instead, naming a smaller
model or lower precision whose build fits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from egm_edge.errors import UnsupportedError

BUILD_WEIGHT_FACTOR = 2.0  # peak host bytes per weight byte of the graph being built (Edge-LLM issue #30, see above)
BUILD_FIXED_GIB = 1.0  # CUDA context + TensorRT builder kernel library on the host
SOURCE = "TensorRT Edge-LLM issue #30: the engine builder peaks at ~3-4 bytes per parameter of a 16-bit model"
GIB = 1024**3
DECODER_PARTS = ("embeddings", "language_blocks", "lm_head")
VISION_PARTS = ("vision_blocks", "mergers")


@dataclass(frozen=True)
class BuildMemory:
    """Predicted peak host memory of building a plan's TensorRT engines on its target."""

    target: str
    model: str
    precision: str
    engine: str  # the engine whose build peaks: "decoder" or "vision"
    weight_bytes: int  # that engine's weights as the exported graph stores them
    peak_bytes: int
    available_bytes: int | None  # what the build may use; None where the profile does not know the host's memory
    label: str = "PREDICTED"

    @property
    def fits(self) -> bool | None:
        return None if self.available_bytes is None else self.peak_bytes <= self.available_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fits": self.fits, "assumption": f"{BUILD_WEIGHT_FACTOR:g} x the engine's weight bytes + "
                f"{BUILD_FIXED_GIB:g} GiB ({SOURCE})"}


def predict_build_memory(plan, target) -> BuildMemory | None:
    """The engine build's predicted peak for `plan` on `target` (see the module docstring); None for cpu targets."""
    if target.kind == "cpu":
        return None
    parts = {"decoder": sum(plan.weights.get(k, 0) for k in DECODER_PARTS),
             "vision": sum(plan.weights.get(k, 0) for k in VISION_PARTS)}
    engine = max(parts, key=parts.get)
    peak = int(BUILD_WEIGHT_FACTOR * parts[engine] + BUILD_FIXED_GIB * GIB)
    available = int(target.usable_gib * GIB) if target.shared_memory else None
    return BuildMemory(target.name, plan.model, plan.precision, engine, int(parts[engine]), peak, available)


def require_build_fit(plan, target) -> BuildMemory | None:
    """The prediction, or UnsupportedError in one sentence where the build would not fit the device's memory."""
    bm = predict_build_memory(plan, target)
    if bm is None or bm.fits is not False:
        return bm
    instead = f"instead: {plan.alternatives[0]}" if plan.alternatives else "choose a smaller model or a lower precision"
    raise UnsupportedError(
        f"Building the {bm.engine} engine of {bm.model} at {bm.precision} on {bm.target} does not fit: it needs about "
        f"{bm.peak_bytes / GIB:.1f} GiB at its peak ({BUILD_WEIGHT_FACTOR:g} x its {bm.weight_bytes / GIB:.1f} GiB of weights "
        f"+ {BUILD_FIXED_GIB:g} GiB, a prediction after TensorRT Edge-LLM issue #30) and the device has "
        f"{bm.available_bytes / GIB:.1f} GiB; {instead}.")
