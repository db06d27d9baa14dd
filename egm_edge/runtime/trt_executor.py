"""TensorRT executor: runs a GPU/Jetson bundle's compiled engines (tensorrt + cuda-python, no torch).

Contract: `TrtExecutor(bundle)` implements the runtime's `Executor` protocol
(egm_edge.runtime.executors) over the engines that `egm-edge build --finalize`
compiled ON this device into `bundle/engines/<key>/` (vision.engine,
decoder.engine, engine.json). The key names what an engine is only valid for:
the GPU (name and compute capability), the TensorRT version and the hash of the
bundle's build_plan.json (`engine_key`). An engine built for another device,
TensorRT version or plan is refused with one sentence that says what to run.
Inputs and outputs keep the names and dtypes of egm_edge.export.graphs; the
decoder engine has two optimisation profiles from the build plan, "prefill"
(profile 0, no past) and "decode" (profile 1, one new token), chosen per call.
The KV cache stays on the GPU: `decode` returns the present keys/values as
`DeviceTensor` handles that the decode loop passes back unchanged as the next
past (each layer ping-pongs between two grow-only buffers, so a step reads one
and writes the other); only logits and image features cross to the host.
numpy has no bfloat16: a bf16 engine tensor is held on the host as its raw 16 bits
(uint16), written from float32 by round-to-nearest-even and read back to float32
(`to_bf16_bits` / `from_bf16_bits`), so a bf16 bundle's image features make the
host round trip exactly as the engine stores them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from egm_edge.errors import CheckpointError, UnsupportedError

ENGINE_FILES = ("vision.engine", "decoder.engine", "engine.json")
PROFILES = ("prefill", "decode")


def cudart():
    """cuda-python's runtime module (new `cuda.bindings` layout first, then the older `cuda` one)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise UnsupportedError(
                "cuda-python is not installed; run `pip install cuda-python` (on a Jetson: the version matching JetPack's CUDA)."
            ) from None
    return runtime


