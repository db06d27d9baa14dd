"""The build stage: an export (ONNX IR) to a deployable bundle for one target.

- `build_cpu(export_dir, out_dir)`: ONNX Runtime bundle (egm_edge.builder.cpu).
- `build_tensorrt(export_dir, out_dir, target, plan)`: gpu/jetson bundle with the
  ONNX IR and a TensorRT build plan; `finalize(bundle)` compiles its engines on
  the device (egm_edge.builder.tensorrt); datacenter targets also get a
  TensorRT-LLM serving config (egm_edge.builder.trtllm).
- `build_from_model(model_dir, recipe, target, out_dir)`: quantize -> export ->
  build in one go, stages reused (egm_edge.builder.pipeline).
The bundle layout is documented in egm_edge.runtime.bundle. Importing this
package imports neither torch nor onnx nor tensorrt. It is named `builder`, not
`build`: black and code-map tools skip folders named build (the top-level build/
of target profiles keeps its name).
"""

from egm_edge.builder.cpu import build_cpu
from egm_edge.builder.pipeline import build_from_model
from egm_edge.builder.tensorrt import build_tensorrt, finalize

__all__ = ["build_cpu", "build_tensorrt", "finalize", "build_from_model"]
