"""TrtExecutor without a GPU: TensorRT and cuda-python replaced by a fake that runs the bundle's ONNX graphs.

The fake keeps "device memory" in host arrays (like a Jetson's shared memory), so
the executor's real code runs: engine discovery by key, dtype mapping, profile
choice (prefill vs decode), grow-only buffers, KV left on the device and
ping-ponged between two buffers. Grounding through it must give exactly the
tokens ONNX Runtime gives on the same graphs.
"""

from __future__ import annotations

import ctypes
import json
import types

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(float16)": np.float16}


class _FakeCudart:
    """cudaMalloc hands out host arrays; copies are memmoves. Calls return (error, value) tuples like cuda-python."""

    class cudaMemcpyKind:  # noqa: N801 - cuda-python's names
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    def __init__(self):
        self.live: dict[int, np.ndarray] = {}
        self.mallocs = 0

    def cudaSetDevice(self, i):  # noqa: N802
        return (0,)

    def cudaGetDeviceProperties(self, i):  # noqa: N802
        return 0, types.SimpleNamespace(name=b"Fake Orin GPU", major=8, minor=7)

    def cudaStreamCreate(self):  # noqa: N802
        return 0, "stream"

    def cudaStreamSynchronize(self, s):  # noqa: N802
        return (0,)

    def cudaMalloc(self, n):  # noqa: N802
        a = np.empty(n, np.uint8)
        self.live[a.ctypes.data] = a
        self.mallocs += 1
        return 0, a.ctypes.data

    def cudaFree(self, p):  # noqa: N802
        del self.live[p]
        return (0,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):  # noqa: N802
        ctypes.memmove(dst, src, n)
        return (0,)


def _read(ptr: int, shape, dtype) -> np.ndarray:
    n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    buf = (ctypes.c_char * max(n, 1)).from_address(ptr)
    return np.frombuffer(buf, np.uint8, count=n).view(dtype).reshape(shape).copy()


class _Context:
    def __init__(self, engine):
        self.e, self.shapes, self.addr, self.out, self.profiles = engine, {}, {}, None, []

    def set_optimization_profile_async(self, i, stream):
        self.profiles.append(i)

    def set_input_shape(self, name, shape):
        self.shapes[name], self.out = tuple(shape), None
        return True

    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr

    def _run(self):
        if self.out is None:  # shapes are known once inputs are; TensorRT infers them, the fake runs the graph
            feeds = {n: self._pending[n] for n in self.e.inputs}
            self.out = dict(zip(self.e.outputs, self.e.sess.run(self.e.outputs, feeds)))
        return self.out

    def get_tensor_shape(self, name):
        self._pending = {n: _read(self.addr[n], self.shapes[n], self.e.dtypes[n]) for n in self.e.inputs}
        return self._run()[name].shape

    def execute_async_v3(self, stream):
        for name, arr in self._run().items():
            a = np.ascontiguousarray(arr, self.e.dtypes[name])
            if a.nbytes:
                ctypes.memmove(self.addr[name], a.ctypes.data, a.nbytes)
        self.out = None
        return True


class _Engine:
    def __init__(self, spec):
        self.sess = ort.InferenceSession(spec["onnx"], providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.sess.get_inputs()]
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.dtypes = {i.name: np.dtype(_DTYPES[i.type]) for i in [*self.sess.get_inputs(), *self.sess.get_outputs()]}
        self.names = self.inputs + self.outputs
        self.num_io_tensors, self.num_optimization_profiles = len(self.names), spec["profiles"]
        self.contexts = []

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return "in" if name in self.inputs else "out"

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def create_execution_context(self):
        self.contexts.append(_Context(self))
        return self.contexts[-1]


def _fake_tensorrt(created):
    def deserialize(data):
        created.append(_Engine(json.loads(data)))
        return created[-1]

    return types.SimpleNamespace(
        __version__="10.16.0", TensorIOMode=types.SimpleNamespace(INPUT="in"), nptype=lambda d: d,
        Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=None: None}),
        Runtime=lambda logger: types.SimpleNamespace(deserialize_cuda_engine=deserialize),
    )