BF16_HOST = np.dtype(np.uint16)  # how a bf16 engine tensor lives in host memory: its raw bits


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even; NaN stays NaN."""
    x = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = (x + np.uint32(0x7FFF) + ((x >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = (x & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, (x >> np.uint32(16)) | np.uint32(0x40), rounded).astype(np.uint16)


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly."""
    return (np.ascontiguousarray(b, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def host_dtype(trt, dt) -> np.dtype:
    """The numpy dtype a TensorRT tensor of type `dt` has on the host (bf16: its bits, see the module docstring)."""
    if dt == getattr(getattr(trt, "DataType", None), "BF16", object()):
        return BF16_HOST
    return np.dtype(trt.nptype(dt))


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA call failed with error {err}")
    return rest[0] if len(rest) == 1 else rest


@dataclass(frozen=True)
class Device:
    name: str
    compute_capability: str  # "9.0"

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


def current_device(index: int = 0) -> Device:
    rt = cudart()
    prop = _check(rt.cudaGetDeviceProperties(index))
    name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
    return Device(name, f"{prop.major}.{prop.minor}")


def engine_key(device: Device, tensorrt_version: str, plan_hash: str) -> str:
    """Directory name under engines/: what a compiled engine is valid for."""
    return f"{device.slug}-sm{device.compute_capability.replace('.', '')}-trt{tensorrt_version}-{plan_hash[:12]}"


def find_engines(bundle_path: Path, key: str) -> Path:
    """engines/<key>/, or CheckpointError naming the engines that are there and what to run."""
    d = bundle_path / "engines" / key
    if all((d / f).is_file() for f in ENGINE_FILES):
        return d
    others = sorted(p.name for p in (bundle_path / "engines").glob("*") if (p / "engine.json").is_file()) \
        if (bundle_path / "engines").is_dir() else []
    if others:
        raise CheckpointError(
            f"Bundle {bundle_path} has TensorRT engines only for {', '.join(others)}, not for this device and TensorRT "
            f"version ({key}); engines are not portable: run `egm-edge build --finalize {bundle_path}` here."
        )
    raise CheckpointError(f"Bundle {bundle_path} has no TensorRT engines yet; run `egm-edge build --finalize {bundle_path}` on the device.")


@dataclass(frozen=True)
class DeviceTensor:
    """A tensor left in GPU memory by an engine: opaque to the decode loop, which only passes it back."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    slot: int  # which of its output's two buffers holds it


class _Engine:
    """One deserialised engine, its context, and grow-only device buffers per tensor."""

    def __init__(self, trt, runtime, path: Path, rt):
        self.trt, self.rt = trt, rt
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise CheckpointError(f"TensorRT could not load {path} (built by another TensorRT version?); run `egm-edge build --finalize` again.")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: host_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.buffers: dict[object, tuple[int, int]] = {}  # name or (name, slot) -> (device pointer, capacity bytes)
        self.stream = _check(rt.cudaStreamCreate())

    def _buffer(self, name, nbytes: int) -> int:
        ptr, cap = self.buffers.get(name, (0, 0))
        if nbytes > cap or not ptr:
            if ptr:
                _check(self.rt.cudaFree(ptr))
            cap = max(nbytes, 256, cap * 2)  # never 0: TensorRT needs an address even for empty tensors
            ptr = int(_check(self.rt.cudaMalloc(cap)))
            self.buffers[name] = (ptr, cap)
        return ptr

    def run(self, feeds: dict, outputs: list[str], profile: int = 0, on_device: dict[str, int] | None = None) -> list:
        """Run once; `outputs` come back as numpy arrays, except those in `on_device` (name -> buffer slot),
        which stay on the GPU as DeviceTensor. Inputs may be numpy arrays or DeviceTensor."""
        rt, ctx = self.rt, self.context
        on_device = on_device or {}
        if self.engine.num_optimization_profiles > 1:
            ctx.set_optimization_profile_async(profile, self.stream)
        for name in self.inputs:
            v = feeds[name]
            if isinstance(v, DeviceTensor):
                shape, ptr, a = v.shape, v.ptr, None
            else:
                bits = self.dtypes[name] == BF16_HOST and np.asarray(v).dtype != BF16_HOST
                a = to_bf16_bits(v) if bits else np.ascontiguousarray(v, dtype=self.dtypes[name])
                shape, ptr = a.shape, self._buffer(name, a.nbytes)
            if not ctx.set_input_shape(name, tuple(shape)):
                raise UnsupportedError(
                    f"Input {name} of shape {tuple(shape)} is outside the engine's optimisation profile "
                    f"{PROFILES[profile] if profile < len(PROFILES) else profile}; rebuild the bundle with a larger plan."
                )
            if a is not None and a.nbytes:
                _check(rt.cudaMemcpyAsync(ptr, a.ctypes.data, a.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
            ctx.set_tensor_address(name, ptr)
        result = {}
        for name in self.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            nbytes = int(np.prod(shape, dtype=np.int64)) * self.dtypes[name].itemsize
            if name in on_device:
                ptr = self._buffer((name, on_device[name]), nbytes)
                result[name] = DeviceTensor(ptr, shape, self.dtypes[name], on_device[name])
            else:
                result[name] = np.empty(shape, self.dtypes[name])
                ptr = self._buffer(name, nbytes)
            ctx.set_tensor_address(name, ptr)
        if not ctx.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        for name in outputs:
            out = result[name]
            if isinstance(out, np.ndarray) and out.nbytes:
                _check(rt.cudaMemcpyAsync(out.ctypes.data, self.buffers[name][0], out.nbytes,
                                          rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        _check(rt.cudaStreamSynchronize(self.stream))
        return [from_bf16_bits(result[n]) if isinstance(result[n], np.ndarray) and self.dtypes[n] == BF16_HOST else result[n]
                for n in outputs]


class TrtExecutor:
    name = "tensorrt"

    def __init__(self, bundle, device_index: int = 0):
        try:
            import tensorrt as trt
        except ImportError:
            raise UnsupportedError(
                f"Bundle {bundle.path} targets {bundle.target} and needs TensorRT; install it (`pip install egm-edge[trt]`, "
                "on a Jetson use JetPack's python3-libnvinfer) or build a cpu bundle."
            ) from None
        rt = cudart()
        _check(rt.cudaSetDevice(device_index))
        plan = json.loads(bundle.file("build_plan.json").read_text())
        key = engine_key(current_device(device_index), trt.__version__, plan["plan_hash"])
        d = find_engines(bundle.path, key)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.vision = _Engine(trt, runtime, d / "vision.engine", rt)
        self.decoder = _Engine(trt, runtime, d / "decoder.engine", rt)
        self.engine_dir = d
        self.bundle = bundle
        n = bundle.decoder.num_layers
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
        missing = [p for p in self.past_names if p not in self.decoder.inputs]
        if missing:
            raise CheckpointError(f"decoder.engine lacks inputs {missing[:2]}... for {n} layers; the bundle is inconsistent, rebuild it.")

    def new_cache(self, capacity: int):
        from egm_edge.runtime.executors import empty_cache

        return empty_cache(self.bundle)

    def encode_image(self, pixel_patches, grid_inputs):
        feeds = {"pixel_values" if "pixel_values" in self.vision.inputs else "pixel_patches": pixel_patches}
        feeds.update({k: v for k, v in grid_inputs.items() if k in self.vision.inputs})
        feats, deep = self.vision.run(feeds, ["image_features", "deepstack_features"])
        return feats.astype(np.float32, copy=False), deep.astype(np.float32, copy=False)

    def decode(self, feeds, past):
        all_feeds = dict(feeds)
        all_feeds.update(zip(self.past_names, past))
        profile = 0 if past[0].shape[2] == 0 else 1
        # Each present goes to the buffer its past is not in: the step reads one and writes the other.
        slots = {n: 1 - p.slot if isinstance(p, DeviceTensor) else 0 for n, p in zip(self.present_names, past)}
        out = self.decoder.run(all_feeds, ["logits", *self.present_names], profile=profile, on_device=slots)
        return out[0].astype(np.float32, copy=False), out[1:]
