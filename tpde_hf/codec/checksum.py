"""The checksum every stored weight carries: proof that a decode rebuilt the original bytes."""

from __future__ import annotations

import hashlib

import torch


def tensor_checksum(weight: torch.Tensor) -> int:
    """Signed 64-bit BLAKE2b of the weight's bytes (little-endian, row-major).

    Example: ``tensor_checksum(decode_tensor(enc)) == enc.checksum``.
    """
    data = weight.detach().to("cpu").contiguous().view(torch.uint8).numpy()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)
