"""Write the two graphs to ONNX: trace samples, dynamic axes, external data, environment checks.

`export_graph` runs `torch.onnx.export` (the dynamo exporter) on a module from
`egm_edge.export.graphs` with sample inputs whose dynamic dimensions are all
>= 2 (torch.export specialises sizes 0 and 1), then saves the model with its
weights inline below `EXTERNAL_DATA_THRESHOLD` bytes and in one external data
file `<name>.onnx.data` next to it above. Disk space is estimated before
anything is written; onnx/onnxruntime/opset too old fail with one sentence.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from egm_edge.errors import EgmError, UnsupportedError

# 21: float8/int4 Q/DQ with output_dtype and blocked quantization; onnxruntime >= 1.20 and TensorRT 10 read it.
OPSET = 21
MIN_VERSIONS = {"onnx": (1, 16), "onnxruntime": (1, 20), "torch": (2, 6)}
# Protobuf cannot hold more than 2 GiB; stay well below it and keep big graphs' weights in a side file.
EXTERNAL_DATA_THRESHOLD = 1_500_000_000


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def check_environment(opset: int = OPSET) -> dict[str, str]:
    """Versions of the export toolchain; raises UnsupportedError when one is too old for `opset`."""
    from importlib import metadata

    versions = {}
    for name, minimum in MIN_VERSIONS.items():
        try:
            v = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise UnsupportedError(f"Export needs {name} >= {'.'.join(map(str, minimum))}, which is not installed; run `pip install 'egm-edge[export,quant]'`.") from None
        if _version_tuple(v) < minimum:
            raise UnsupportedError(f"{name} {v} is too old for export; install {name} >= {'.'.join(map(str, minimum))}.")
        versions[name] = v
    import onnx

    if opset > onnx.defs.onnx_opset_version():
        raise UnsupportedError(f"onnx {versions['onnx']} supports opset up to {onnx.defs.onnx_opset_version()}, but export writes opset {opset}; upgrade onnx.")
    return versions


def check_disk_space(out_dir: Path, needed_bytes: int, margin: float = 1.2) -> None:
    """Refuse to start when the filesystem of `out_dir` cannot hold `needed_bytes` (plus a margin)."""
    probe = Path(out_dir)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes * margin:
        raise EgmError(
            f"Not enough disk space in {probe}: export needs about {needed_bytes * margin / 1e9:.2f} GB "
            f"and {free / 1e9:.2f} GB are free; free space or choose another --out."
        )


def name_dims(model, dims: dict[str, list[str | None]]) -> None:
    """Give the graph's inputs/outputs (onnx_ir values) readable symbolic dimensions (`dims[name][axis]`, None = keep)."""
    import onnx_ir as ir

    for value in list(model.graph.inputs) + list(model.graph.outputs):
        names = dims.get(value.name)
        if not names or value.shape is None:
            continue
        names = list(names) + [None] * (len(value.shape) - len(names))
        value.shape = ir.Shape([d if (n is None or isinstance(d, int)) else ir.SymbolicDim(n) for d, n in zip(value.shape, names)])


def export_graph(module, args: tuple, path: Path, input_names, output_names, dynamic_shapes, dims: dict, weight_bytes: int,
                 opset: int = OPSET, translations: dict | None = None, postprocess=None) -> list[str]:
    """Export `module(*args)` to `path`; returns the file names written (graph, and `<graph>.data` above the threshold).

    Saving goes through the exporter's IR, never a single protobuf, so graphs above 2 GB work.
    """
    import logging
    import warnings

    import torch

    # The exporter logs a warning per missing torchvision op and torch.export a FutureWarning per call: noise here.
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=opset,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_shapes=dynamic_shapes,
                optimize=True,
                custom_translation_table=translations or None,
                verbose=False,
            )
    finally:
        onnx_log.setLevel(level)
    name_dims(program.model, dims)
    if postprocess is not None:
        postprocess(program.model)
    path = Path(path)
    external = weight_bytes > EXTERNAL_DATA_THRESHOLD
    program.save(str(path), external_data=external)
    return [path.name, path.name + ".data"] if external else [path.name]


def weight_bytes(module) -> int:
    """Bytes of parameters and buffers a graph will carry (an upper bound for its initializers)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
