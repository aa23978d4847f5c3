"""Exceptions raised by tpde-hf."""


class TpdeFormatError(ValueError):
    """A tpde tensor or repository is malformed, truncated, corrupt or of an unsupported version.

    The message always names the tensor (or file) at fault, so that a user can tell which
    shard to re-download or re-convert.
    """

    def __init__(self, name: str | None, message: str):
        self.tensor_name = name
        super().__init__(f"{name}: {message}" if name else message)
