"""Writing an entry file: the bytes ``safetensors.torch.save_file`` writes, with the disk writeback started early.

An entry is ~70% of a checkpoint (184 MB for MiniLM with AdamW) and must be on disk (``fsync``) before the
checkpoint's original files are deleted. Written in one go and then synced, the sync waits for all of it
(~0.15 s there, with the training thread waiting at the next save). :func:`write_tensors` writes the same
bytes as ``save_file`` (header, then the parts in safetensors' order) and asks the kernel to start writing
each 32 MiB back to disk as soon as it is written (Linux ``sync_file_range``), so the final ``fsync`` finds
little left. Parts of other dtypes than the entry's (int64, float32, uint8) go through ``save_file``.

Example::

    with open(tmp, "wb") as f:
        write_tensors(f, {"meta": torch.zeros(3, dtype=torch.int64)}, {"tpde-ckpt": "{}"})
        os.fsync(f.fileno())
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
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
