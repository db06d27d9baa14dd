"""User-facing errors: one sentence saying what was wrong, with what value, and what to do.

The CLI prints these without a traceback and exits non-zero; anything else that
escapes is a bug and keeps its traceback.
"""


class EgmError(Exception):
    """An error caused by the user's input or environment, not by egm-edge itself."""

    exit_code = 2


class InputError(EgmError):
    """Bad input data: an image, an annotation line, an expression, a request."""


class CheckpointError(EgmError):
    """A checkpoint or artifact directory that is missing, incomplete or unsupported."""


class UnsupportedError(EgmError):
    """A combination the target or this machine cannot run (precision, device, executor)."""