@pytest.fixture()
def fake_gpu_bundle(tiny_export_trt, tmp_path, monkeypatch):
    """A jetson bundle of the session's tiny export with fake 'engines' that point at its graphs."""
    from egm_edge.builder.tensorrt import build_tensorrt
    from egm_edge.models import spec_from_config
    from egm_edge.plan import plan
    from egm_edge.runtime import trt_executor
    from egm_edge.targets import load_target

    export = tiny_export_trt
    target = load_target("jetson-orin-nano-8gb")
    bundle = build_tensorrt(export, tmp_path / "b", target, plan(spec_from_config(export), target, "fp16", 16))
    rt, created = _FakeCudart(), []
    monkeypatch.setattr(trt_executor, "cudart", lambda: rt)
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", _fake_tensorrt(created))
    plan_hash = json.loads((bundle / "build_plan.json").read_text())["plan_hash"]
    d = bundle / "engines" / trt_executor.engine_key(trt_executor.current_device(), "10.16.0", plan_hash)
    d.mkdir(parents=True)
    for graph, profiles in (("vision", 1), ("decoder", 2)):
        (d / f"{graph}.engine").write_text(json.dumps({"onnx": str(bundle / f"{graph}.onnx"), "profiles": profiles}))
    (d / "engine.json").write_text("{}")
    return bundle, rt, created


def test_tensorrt_executor_grounds_like_onnxruntime(fake_gpu_bundle, scene):
    from egm_edge.runtime.grounder import Grounder
    from egm_edge.runtime.trt_executor import DeviceTensor, TrtExecutor

    bundle, rt, created = fake_gpu_bundle
    g = Grounder.open(bundle)  # auto: a jetson bundle selects TensorRT
    assert isinstance(g.executor, TrtExecutor)
    got = g.ground(str(scene), "the red square", think_budget=6, max_answer_tokens=8)
    ref = Grounder.open(bundle, executor="onnxruntime").ground(str(scene), "the red square", think_budget=6, max_answer_tokens=8)
    assert got.text == ref.text and got.think_tokens == ref.think_tokens == 6

    decoder = created[1].contexts[0]
    steps = got.think_tokens + got.answer_tokens
    assert decoder.profiles[0] == 0 and set(decoder.profiles[1:]) == {1} and len(decoder.profiles) >= steps
    # KV stays on the device: two buffers per present tensor, regrown only when the sequence outgrows them.
    _logits, past = g.executor.decode(
        {"input_ids": np.asarray([[1]], np.int64), "image_features": np.zeros((0, g.bundle.decoder.hidden_size), np.float32),
         "deepstack_features": np.zeros((g.bundle.decoder.num_deepstack, 0, g.bundle.decoder.hidden_size), np.float32),
         "position_ids": np.zeros((3, 1, 1), np.int64), "attention_mask": np.ones((1, 1), np.int64),
         "logits_index": np.zeros((1, 1), np.int64)},
        [np.zeros((1, g.bundle.decoder.num_kv_heads, 0, g.bundle.decoder.head_dim), np.float32)] * (2 * g.bundle.decoder.num_layers))
    assert all(isinstance(p, DeviceTensor) and p.slot == 0 and p.shape[2] == 1 for p in past)
    mallocs = rt.mallocs
    _logits, past2 = g.executor.decode(
        {"input_ids": np.asarray([[2]], np.int64), "image_features": np.zeros((0, g.bundle.decoder.hidden_size), np.float32),
         "deepstack_features": np.zeros((g.bundle.decoder.num_deepstack, 0, g.bundle.decoder.hidden_size), np.float32),
         "position_ids": np.ones((3, 1, 1), np.int64), "attention_mask": np.ones((1, 2), np.int64),
         "logits_index": np.zeros((1, 1), np.int64)}, past)
    assert all(p.slot == 1 and p.shape[2] == 2 for p in past2) and rt.mallocs == mallocs  # no new buffers at this size


def test_engines_for_another_key_are_refused(fake_gpu_bundle):
    import shutil

    from egm_edge.errors import CheckpointError
    from egm_edge.runtime.grounder import Grounder

    bundle, _rt, _created = fake_gpu_bundle
    (d,) = (bundle / "engines").iterdir()
    shutil.move(d, bundle / "engines" / d.name.replace("trt10.16.0", "trt10.3.0"))
    with pytest.raises(CheckpointError, match="not portable.*--finalize"):
        Grounder.open(bundle)


def test_bf16_host_bits_round_to_nearest_even_like_torch():
    """A bf16 engine's tensors cross to the host as raw bits (numpy has no bfloat16): the conversion rounds as
    torch's bfloat16 does, and reading back is exact."""
    torch = pytest.importorskip("torch")
    from egm_edge.runtime.trt_executor import from_bf16_bits, to_bf16_bits

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=5000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 5000),
                        np.array([0.0, -0.0, 1.0, -2.5, 3.4e38, -3.4e38, 1e-40, np.inf, -np.inf], np.float32)])
    ref = torch.from_numpy(x).to(torch.bfloat16)
    assert np.array_equal(to_bf16_bits(x), ref.view(torch.int16).numpy().view(np.uint16))
    assert np.array_equal(from_bf16_bits(to_bf16_bits(x)), ref.to(torch.float32).numpy())
    assert np.isnan(from_bf16_bits(to_bf16_bits(np.array([np.nan], np.float32)))).all()
