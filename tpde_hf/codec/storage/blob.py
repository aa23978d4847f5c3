"""Byte layout helpers of the ``narrow-rans`` blobs: a fixed little-endian header, then sections.

A blob is one uint8 tensor: few parts per tensor keep a safetensors header small (each stored tensor costs
about 100 bytes of JSON there, which is 0.005 bits per weight on a 384 x 384 weight).

Example::

    blob = pack_blob(HEADER, (1, 2), [b"ab", b"c"])
    fields, sections = unpack_blob(blob, HEADER, 2, "layer.weight")
"""

from __future__ import annotations

import struct
import threading

import numpy as np
import torch
import zstandard

from tpde_hf.errors import TpdeFormatError


def pack_blob(header: struct.Struct, fields: tuple[int, ...], sections: list[bytes]) -> torch.Tensor:
    """``header(fields) + u32 length of each section + sections`` as a uint8 tensor."""
    head = header.pack(*fields) + struct.pack(f"<{len(sections)}I", *(len(s) for s in sections))
    data = head + b"".join(sections)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def unpack_blob(blob: torch.Tensor, header: struct.Struct, n_sections: int,
                name: str) -> tuple[tuple[int, ...], list[memoryview]]:
    """Inverse of :func:`pack_blob`; a :class:`TpdeFormatError` naming ``name`` if the sizes disagree."""
    if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
        raise TpdeFormatError(name, f"a narrow-rans blob must be a 1-D uint8 tensor, got "
                                    f"{getattr(blob, 'dtype', type(blob))}{list(getattr(blob, 'shape', []))}")
    data = memoryview(blob.contiguous().numpy()).cast("B")
    head = header.size + 4 * n_sections
    if len(data) < head:
        raise TpdeFormatError(name, f"blob of {len(data)} bytes is shorter than its header ({head}): truncated")
    fields = header.unpack_from(data, 0)
    lengths = struct.unpack_from(f"<{n_sections}I", data, header.size)
    if head + sum(lengths) != len(data):
        raise TpdeFormatError(name, f"blob holds {len(data)} bytes, its header says {head + sum(lengths)} "
                                    "(truncated or corrupt)")
    out, pos = [], head
    for n in lengths:
        out.append(data[pos:pos + n])
        pos += n
    return fields, out


def zstd_pack(arr: np.ndarray, level: int) -> bytes:
    return zstandard.ZstdCompressor(level=level).compress(np.ascontiguousarray(arr).tobytes())


_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor (making one costs ~26 us, 7x a small section's decompression; one object is
    not safe across threads)."""
    d = getattr(_local, "zstd", None)
    if d is None:
        d = _local.zstd = zstandard.ZstdDecompressor()
    return d


def zstd_unpack(data: memoryview, dtype: str, count: int, name: str, what: str) -> np.ndarray:
    """``count`` values of ``dtype`` from a zstd frame; an error naming ``what`` unless exactly that many."""
    size = np.dtype(dtype).itemsize * count
    try:
        raw = _decompressor().decompress(bytes(data), max_output_size=max(size, 1))
    except zstandard.ZstdError as exc:
        raise TpdeFormatError(name, f"{what} are corrupt ({exc})") from None
    if len(raw) != size:
        raise TpdeFormatError(name, f"{what} hold {len(raw)} bytes, expected {size}")
    return np.frombuffer(raw, dtype=dtype).copy()


def words_of(data: memoryview, name: str) -> np.ndarray:
    """A section of 16-bit rANS words (little-endian) as uint16."""
    if len(data) % 2:
        raise TpdeFormatError(name, "a rANS word section has an odd byte count")
    return np.frombuffer(data, dtype="<u2")
