"""The PyTorch reference ("full model"): a local checkpoint (Qwen3-VL, InternVL-3) run with transformers.

Importing this package is cheap: torch and transformers load only when a runner
is opened or a checkpoint is written. `ReferenceRunner` is what validate, sweep,
calibration and training evaluation compare against; `write_tiny_checkpoint`
builds the random tiny models tests use; `convert_checkpoint` turns an original-layout
InternVL checkpoint into transformers' layout (`egm-edge convert`).
"""

__all__ = ["ReferenceRunner", "convert_checkpoint", "write_tiny_checkpoint"]


def __getattr__(name: str):
    if name == "ReferenceRunner":
        from egm_edge.reference.runner import ReferenceRunner

        return ReferenceRunner
    if name == "write_tiny_checkpoint":
        from egm_edge.reference.checkpoint import write_tiny_checkpoint

        return write_tiny_checkpoint
    if name == "convert_checkpoint":
        from egm_edge.reference.convert import convert_checkpoint

        return convert_checkpoint
    raise AttributeError(f"module 'egm_edge.reference' has no attribute {name!r}")
