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

from egm_edge.errors import CheckpointError, UnsupportedError
from egm_edge.runtime.bundle import KV_CACHE_IN_PLACE, Bundle

EXECUTORS = ("auto", "onnxruntime", "tensorrt")


class Executor(Protocol):
    name: str

    def encode_image(self, pixel_patches: np.ndarray, grid_inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """-> (image_features [M, E], deepstack_features [K, M, E]). `pixel_patches` feeds the vision graph's pixel
        input: Qwen3-VL's `pixel_patches` (with the grid tensors) or InternVL's tiles, `pixel_values` (no grid inputs)."""

    def new_cache(self, capacity: int):
        """An empty KV cache for one sequence of up to `capacity` tokens, to pass as `past` to the first decode."""

    def decode(self, feeds: dict[str, np.ndarray], past) -> tuple[np.ndarray, object]:
        """-> (logits [B, L, V], the cache to pass as `past` next: present key/values in layer order, key then
        value, or the executor's in-place cache object)."""

    # Optional (in-flight batching, egm_edge.runtime.scheduler): executors without it decode one row at a time.
    # def decode_batch(self, feeds, arrays: list[np.ndarray], past_len: int) -> np.ndarray:
    #     """One step of B rows whose caches are arrays[i][:B] (egm_edge.runtime.batch_cache); writes column past_len."""


def empty_cache(bundle: Bundle, dtype=np.float32) -> list[np.ndarray]:
    d = bundle.decoder
    return [np.zeros((1, d.num_kv_heads, 0, d.head_dim), dtype) for _ in range(2 * d.num_layers)]


# ONNX element types the host feeds as numpy arrays; a 16-bit GPU bundle's graphs take float16 (its KV cache too).
_NUMPY_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _refuse_bfloat16(bundle: Bundle):
    raise UnsupportedError(f"Bundle {bundle.path} has bfloat16 graphs, which ONNX Runtime cannot run on a CPU; run the bundle "
                           "with its TensorRT engines on the device (--executor tensorrt).")


def _float_inputs(session, bundle: Bundle) -> dict[str, type]:
    """Input name -> numpy dtype for the float inputs of `session`; bfloat16 graphs are refused in one sentence."""
    out = {}
    for i in session.get_inputs():
        if i.type == "tensor(bfloat16)":
            _refuse_bfloat16(bundle)
        if i.type in _NUMPY_FLOATS:
            out[i.name] = _NUMPY_FLOATS[i.type]
    return out


class KVBuffers:
    """An in-place KV cache: one [1, kv_heads, capacity, head_dim] array per past tensor (rows 0..length-1 hold
    the sequence so far), each wrapped once as the OrtValue that a step binds as both its past and its present,
    so GroupQueryAttention appends the new rows where they belong and a step copies no cache."""

    def __init__(self, kv_heads: int, head_dim: int, n: int, capacity: int, dtype=np.float32):
        import onnxruntime as ort

        self.arrays = [np.zeros((1, kv_heads, capacity, head_dim), dtype) for _ in range(n)]
        self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.arrays]  # views of the arrays, no copy
        self.capacity, self.length = capacity, 0

    def grown(self, needed: int) -> "KVBuffers":
        """A larger cache with the same rows (when a sequence outgrows its planned capacity)."""
        _, kv, _, hd = self.arrays[0].shape
        bigger = KVBuffers(kv, hd, len(self.arrays), max(needed, 2 * self.capacity), self.arrays[0].dtype)
        for old, new in zip(self.arrays, bigger.arrays):
            new[:, :, : self.length] = old[:, :, : self.length]
        bigger.length = self.length
        return bigger


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

        def session(name: str):
            try:
                return ort.InferenceSession(str(bundle.file(name)), so, providers=providers, disabled_optimizers=disabled)
            except MemoryError:
                raise
            except Exception as e:  # onnxruntime raises its own classes for an empty, truncated or foreign file
                from egm_edge.runtime.bundle import one_line

                reason = one_line(e).rpartition(" failed:")[2] or one_line(e)
                raise CheckpointError(f"ONNX Runtime cannot load {name} of bundle {bundle.path} ({reason}); the file is damaged "
                                      "or was written for another onnxruntime, rebuild the bundle.") from None

        if ((bundle.manifest.get("runtime") or {}).get("decoder") or {}).get("cache_dtype") == "bfloat16":
            _refuse_bfloat16(bundle)  # before ONNX Runtime fails to load them with a kernel error
        self.vision = session("vision.onnx")
        self.decoder = session("decoder.onnx")
        # Optional prompt graph (build --prefill-int8): the same decoder with int8 GEMMs, used when many tokens
        # go in at once; decode steps stay on decoder.onnx. Both read and write the same KV cache layout.
        self.prefill = None
        if (bundle.manifest.get("prefill") or {}).get("precision"):
            self.prefill = session("prefill.onnx")
        self.bundle = bundle
        # GroupQueryAttention graphs take one buffer as past and present (egm_edge.export.fused);
        # EGM_EDGE_KV_IN_PLACE=0 runs them with a growing cache instead (for comparison).
        self.in_place = bundle.decoder.kv_cache == KV_CACHE_IN_PLACE and os.environ.get("EGM_EDGE_KV_IN_PLACE", "1") != "0"
        n = bundle.decoder.num_layers
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
        self._vision_inputs = {i.name for i in self.vision.get_inputs()}
        self._decoder_inputs = {i.name for i in self.decoder.get_inputs()}
        missing = [p for p in self.past_names if p not in self._decoder_inputs]
        if missing:
            raise CheckpointError(
                f"decoder.onnx lacks inputs {missing[:2]}... expected by the bundle manifest "
                f"({n} layers); the bundle is inconsistent, rebuild it."
            )
        _check_decoder_shapes(bundle, self.decoder)
        self._vision_floats = _float_inputs(self.vision, bundle)
        self._decoder_floats = _float_inputs(self.decoder, bundle)
        self.cache_dtype = np.dtype(self._decoder_floats.get(self.past_names[0], np.float32))

    def _cast(self, feeds: dict, floats: dict) -> dict:
        """Float feeds in the graph's input dtypes (the host computes in float32; a 16-bit graph takes float16)."""
        return {k: (v.astype(floats[k], copy=False) if k in floats else v) for k, v in feeds.items()}

    def encode_image(self, pixel_patches, grid_inputs):
        name = "pixel_values" if "pixel_values" in self._vision_inputs else "pixel_patches"
        feeds = {name: pixel_patches}
        feeds.update({k: v for k, v in grid_inputs.items() if k in self._vision_inputs})
        feats, deep = self.vision.run(["image_features", "deepstack_features"], self._cast(feeds, self._vision_floats))
        return feats, deep

    def new_cache(self, capacity: int):
        if not self.in_place:
            return empty_cache(self.bundle, self.cache_dtype)
        d = self.bundle.decoder
        return KVBuffers(d.num_kv_heads, d.head_dim, 2 * d.num_layers, max(1, int(capacity)), self.cache_dtype)

    def decode(self, feeds, past):
        prompt = self.prefill is not None and feeds["input_ids"].shape[1] > 1
        session = self.prefill if prompt else self.decoder
        feeds = self._cast(feeds, self._decoder_floats)
        if isinstance(past, KVBuffers):
            return self._decode_in_place(session, feeds, past)
        all_feeds = dict(feeds)
        all_feeds.update(zip(self.past_names, past))
        out = session.run(["logits", *self.present_names], all_feeds)
        return out[0], out[1:]

    def decode_batch(self, feeds, arrays: list[np.ndarray], past_len: int) -> np.ndarray:
        """One decode step of the B rows whose caches are `arrays[i][:B]` ([B, kv, capacity, hd], columns
        0..past_len-1 filled, padding masked by feeds["attention_mask"]); each row's new key and value land
        at column past_len. Returns logits [B, 1, V]."""
        b = feeds["input_ids"].shape[0]
        feeds = self._cast(feeds, self._decoder_floats)
        if not self.in_place:  # a graph with a growing cache: pass the filled columns, keep the new one
            past = [np.ascontiguousarray(a[:b, :, :past_len]) for a in arrays]
            out = self.decoder.run(["logits", *self.present_names], {**feeds, **dict(zip(self.past_names, past))})
            for a, present in zip(arrays, out[1:]):
                a[:b, :, past_len] = present[:, :, past_len]
            return out[0]
        import onnxruntime as ort

        views = [ort.OrtValue.ortvalue_from_numpy(a[:b]) for a in arrays]  # a prefix of rows: contiguous, no copy
        return self._run_sharing(self.decoder, feeds, views)

    def _run_sharing(self, session, feeds, values) -> np.ndarray:
        """Run `session` with each layer's past and present bound to the same OrtValue (the cache is updated in
        place); returns the logits."""
        io = session.io_binding()
        for name, value in feeds.items():
            io.bind_cpu_input(name, np.ascontiguousarray(value))
        io.bind_output("logits")
        for past_name, present_name, value in zip(self.past_names, self.present_names, values):
            io.bind_ortvalue_input(past_name, value)
            io.bind_ortvalue_output(present_name, value)
        session.run_with_iobinding(io)
        return io.get_outputs()[0].numpy()

    def _decode_in_place(self, session, feeds, cache: KVBuffers):
        total = feeds["attention_mask"].shape[1]
        if feeds["input_ids"].shape[0] != 1 or total - feeds["input_ids"].shape[1] != cache.length:
            raise ValueError(f"an in-place KV cache holds one sequence of {cache.length} tokens; this step says "
                             f"{total - feeds['input_ids'].shape[1]} past tokens for batch {feeds['input_ids'].shape[0]}")
        if total > cache.capacity:
            cache = cache.grown(total)
        logits = self._run_sharing(session, feeds, cache.values)
        cache.length = total
        return logits, cache


def _check_decoder_shapes(bundle: Bundle, session) -> None:
    """The manifest's decoder numbers against the graph's fixed dimensions, so a wrong one is refused at open
    rather than failing the first request."""
    d = bundle.decoder
    ins = {i.name: i.shape for i in session.get_inputs()}
    outs = {o.name: o.shape for o in session.get_outputs()}
    wanted = [("num_kv_heads", d.num_kv_heads, ins.get("past_key_values.0.key"), 1),
              ("head_dim", d.head_dim, ins.get("past_key_values.0.key"), 3),
              ("hidden_size", d.hidden_size, ins.get("image_features"), 1),
              ("num_deepstack", d.num_deepstack, ins.get("deepstack_features"), 0),
              ("vocab_size", d.vocab_size, outs.get("logits"), 2)]
    for name, want, shape, axis in wanted:
        got = shape[axis] if shape is not None and len(shape) > axis else None
        if isinstance(got, int) and got != want:
            raise CheckpointError(f"Bundle {bundle.path}'s manifest gives the decoder {name} {want}, but decoder.onnx has "
                                  f"{got}; the manifest does not belong to these graphs, rebuild the bundle.")


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
