"""The build stage: an export (ONNX IR) to a deployable bundle for one target.

- `build_cpu(export_dir, out_dir)`: ONNX Runtime bundle (egm_edge.build.cpu).
- `build_tensorrt(export_dir, out_dir, target, plan)`: gpu/jetson bundle with the
  ONNX IR and a TensorRT build plan; `finalize(bundle)` compiles its engines on
  the device (egm_edge.build.tensorrt); datacenter targets also get a
  TensorRT-LLM serving config (egm_edge.build.trtllm).
- `build_from_model(model_dir, recipe, target, out_dir)`: quantize -> export ->
  build in one go, stages reused (egm_edge.build.pipeline).
The bundle layout is documented in egm_edge.runtime.bundle. Importing this
package imports neither torch nor onnx nor tensorrt.
"""

from egm_edge.build.cpu import build_cpu
from egm_edge.build.pipeline import build_from_model
from egm_edge.build.tensorrt import build_tensorrt, finalize

__all__ = ["build_cpu", "build_tensorrt", "finalize", "build_from_model"]
