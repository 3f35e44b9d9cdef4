"""The one exception type for bad user input.

A config value, a file, a path or a checkpoint the user named that cannot be used raises
:class:`UserError` with one paragraph that names the option or file and the fix. ``lit-vlm``
shows it as ``lit-vlm: error: ...`` with no traceback (``LIT_VLM_DEBUG=1`` shows it); anything
else is a bug and keeps its traceback: internal contracts (shapes passed between building blocks,
losses and metrics) stay plain ``ValueError``. ``UserError`` is a ``ValueError`` and
:class:`MissingFileError` also a ``FileNotFoundError``, so code that catches those still does.
"""

from __future__ import annotations


class UserError(ValueError):
    """Input from the user (config, file, path, checkpoint) that cannot be used; one paragraph."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (or holds nothing usable yet)."""


__all__ = ["MissingFileError", "UserError"]
