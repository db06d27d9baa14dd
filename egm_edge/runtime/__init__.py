"""The torch-free runtime: what goes onto a device.

Contract: importing `egm_edge.runtime` (or any module under it) imports only the
standard library, numpy, pillow, tokenizers and an executor package; never torch,
transformers or modelopt. `tests/runtime/test_import_hygiene.py` proves it.
"""


def __getattr__(name: str):
    # `from egm_edge.runtime import Grounder` without importing onnxruntime at package import.
    if name == "Grounder":
        from egm_edge.runtime.grounder import Grounder

        return Grounder
    raise AttributeError(f"module 'egm_edge.runtime' has no attribute {name!r}")
