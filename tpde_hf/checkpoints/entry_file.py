"""Writing an entry file: the bytes ``safetensors.torch.save_file`` writes, with the disk writeback started early.

An entry is ~70% of a checkpoint (184 MB for MiniLM with AdamW) and must be on disk (``fsync``) before the
checkpoint's original files are deleted. Written in one go and then synced, the sync waits for all of it
(~0.15 s there, with the training thread waiting at the next save). :func:`write_tensors` writes the same
bytes as ``save_file`` (header, then the parts in safetensors' order) and asks the kernel to start writing
each 32 MiB back to disk as soon as it is written (Linux ``sync_file_range``), so the final ``fsync`` finds
little left. Parts of other dtypes than the entry's (int64, float32, uint8) go through ``save_file``.
:func:`write_checked_file` writes the same bytes in pieces that several threads share, each piece compared with
the bytes meant (through a memory map of the file) while the next one is written: the pack's checked write.

Example::

    with open(tmp, "wb") as f:
        write_tensors(f, {"meta": torch.zeros(3, dtype=torch.int64)}, {"tpde-ckpt": "{}"})
        os.fsync(f.fileno())
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os
import struct
import sys
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors.torch import save

#: safetensors' order of the entry's dtypes (descending dtype, then name) and their names in the header
_ORDER = {torch.int64: (0, "I64"), torch.float32: (1, "F32"), torch.uint8: (2, "U8")}
_STEP = 32 << 20  # bytes written between writeback requests
#: safetensors' dtype names of every dtype a checked part may have
_DTYPE_NAMES = {torch.int64: "I64", torch.float32: "F32", torch.uint8: "U8", torch.int32: "I32", torch.int16: "I16",
                torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64", torch.int8: "I8",
                torch.bool: "BOOL"}
_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):  # not Linux/glibc: the final fsync does all of it
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SFR = _sync_file_range()


def header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, list[str]]:
    """The safetensors header (length prefix included) and the parts in file order."""
    names = sorted(tensors, key=lambda k: (_ORDER[tensors[k].dtype][0], k))
    head: dict[str, Any] = {"__metadata__": metadata}
    off = 0
    for k in names:
        t = tensors[k]
        nb = t.numel() * t.element_size()
        head[k] = {"dtype": _ORDER[t.dtype][1], "shape": list(t.shape), "data_offsets": [off, off + nb]}
        off += nb
    hb = json.dumps(head, ensure_ascii=False, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb, names


def write_tensors(f: BinaryIO, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` and ``metadata`` to the open file ``f`` as ``save_file`` would (same bytes), starting
    the disk writeback of each 32 MiB as it is written. The caller syncs and closes ``f``."""
    if sys.byteorder != "little" or any(t.dtype not in _ORDER for t in tensors.values()):
        f.write(save(tensors, metadata=metadata))
        return
    head, names = header(tensors, metadata)
    f.write(head)
    done = flushed = len(head)
    fd = f.fileno()
    for k in names:
        t = tensors[k].detach().contiguous()
        if t.numel():
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # little-endian, as safetensors stores
            done += t.numel() * t.element_size()
        if _SFR is not None and done - flushed >= _STEP:
            f.flush()
            _SFR(fd, flushed, done - flushed, _SYNC_FILE_RANGE_WRITE)  # a hint: its result does not matter
            flushed = done


_PIECE = 8 << 20  # bytes per job of write_checked_file: written, then compared while another thread writes the next


def _pwrite_all(fd: int, view: np.ndarray, offset: int) -> None:
    """Every byte of ``view`` at ``offset`` of ``fd`` (``os.pwrite`` may write less than asked)."""
    mv = memoryview(view).cast("B")
    done = 0
    while done < len(mv):
        n = os.pwrite(fd, mv[done:], offset + done)
        if n <= 0:
            raise OSError(f"pwrite wrote nothing at offset {offset + done}")
        done += n


