"""`egm-edge build --finalize` without a GPU: a recording fake of the TensorRT builder API checks what finalize asks for.

It proves the calls are made as the build plan says (STRONGLY_TYPED network from
the ONNX parser, workspace limit, one optimisation profile per plan entry with
every network input's min/opt/max), that engines land under their key and are
reused, and that a GPU of another compute capability is refused. Whether real
TensorRT accepts them is the gpu-marked test's job.
"""

from __future__ import annotations

import json
import types

import pytest

from egm_edge.errors import EgmError, UnsupportedError


class _Recorder:
    def __init__(self):
        self.builds, self.fail_parse = [], False


def _fake_tensorrt(rec: _Recorder):
    import onnx

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs = flags, []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return types.SimpleNamespace(name=self.inputs[i])

    class Parser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            if rec.fail_parse:
                self.num_errors = 1
                return False
            m = onnx.load(path, load_external_data=False)
            self.network.inputs = [i.name for i in m.graph.input]
            self.network.onnx = path
            return True

        def get_error(self, i):
            return "unsupported node"

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (lo, opt, hi)

    class Config:
        def __init__(self):
            self.pools, self.profiles = {}, []

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size

        def add_optimization_profile(self, p):
            self.profiles.append(p)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            rec.builds.append({"onnx": network.onnx, "flags": network.flags, "inputs": network.inputs, "pools": config.pools,
                               "profiles": [p.shapes for p in config.profiles]})
            return b"engine"

    return types.SimpleNamespace(
        __version__="10.16.0", Builder=Builder, OnnxParser=Parser,
        Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=None: None}),
        NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=5), MemoryPoolType=types.SimpleNamespace(WORKSPACE="workspace"),
    )


def _device(sm: str):
    major, minor = sm.split(".")

    class Rt:
        def cudaGetDeviceProperties(self, i):  # noqa: N802
            return 0, types.SimpleNamespace(name=b"Fake GPU", major=int(major), minor=int(minor))

    return Rt()


@pytest.fixture()
def bundle(tiny_export_trt, tmp_path):
    from egm_edge.builder.tensorrt import build_tensorrt
    from egm_edge.models import spec_from_config
    from egm_edge.plan import plan
    from egm_edge.targets import load_target

    export = tiny_export_trt
    target = load_target("jetson-orin-nx-16gb")
    return build_tensorrt(export, tmp_path / "b", target, plan(spec_from_config(export), target, "fp16", 32))


@pytest.fixture()
def fake(monkeypatch):
    from egm_edge.runtime import trt_executor

    rec = _Recorder()
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", _fake_tensorrt(rec))
    monkeypatch.setattr(trt_executor, "cudart", lambda: _device("8.7"))
    return rec, monkeypatch


def test_finalize_builds_what_the_plan_says_and_reuses_it(bundle, fake):
    from egm_edge.builder.tensorrt import finalize

    rec, _ = fake
    d = finalize(bundle)
    assert d.parent.name == "engines" and d.name.startswith("fake-gpu-sm87-trt10.16.0-")
    assert {p.name for p in d.iterdir()} == {"vision.engine", "decoder.engine", "engine.json"}
    bp = json.loads((bundle / "build_plan.json").read_text())
    info = json.loads((d / "engine.json").read_text())
    assert info["plan_hash"] == bp["plan_hash"] and info["tensorrt"] == "10.16.0" and info["compute_capability"] == "8.7"
    assert len(rec.builds) == 2
    for build, graph in zip(rec.builds, ("vision", "decoder")):
        assert build["flags"] == 1 << 5  # STRONGLY_TYPED, nothing else
        assert build["pools"] == {"workspace": bp["workspace_bytes"]}
        plan_profiles = bp["engines"][graph]["profiles"]
        assert len(build["profiles"]) == len(plan_profiles)
        for got, want in zip(build["profiles"], plan_profiles):
            assert set(got) == set(build["inputs"])
            assert all(got[n] == tuple(tuple(want["shapes"][n][k]) for k in ("min", "opt", "max")) for n in got)
    assert finalize(bundle) == d and len(rec.builds) == 2  # cached
    finalize(bundle, force=True)
    assert len(rec.builds) == 4


def test_finalize_refuses_another_compute_capability_and_reports_parse_errors(bundle, fake):
    from egm_edge.builder.tensorrt import finalize
    from egm_edge.runtime import trt_executor

    rec, monkeypatch = fake
    monkeypatch.setattr(trt_executor, "cudart", lambda: _device("9.0"))
    with pytest.raises(UnsupportedError, match=r"planned for jetson-orin-nx-16gb \(SM 8.7\).*SM 9.0"):
        finalize(bundle)
    monkeypatch.setattr(trt_executor, "cudart", lambda: _device("8.7"))
    rec.fail_parse = True
    with pytest.raises(EgmError, match="could not parse vision.onnx"):
        finalize(bundle)
    assert not (bundle / "engines").exists() or not any((bundle / "engines").iterdir())  # nothing half-built left behind


def test_finalize_refuses_a_cpu_bundle(tiny_bundle, fake):
    from egm_edge.builder.tensorrt import finalize

    with pytest.raises(UnsupportedError, match="only gpu and jetson bundles"):
        finalize(tiny_bundle)
