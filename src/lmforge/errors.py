"""One error type for everything a user can get wrong.

Code raises ``LmforgeError("what is wrong", hint="how to fix it")``; the CLI prints it as one line and the
server as one JSON error. Only bugs produce tracebacks.
"""

from __future__ import annotations


class LmforgeError(Exception):
    """A problem the user can fix: ``message`` says what is wrong, ``hint`` how to fix it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} — {self.hint}" if self.hint else self.message


class ModelFormatError(LmforgeError):
    """A model file or folder is missing, truncated, corrupt, or in a format we do not read."""


class UnsupportedError(LmforgeError):
    """A valid input that lmforge does not support (an architecture, a quantization type...)."""