def _pieces(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[list[list[tuple]], int]:
    """:func:`write_tensors`' bytes as jobs of ``(part, file offset, uint8 view)`` pieces of about :data:`_PIECE`
    bytes in file order (the header first), and the file's size."""
    head, names = header(tensors, metadata)
    pieces = [("header", 0, np.frombuffer(head, np.uint8))]
    off = len(head)
    for k in names:
        flat = tensors[k].detach().contiguous().reshape(-1).view(torch.uint8).numpy()  # little-endian, as stored
        pieces += [(k, off + a, flat[a:a + _PIECE]) for a in range(0, flat.size, _PIECE)]
        off += flat.size
    jobs: list[list[tuple]] = [[]]
    size = 0
    for piece in pieces:
        if size >= _PIECE:
            jobs.append([])
            size = 0
        jobs[-1].append(piece)
        size += piece[2].size
    return jobs, off


def write_checked_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                       runner: Any = None, sync: bool = True) -> str | None:
    """Write a new file at ``path`` with :func:`write_tensors`' bytes and compare each piece with what was meant
    right after writing it, through a memory map of the file: ``None``, or what differs (:func:`check_file`'s
    check, the header compared byte for byte). ``runner(fn, items)`` maps the pieces (about 8 MiB each, in file
    order): one thread compares a piece while another writes the next (the kernel takes writes to one file one
    at a time, so a write, then a check, is a serial phase twice as long). The file is sized first, so the pieces
    may land in any order; each piece's disk writeback starts when it is written. Then ``fsync`` (``sync``).

    Example::

        assert write_checked_file(tmp, {"meta": torch.zeros(3, dtype=torch.int64)}, {"tpde-ckpt": "{}"}) is None
    """
    if sys.byteorder != "little" or any(t.dtype not in _ORDER for t in tensors.values()):
        with open(path, "wb") as f:
            f.write(save(tensors, metadata=metadata))
            f.flush()
            if sync:
                os.fsync(f.fileno())
        return check_file(path, tensors, runner)
    jobs, total = _pieces(tensors, metadata)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)  # the mode of store.write_entry's mkstemp
    try:
        os.ftruncate(fd, total)
        data = np.frombuffer(mmap.mmap(fd, total, access=mmap.ACCESS_READ), np.uint8)

        def write_and_compare(batch: list[tuple]) -> str | None:
            for _, off, view in batch:
                _pwrite_all(fd, view, off)
            lo, hi = batch[0][1], batch[-1][1] + batch[-1][2].size
            if _SFR is not None:
                _SFR(fd, lo, hi - lo, _SYNC_FILE_RANGE_WRITE)  # a hint: its result does not matter
            for k, off, view in batch:
                if not np.array_equal(data[off:off + view.size], view):
                    return "the header on disk differs from the one written" if k == "header" \
                        else f"part {k} on disk differs from the one written"
            return None

        bad = [r for r in (runner(write_and_compare, jobs) if runner is not None else map(write_and_compare, jobs))
               if r]
        if sync:
            os.fsync(fd)
        if not bad and os.fstat(fd).st_size != total:
            bad = ["the file on disk is not as long as written"]
    finally:
        os.close(fd)
    return bad[0] if bad else None


def check_file(path: str | Path, tensors: dict[str, torch.Tensor], runner: Any = None) -> str | None:
    """Compare the safetensors file at ``path`` with ``tensors`` byte for byte, reading it through a memory map
    (no copies); ``None`` if every part is there with its dtype, shape and bytes, else what differs.
    ``runner(fn, items)`` maps the comparisons (several threads may share them).

    Example::

        assert check_file(tmp, tensors) is None
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            return "shorter than a safetensors header"
        (hlen,) = struct.unpack("<Q", f.read(8))
        if 8 + hlen > size:
            return "header longer than the file"
        try:
            head = json.loads(f.read(hlen))
        except ValueError as exc:
            return f"unreadable header ({exc})"
        data = np.memmap(f, np.uint8, "r", offset=8 + hlen, shape=(size - 8 - hlen,)) if size > 8 + hlen \
            else np.zeros(0, np.uint8)
    head.pop("__metadata__", None)
    if set(head) != set(tensors):
        return "the parts on disk are not the parts written"
    names = {v: k for k, v in _DTYPE_NAMES.items()}
    jobs, batch, size_in = [], [], 0
    for k in sorted(tensors, key=lambda k: -tensors[k].numel() * tensors[k].element_size()):
        t, rec = tensors[k], head[k]
        if names.get(rec.get("dtype")) != t.dtype or list(rec.get("shape", ())) != list(t.shape):
            return f"part {k} has another dtype or shape on disk"
        batch.append(k)
        size_in += t.numel() * t.element_size()
        if size_in >= _STEP // 2:
            jobs.append(batch)
            batch, size_in = [], 0
    if batch:
        jobs.append(batch)

    def compare(keys: list[str]) -> str | None:
        for k in keys:
            a, b = head[k]["data_offsets"]
            want = tensors[k].detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            if b - a != want.size or b > data.size or not np.array_equal(data[a:b], want):
                return f"part {k} on disk differs from the one written"
        return None

    bad = [r for r in (runner(compare, jobs) if runner is not None else map(compare, jobs)) if r]
    return bad[0] if bad else None
