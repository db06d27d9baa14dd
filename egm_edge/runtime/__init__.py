"""The torch-free runtime: what goes onto a device.

Contract: importing `egm_edge.runtime` (or any module under it) imports only the
standard library, numpy, pillow, tokenizers and an executor package; never torch,
transformers or modelopt. `tests/runtime/test_import_hygiene.py` proves it.
"""
