"""Where the tensors are inside a checkpoint's files, so that a file can be rebuilt byte for byte.

A file is split into its *skeleton* (every byte that is not tensor data: a safetensors header, a
``torch.save`` archive's pickle and zip records, a JSON file) and *ranges*, each the raw bytes of one
tensor with its name, dtype and shape. The skeleton is stored with zstd, the ranges with the
checkpoint codec; restoring splices them back, and the whole file's xxh3 hash must match.

* ``*.safetensors``: the header gives every tensor's byte range.
* ``torch.save`` zip archives (``optimizer.pt``, ...): each ``<archive>/data/<key>`` record is one
  storage; a restricted unpickler of ``data.pkl`` (it builds nothing, it only records which state
  entry uses which storage) names them, e.g. ``state/3/exp_avg``. Anything it does not understand
  leaves the storage unnamed (``<file>#<key>``), still coded exactly, without the optimizer model.
* anything else: skeleton only.

Example::

    ranges = tensor_ranges("ckpt/optimizer.pt")   # [Range(name="state/0/exp_avg", offset=..., ...), ...]
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_STORAGE_DTYPES = {"FloatStorage": torch.float32, "BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16}


@dataclass(frozen=True)
class Range:
    """One tensor's bytes in a file: ``offset``/``nbytes`` in the file, its ``name``, dtype and shape."""

    name: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def tensor_ranges(path: str | Path) -> list[Range]:
    """The float tensors of ``path`` that the delta codec can code (fp32/bf16/fp16), in file order."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return _safetensors_ranges(path)
    if zipfile.is_zipfile(path):
        return _torch_zip_ranges(path)
    return []


def _safetensors_ranges(path: Path) -> list[Range]:
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(hlen))
    base = 8 + hlen
    out = []
    for name, info in header.items():
        if name == "__metadata__" or info.get("dtype") not in _ST_DTYPES:
            continue
        a, b = info["data_offsets"]
        out.append(Range(name, base + a, b - a, _ST_DTYPES[info["dtype"]], tuple(info["shape"])))
    return sorted(out, key=lambda r: r.offset)


class _StorageRef:
    def __init__(self, key: str, dtype: torch.dtype | None, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    def __init__(self, storage: Any, offset: int, size: Any):
        self.storage, self.offset, self.size = storage, offset, tuple(size) if isinstance(size, tuple) else ()


class _Opaque:
    """Stands for any object the probe does not build."""

    def __init__(self, *a: Any, **k: Any):
        pass

    def __call__(self, *a: Any, **k: Any) -> _Opaque:
        return _Opaque()

    def __setstate__(self, state: Any) -> None:
        pass


class _Probe(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, *a: _TensorRef(storage, offset, size)
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name.endswith("Storage"):
            return name
        return _Opaque

    refs: dict[str, _StorageRef]

    def persistent_load(self, pid: Any) -> _StorageRef:
        _, storage_type, key, _, numel = pid
        dtype = _STORAGE_DTYPES.get(storage_type) if isinstance(storage_type, str) else None
        ref = _StorageRef(str(key), dtype, int(numel))
        self.refs[ref.key] = ref
        return ref


def _walk(obj: Any, prefix: str, found: dict[str, str]) -> None:
    if isinstance(obj, _TensorRef):
        st = obj.storage
        if isinstance(st, _StorageRef) and st.key not in found and obj.offset == 0:
            found[st.key] = prefix
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _walk(v, f"{prefix}/{k}" if prefix else str(k), found)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _walk(v, f"{prefix}/{i}" if prefix else str(i), found)


def _torch_zip_ranges(path: Path) -> list[Range]:
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        pkl = next((i for i in infos if i.filename.endswith("/data.pkl")), None)
        if pkl is None:
            return []
        root = pkl.filename[: -len("data.pkl")]
        refs: dict[str, _StorageRef] = {}
        names: dict[str, str] = {}
        try:
            probe = _Probe(z.open(pkl))
            probe.refs = refs
            _walk(probe.load(), "", names)
        except Exception:  # noqa: BLE001 - an unexpected pickle only loses the names, never bytes
            names = {}
    out = []
    with open(path, "rb") as f:
        for info in infos:
            if not info.filename.startswith(root + "data/") or info.compress_type != zipfile.ZIP_STORED:
                continue
            key = info.filename[len(root) + 5:]
            ref = refs.get(key)
            if ref is None or ref.dtype is None:
                continue
            f.seek(info.header_offset)
            head = f.read(30)
            if head[:4] != b"PK\x03\x04":
                continue
            n, m = struct.unpack("<HH", head[26:30])
            start = info.header_offset + 30 + n + m
            itemsize = torch.empty(0, dtype=ref.dtype).element_size()
            if info.file_size != ref.numel * itemsize:
                continue
            out.append(Range(names.get(key, f"#{key}"), start, info.file_size, ref.dtype, (ref.numel,)))
    return sorted(out, key=lambda r: r.offset)
