"""`egm-edge info`: versions, available executors, and what this machine can accelerate."""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform

NAME = "info"
HELP = "Show versions, available executors and whether CUDA/TensorRT/TensorRT-LLM are importable."
ORDER = 1

_PACKAGES = ["numpy", "pillow", "tokenizers", "onnxruntime", "onnx", "torch", "transformers", "modelopt", "tensorrt", "tensorrt_llm"]


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _version(name: str) -> str | None:
    from importlib import metadata

    dist = {"pillow": "pillow", "modelopt": "nvidia-modelopt", "tensorrt_llm": "tensorrt-llm"}.get(name, name)
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def collect() -> dict:
    """Facts about this machine; importing nothing heavy unless it is installed."""
    from egm_edge import __version__

    versions = {name: _version(name) for name in _PACKAGES}
    executors = []
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort

        executors += [f"onnxruntime:{p}" for p in ort.get_available_providers()]
    if importlib.util.find_spec("tensorrt") is not None:
        executors.append("tensorrt")
    cuda = False
    if versions["torch"]:
        import torch

        cuda = bool(torch.cuda.is_available())
    return {
        "egm_edge": __version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "versions": versions,
        "executors": executors,
        "cuda_available": cuda,
        "tensorrt_importable": importlib.util.find_spec("tensorrt") is not None,
        "tensorrt_llm_importable": importlib.util.find_spec("tensorrt_llm") is not None,
    }


def run(args: argparse.Namespace) -> int:
    facts = collect()
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    print(f"egm-edge {facts['egm_edge']} (Python {facts['python']}, {facts['machine']})")
    for name, v in facts["versions"].items():
        print(f"  {name:<14} {v or '-'}")
    print(f"executors: {', '.join(facts['executors']) or 'none'}")
    print(f"CUDA available: {'yes' if facts['cuda_available'] else 'no'}")
    print(f"TensorRT importable: {'yes' if facts['tensorrt_importable'] else 'no'}")
    print(f"TensorRT-LLM importable: {'yes' if facts['tensorrt_llm_importable'] else 'no'}")
    return 0
