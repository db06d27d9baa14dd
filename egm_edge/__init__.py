"""egm-edge: deployment compiler and runtime for EGM reasoning grounding models.

Importing the package is cheap and imports neither torch nor onnxruntime; each
stage imports its heavy dependencies inside the call that needs them.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
