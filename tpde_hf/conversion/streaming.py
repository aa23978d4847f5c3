"""Streaming safetensors I/O: read headers and byte ranges, write shards one tensor at a time.

Why not ``safetensors.torch.save_file``: it needs every tensor of a file in memory at once, so
the peak memory of a conversion would be a whole output shard. :class:`ShardWriter` appends each
tensor's bytes to a spill file as it arrives and writes the real file (header + data) when the
shard is closed, so memory stays at one tensor whatever the shard size.

The files written are ordinary safetensors files (tensors ordered by alignment, then name, the
way ``safetensors`` orders them), readable by ``safe_open`` and ``from_pretrained``. Every writer
records the xxh3 checksum of each tensor in the header (:mod:`tpde_hf.integrity`), hashed while
the bytes are copied, so that a load can detect a damaged file.

Example::

    with ShardWriter(Path("out.safetensors")) as w:
        w.add_tensor("a", torch.ones(3))
    print(read_header(Path("out.safetensors"))["a"].shape)  # [3]
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from tpde_hf.errors import TpdeFormatError
from tpde_hf.files import atomic_file
from tpde_hf.format import SAFETENSORS_DTYPES
from tpde_hf.integrity import ITEMSIZE, read_shard_header, write_shard

_CHUNK = 8 * 1024 * 1024
_TORCH_TO_ST = {getattr(torch, v): k for k, v in SAFETENSORS_DTYPES.items() if hasattr(torch, v)}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file (``begin``/``end``: absolute file offsets)."""

    name: str
    dtype: str  # safetensors spelling, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int
    end: int
    file: Path

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def torch_dtype_name(self) -> str:
        return SAFETENSORS_DTYPES.get(self.dtype, self.dtype.lower())


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header without reading any tensor data; validate offsets against the file.

    The parse is :func:`tpde_hf.integrity.read_shard_header`'s (one parser for conversion, load and checks).
    Raises :class:`TpdeFormatError` naming ``path`` for a truncated or malformed file.
    """
    path = Path(path)
    return {name: TensorInfo(name, t.dtype, t.shape, t.begin, t.end, path)
            for name, t in read_shard_header(path).tensors.items()}


def iter_bytes(info: TensorInfo, chunk: int = _CHUNK) -> Iterator[bytes]:
    """Yield a tensor's raw bytes in chunks (constant memory)."""
    with open(info.file, "rb") as f:
        f.seek(info.begin)
        left = info.nbytes
        while left:
            block = f.read(min(chunk, left))
            if not block:
                raise TpdeFormatError(str(info.file), f"unexpected end of file inside {info.name!r}")
            left -= len(block)
            yield block


def bytes_checksum(blocks: Iterator[bytes] | list[bytes]) -> int:
    """Signed 64-bit BLAKE2b of concatenated bytes; equals ``tensor_checksum`` of the same tensor."""
    h = hashlib.blake2b(digest_size=8)
    for b in blocks:
        h.update(b)
    return int.from_bytes(h.digest(), "little", signed=True)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes (row-major, native little-endian), without a copy when contiguous."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


def st_dtype(dtype: torch.dtype) -> str:
    """torch dtype -> safetensors dtype string."""
    try:
        return _TORCH_TO_ST[dtype]
    except KeyError:
        raise TpdeFormatError(None, f"dtype {dtype} cannot be stored in safetensors") from None


def _align(st: str) -> int:
    return ITEMSIZE.get(st, 1)


class ShardWriter:
    """Write one safetensors file tensor by tensor, holding at most one tensor in memory.

    Data goes to ``<path>.spill`` as it arrives; :meth:`close` writes ``<path>`` (header, then the
    data copied in alignment order) and removes the spill file. ``hashes`` maps every written
    tensor to the :func:`bytes_checksum` of its bytes, for the re-read check after closing; the
    header carries their xxh3 checksums (:mod:`tpde_hf.integrity`).

    Example::

        w = ShardWriter(tmp / "model-00001.safetensors", metadata={"format": "pt"})
        w.add_tensor("x", torch.zeros(2, 2))
        w.close()
    """

    def __init__(self, path: Path, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._spill_path = self.path.with_name(self.path.name + ".spill")
        self._spill = open(self._spill_path, "wb")
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}  # name -> dtype, shape, off, len
        self.hashes: dict[str, int] = {}
        self.nbytes = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _start(self, name: str) -> None:
        if name in self._entries:
            raise ValueError(f"duplicate tensor {name!r} in {self.path.name}")

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Append a tensor (any dtype safetensors supports)."""
        self._start(name)
        data = tensor_bytes(tensor)
        self._spill.write(data)
        self._entries[name] = (st_dtype(tensor.dtype), tuple(tensor.shape), self.nbytes, len(data))
        self.hashes[name] = bytes_checksum([bytes(data)] if len(data) < _CHUNK else _chunks(data))
        self.nbytes += len(data)

    def close(self) -> None:
        """Write the final file and remove the spill file."""
        self._spill.close()
        order = _storage_order({k: v[0] for k, v in self._entries.items()})
        header = _header_dict([(k, *self._entries[k][:2], self._entries[k][3]) for k in order], self.metadata)
        with atomic_file(self.path) as out, open(self._spill_path, "rb") as spill:
            write_shard(out, header, ((name, _spilled(spill, *self._entries[name][2:])) for name in order))
        self._spill_path.unlink()

    def abort(self) -> None:
        """Drop everything written so far."""
        self._spill.close()
        self._spill_path.unlink(missing_ok=True)


def _spilled(spill: BinaryIO, offset: int, n: int) -> Iterator[bytes]:
    """``n`` bytes of the spill file from ``offset``, in chunks."""
    spill.seek(offset)
    while n:
        block = spill.read(min(_CHUNK, n))
        n -= len(block)
        yield block


def _storage_order(dtypes: dict[str, str]) -> list[str]:
    """Widest dtypes first, then by name: every tensor's data stays aligned to its item size."""
    return sorted(dtypes, key=lambda k: (-_align(dtypes[k]), k))


