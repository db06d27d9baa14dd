"""Executors run the bundle's two graphs and nothing else.

The decode loop (egm_edge.runtime.grounder) owns tokens, positions, the KV cache
and sampling; an executor only maps named numpy inputs to numpy outputs. Input
and output names are those of `egm_edge.export.graphs` (see its tables).

- `OrtExecutor`: ONNX Runtime, CPU provider (the embedded default).
- `TrtExecutor` (egm_edge.runtime.trt_executor, imported only when needed): the
  TensorRT engines of a GPU/Jetson bundle, behind the `trt` extra.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from egm_edge.errors import UnsupportedError
from egm_edge.runtime.bundle import Bundle

EXECUTORS = ("auto", "onnxruntime", "tensorrt")


class Executor(Protocol):
    name: str

    def encode_image(self, pixel_patches: np.ndarray, grid_inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """-> (image_features [M, E], deepstack_features [K, M, E])."""

    def decode(self, feeds: dict[str, np.ndarray], past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """-> (logits [B, L, V], present key/values in layer order, key then value)."""


class OrtExecutor:
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, threads: int | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        # The build already saved the optimised graphs; do not redo (or undo) that work at load time.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        threads = threads or int(os.environ.get("EGM_EDGE_THREADS", "0")) or None
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        # ORT's pool threads spin after each run by default; between decode steps they would
        # compete with the host loop for the same cores (2 on this machine, 6-12 on a Jetson).
        so.add_session_config_entry("session.intra_op.allow_spinning", os.environ.get("EGM_EDGE_ORT_SPIN", "0"))
        providers = ["CPUExecutionProvider"]
        # Transformers the export said must stay off for these graphs' numerics (e.g. FP8 Q/DQ fusion).
        disabled = list((bundle.manifest.get("onnxruntime") or {}).get("disabled_optimizers") or [])
        self.vision = ort.InferenceSession(str(bundle.file("vision.onnx")), so, providers=providers, disabled_optimizers=disabled)
        self.decoder = ort.InferenceSession(str(bundle.file("decoder.onnx")), so, providers=providers, disabled_optimizers=disabled)
        # Optional prompt graph (build --prefill-int8): the same decoder with int8 GEMMs, used when many tokens
        # go in at once; decode steps stay on decoder.onnx. Both read and write the same KV cache layout.
        self.prefill = None
        if (bundle.manifest.get("prefill") or {}).get("precision"):
            self.prefill = ort.InferenceSession(str(bundle.file("prefill.onnx")), so, providers=providers, disabled_optimizers=disabled)
        n = bundle.decoder.num_layers
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
        self._vision_inputs = {i.name for i in self.vision.get_inputs()}
        self._decoder_inputs = {i.name for i in self.decoder.get_inputs()}
        missing = [p for p in self.past_names if p not in self._decoder_inputs]
        if missing:
            from egm_edge.errors import CheckpointError

            raise CheckpointError(
                f"decoder.onnx lacks inputs {missing[:2]}... expected by the bundle manifest "
                f"({n} layers); the bundle is inconsistent, rebuild it."
            )

    def encode_image(self, pixel_patches, grid_inputs):
        feeds = {"pixel_patches": pixel_patches.astype(np.float32, copy=False)}
        feeds.update({k: v for k, v in grid_inputs.items() if k in self._vision_inputs})
        feats, deep = self.vision.run(["image_features", "deepstack_features"], feeds)
        return feats, deep

    def decode(self, feeds, past):
        all_feeds = dict(feeds)
        all_feeds.update(zip(self.past_names, past))
        prompt = self.prefill is not None and feeds["input_ids"].shape[1] > 1
        out = (self.prefill if prompt else self.decoder).run(["logits", *self.present_names], all_feeds)
        return out[0], out[1:]


def make_executor(bundle: Bundle, executor: str = "auto", threads: int | None = None) -> Executor:
    if executor not in EXECUTORS:
        raise UnsupportedError(f"Unknown executor {executor!r}. Choose from: {', '.join(EXECUTORS)}.")
    # A GPU/Jetson bundle also carries its ONNX IR: --executor onnxruntime runs that on the CPU.
    if (bundle.target != "cpu" and executor != "onnxruntime") or executor == "tensorrt":
        if bundle.target == "cpu":
            raise UnsupportedError(f"Bundle {bundle.path} is a cpu bundle with no TensorRT engines; use --executor onnxruntime.")
        from egm_edge.runtime.trt_executor import TrtExecutor

        return TrtExecutor(bundle)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UnsupportedError("onnxruntime is not installed; run `pip install onnxruntime`.") from None
    return OrtExecutor(bundle, threads=threads)
