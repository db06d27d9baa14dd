"""egm-edge: deployment compiler and runtime for EGM reasoning grounding models.

Importing the package is cheap and imports neither torch nor onnxruntime; each
stage imports its heavy dependencies inside the call that needs them.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "export", "quantize"]


def __getattr__(name: str):
    # Stage entry points load lazily so `import egm_edge` stays torch-free.
    if name == "export":
        # The egm_edge.export package is callable: egm_edge.export(checkpoint_dir, out_dir).
        import importlib

        return importlib.import_module("egm_edge.export")
    if name == "quantize":
        # Callable too: egm_edge.quantize(model_dir, recipe, calibration, out_dir).
        import importlib

        return importlib.import_module("egm_edge.quantize")
    raise AttributeError(f"module 'egm_edge' has no attribute {name!r}")