def _header_dict(entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]) -> dict:
    """The safetensors header for ``(name, dtype, shape, nbytes)`` in storage order (data back to back)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, n in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    return header


def write_planned_shard(path: Path, tensors: list[TensorInfo], metadata: dict[str, str] | None = None,
                        hashed: set[str] | None = None) -> dict[str, int]:
    """Write a safetensors file of ``tensors`` (stored elsewhere) in one pass: header first, then their bytes.

    Unlike :class:`ShardWriter`, nothing is staged in a spill file, since every size is known up
    front. Returns the :func:`bytes_checksum` of every tensor in ``hashed`` (default: all) as
    written; the header carries every tensor's xxh3 checksum. The file appears under ``path`` only
    once complete (written to ``<path>.tmp``, synced, renamed).
    """
    by_name = {t.name: t for t in tensors}
    if len(by_name) != len(tensors):
        raise ValueError(f"duplicate tensor names in {Path(path).name}")
    order = _storage_order({t.name: t.dtype for t in tensors})
    header = _header_dict([(k, by_name[k].dtype, by_name[k].shape, by_name[k].nbytes) for k in order],
                          {"format": "pt", **(metadata or {})})
    hashes: dict[str, int] = {}
    segments = ((name, _hashed(iter_bytes(by_name[name]), hashes, name) if hashed is None or name in hashed
                 else iter_bytes(by_name[name])) for name in order)
    with atomic_file(Path(path)) as out:
        write_shard(out, header, segments)
    return hashes


def write_tensor_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
                      ) -> dict[str, int]:
    """Write in-memory ``tensors`` as one safetensors file in one pass; return each one's :func:`bytes_checksum`.

    Like :func:`write_planned_shard`, the file appears under ``path`` only once complete, with the
    xxh3 checksum of every tensor in its header.
    """
    data = {name: tensor_bytes(t) for name, t in tensors.items()}
    order = _storage_order({name: st_dtype(t.dtype) for name, t in tensors.items()})
    header = _header_dict([(k, st_dtype(tensors[k].dtype), tuple(tensors[k].shape), len(data[k])) for k in order],
                          {"format": "pt", **(metadata or {})})
    hashes: dict[str, int] = {}
    with atomic_file(Path(path)) as out:
        write_shard(out, header, ((name, _hashed(_chunks(data[name]), hashes, name)) for name in order))
    return hashes


def _hashed(blocks: Iterator[bytes], hashes: dict[str, int], name: str) -> Iterator[bytes]:
    """Pass ``blocks`` through, then record their :func:`bytes_checksum` as ``hashes[name]`` (one read)."""
    h = hashlib.blake2b(digest_size=8)
    for block in blocks:
        h.update(block)
        yield block
    hashes[name] = int.from_bytes(h.digest(), "little", signed=True)


def _chunks(data: memoryview) -> Iterator[bytes]:
    for i in range(0, len(data), _CHUNK):
        yield data[i : i + _CHUNK]


def load_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor from its file (a private copy, not an mmap view)."""
    torch_name = info.torch_dtype_name
    dtype = getattr(torch, torch_name, None)
    if dtype is None:
        raise TpdeFormatError(str(info.file), f"tensor {info.name!r} has unsupported dtype {info.dtype}")
    buf = bytearray(info.nbytes)
    with open(info.file, "rb") as f:
        f.seek(info.begin)
        if f.readinto(buf) != info.nbytes:
            raise TpdeFormatError(str(info.file), f"unexpected end of file inside {info.name!r}")
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(info.shape)


def verify_file_copies(path: Path, sources: dict[str, TensorInfo]) -> list[str]:
    """Re-read a closed file and return the names whose bytes differ from their ``sources`` (or are missing).

    A byte comparison, not a hash: it proves the copy as well and costs a fraction of hashing.
    """
    header = read_header(path)
    bad = [name for name in sources if name not in header]
    for name, info in header.items():
        src = sources.get(name)
        if src is None:
            continue
        if src.nbytes != info.nbytes or any(a != b for a, b in zip(iter_bytes(info), iter_bytes(src), strict=True)):
            bad.append(name)
    return bad


def verify_file_hashes(path: Path, expected: dict[str, int]) -> list[str]:
    """Re-read a closed file and return the names whose bytes differ from ``expected`` (or are missing)."""
    header = read_header(path)
    bad = [name for name in expected if name not in header]
    for name, info in header.items():
        if name in expected and bytes_checksum(iter_bytes(info)) != expected[name]:
            bad.append(name)
    return bad

