"""Errors raised by conversion, verification and push. Every message says what to do next."""

from __future__ import annotations


class ConversionError(RuntimeError):
    """A conversion could not be done (bad source, existing output, mismatched resume...).

    Example::

        try:
            convert("missing/folder", "out")
        except ConversionError as exc:
            print(exc)  # names the file or repo at fault
    """


class VerificationError(ConversionError):
    """A converted repo does not decode to its original tensors bit for bit (or is incomplete).

    ``failures`` lists ``"tensor: reason"`` strings.
    """

    def __init__(self, message: str, failures: list[str] | None = None):
        self.failures = list(failures or [])
        super().__init__(message)


class HubAccessError(ConversionError):
    """The Hub refused a request: bad token, missing repo or revision, no write access, server error."""
