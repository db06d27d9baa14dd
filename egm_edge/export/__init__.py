"""The export stage: a checkpoint (Qwen3-VL, InternVL-3) to the ONNX IR (vision.onnx, decoder.onnx, manifest.json).

Public call: `egm_edge.export(checkpoint_dir, out_dir, ...)`, the same as
`egm_edge.export.export(...)` (see `egm_edge.export.pipeline.export`). The
package itself is callable because `egm_edge.export` names both this package
and the stage's function: once the package is imported, Python resolves the
attribute to the package, so the package forwards calls to the function.
Importing it is cheap: torch, transformers and onnx load inside the call.
"""

import sys
import types

__all__ = ["export"]


def __getattr__(name: str):
    if name == "export":
        from egm_edge.export.pipeline import export

        return export
    raise AttributeError(f"module 'egm_edge.export' has no attribute {name!r}")


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from egm_edge.export.pipeline import export

        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
