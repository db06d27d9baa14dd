"""The build stage: an export (ONNX IR) to a deployable bundle for one target.

`build_cpu(export_dir, out_dir)` lands here (issue: export); GPU and Jetson
targets grow beside it. The bundle layout is documented in egm_edge.runtime.bundle.
"""

from egm_edge.build.cpu import build_cpu

__all__ = ["build_cpu"]
