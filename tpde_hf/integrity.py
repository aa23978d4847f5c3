"""Per-tensor checksums of the stored bytes: a damaged tpde repo never loads silently wrong weights.

Every safetensors shard of a tpde repo carries, in its header's ``__metadata__``:

* ``"tpde.checksum_algo": "xxh3_64"``;
* ``"tpde.checksums"``: compact JSON ``{tensor name: 16 hex digits}``, the xxh3-64 of the tensor's
  dtype, shape and stored bytes (:func:`new_digest`). Hashing dtype and shape as well catches a
  damaged header that still describes a consistent tensor.

Each shard is self-contained (a Hub download needs no extra file), and ``config.json`` records
``quantization_config.integrity = "xxh3_64"`` so that a load knows the checksums must be there.

Why xxh3 and the stored bytes: it hashes at memory speed (about 30 GB/s in memory, 9 to 17 GB/s
from the page cache on the 2-core benchmark machine), so checking every byte before transformers
reads it costs about 1% of a CPU load (``benchmarks/bench_integrity.py``), and it needs no decode.
A decode of the delta (``verify=True``, ``tpde verify``) proves more and costs far more. The check
runs before the load, so a model larger than the free RAM is read from disk twice.

* :func:`check_checkpoint`: the load-time check (called by the quantizer before any weight is read);
* :func:`write_shard`: write a shard whose header carries the checksums of the data written after it
  (one pass: the header is written with placeholder digests and patched once the data is through);
* :func:`add_checksums`: rewrite an existing shard's header with the checksums of its bytes
  (``tpde verify --write-checksums``, ``save_pretrained`` of a loaded tpde model).

Example::

    add_checksums("repo/model.safetensors")          # now carries tpde.checksums
    check_checkpoint(["repo/model.safetensors"], integrity="xxh3_64")   # raises if a byte changed
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import xxhash

from tpde_hf.codec import SUFFIXES
from tpde_hf.codec.registry import STORAGE_TOKEN
from tpde_hf.errors import TpdeFormatError
from tpde_hf.files import atomic_file

ALGO = "xxh3_64"
META_ALGO = "tpde.checksum_algo"
META_CHECKSUMS = "tpde.checksums"
#: The ``quantization_config`` field that says every shard must carry checksums.
CONFIG_FIELD = "integrity"
#: Item size of every safetensors dtype (the header's spelling).
ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}
_PLACEHOLDER = "0" * 16  # an xxh3-64 hex digest always has 16 digits, so patching keeps the header length
_STORAGE_PART = re.compile(rf"^(?P<stem>.+\.{STORAGE_TOKEN}\.[a-z0-9][a-z0-9-]*)\.(?P<part>[A-Za-z0-9_]+)$")
_MAX_HEADER = 100 * 1024 * 1024  # the limit safetensors itself enforces
_CHUNK = 16 * 1024 * 1024
_SAFE_WEIGHTS_NAME = "model.safetensors"
_SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

logger = logging.getLogger(__name__)
_NOTIFIED: set[str] = set()  # folders told once per process that they lack checksums


# ==================================================================== the digest
def new_digest(dtype: str, shape: Sequence[int]) -> xxhash.xxh3_64:
    """An xxh3-64 hasher primed with a tensor's dtype (safetensors spelling) and shape; feed it the bytes.

    Example::

        h = new_digest("BF16", (2, 3)); h.update(raw); h.hexdigest()
    """
    h = xxhash.xxh3_64()
    h.update(f"{dtype}:{','.join(str(int(s)) for s in shape)}:".encode())
    return h


def digest_of(dtype: str, shape: Sequence[int], blocks: Iterable[bytes | memoryview]) -> str:
    """The stored checksum (16 hex digits) of a tensor given as byte blocks."""
    h = new_digest(dtype, shape)
    for b in blocks:
        h.update(b)
    return h.hexdigest()


def checksum_metadata(digests: dict[str, str]) -> dict[str, str]:
    """The two ``__metadata__`` entries that carry ``digests`` (names sorted: the same shard, the same header)."""
    return {META_ALGO: ALGO, META_CHECKSUMS: json.dumps(dict(sorted(digests.items())), separators=(",", ":"))}


# ==================================================================== headers
@dataclass(frozen=True)
class StoredTensor:
    """One tensor's header entry; ``begin``/``end`` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class ShardHeader:
    """A parsed safetensors header: the raw JSON object, its tensors and its ``__metadata__``."""

    path: str
    data_start: int
    size: int
    raw: dict[str, Any]
    tensors: dict[str, StoredTensor]
    metadata: dict[str, str]

    def checksums(self) -> dict[str, str] | None:
        """The stored digests, or ``None`` when the shard has none (written by an earlier tpde-hf).

        Raises :class:`TpdeFormatError` naming the file when they are present but unreadable or of an
        unknown algorithm.
        """
        algo, blob = self.metadata.get(META_ALGO), self.metadata.get(META_CHECKSUMS)
        if algo is None and blob is None:
            return None
        if algo != ALGO:
            raise TpdeFormatError(self.path, f"shard checksums use algorithm {algo!r}, which this tpde-hf does not "
                                             f"know ({ALGO!r}); the header is damaged, or upgrade tpde-hf")
        try:
            sums = json.loads(blob) if isinstance(blob, str) else None
        except ValueError:
            sums = None
        if not isinstance(sums, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and len(v) == 16 for k, v in sums.items()):
            raise TpdeFormatError(self.path, f"the {META_CHECKSUMS!r} entry of the header is damaged")
        return sums


def read_shard_header(path: str | os.PathLike) -> ShardHeader:
    """Parse one safetensors header (no tensor data read); every entry must lie inside the file.

    Raises :class:`TpdeFormatError` naming ``path`` for anything malformed or truncated.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise TpdeFormatError(path, "not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise TpdeFormatError(path, f"corrupt safetensors header: length {n} exceeds the file ({size} B)")
            raw = json.loads(fh.read(n).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, TpdeFormatError):
            raise
        raise TpdeFormatError(path, f"corrupt safetensors header ({exc})") from None
    if not isinstance(raw, dict):
        raise TpdeFormatError(path, "corrupt safetensors header (not a JSON object)")
    metadata = raw.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise TpdeFormatError(path, "corrupt safetensors header (__metadata__ is not a string map)")
    data_start = 8 + n
    tensors: dict[str, StoredTensor] = {}
    for name, e in raw.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = str(e["dtype"]), tuple(int(s) for s in e["shape"])
            begin, end = (int(v) for v in e["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise TpdeFormatError(path, f"corrupt safetensors header: bad entry for {name!r}") from None
        numel = 1
        for s in shape:
            numel *= s
        item = ITEMSIZE.get(dtype)
        if (min(shape, default=0) < 0 or not 0 <= begin <= end or data_start + end > size
                or (item is not None and end - begin != numel * item)):
            raise TpdeFormatError(path, f"corrupt or truncated safetensors header: entry {name!r} does not fit")
        tensors[name] = StoredTensor(name, dtype, shape, data_start + begin, data_start + end)
    return ShardHeader(path, data_start, size, raw, tensors, metadata)


#: numpy dtypes of the safetensors dtypes numpy has (a view through numpy is one torch call: a GIL round trip less)
_NUMPY_DTYPES = {"U8": "u1", "I8": "i1", "I16": "<i2", "I32": "<i4", "I64": "<i8", "F16": "<f2", "F32": "<f4",
                 "F64": "<f8", "BOOL": "?"}


class MappedShard:
    """A safetensors file's tensors as views of one copy-on-write memory map: no copy, nothing read until a
    tensor is used (a compiled decoder then touches it without the GIL). The header is
    :func:`read_shard_header`'s, so every entry was checked to lie inside the file.

    Example::

        shard = MappedShard("model.safetensors")   # TpdeFormatError for a malformed or truncated header
        t = shard.view("lm_head.weight")           # None: read it another way (unknown dtype, unaligned)
    """

    def __init__(self, path: str | os.PathLike):
        import torch

        self._torch = torch
        self.header = read_shard_header(path)
        with open(self.header.path, "rb") as fh:  # writable for torch, never written back
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if self.header.size else None

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    def view(self, name: str) -> Any:
        """Tensor ``name`` (a torch tensor viewing the map), or None when it cannot be a view: a dtype torch lacks,
        or data not aligned to its item size."""
        from tpde_hf.format import SAFETENSORS_DTYPES

        torch = self._torch
        t = self.header.tensors.get(name)
        dtype = getattr(torch, SAFETENSORS_DTYPES.get(t.dtype, ""), None) if t is not None else None
        if not isinstance(dtype, torch.dtype) or t.begin % dtype.itemsize:
            return None
        n = (t.end - t.begin) // dtype.itemsize
        if n == 0:
            return torch.empty(t.shape, dtype=dtype)
        np_dtype = _NUMPY_DTYPES.get(t.dtype)
        if np_dtype is not None:
            import numpy as np

            return torch.from_numpy(np.frombuffer(self._map, dtype=np_dtype, count=n, offset=t.begin).reshape(t.shape))
        return torch.frombuffer(self._map, dtype=dtype, count=n, offset=t.begin).view(t.shape)


def encode_header(header: dict[str, Any]) -> bytes:
    """The 8-byte length and the JSON of a safetensors header, padded so that the data starts 8-byte aligned."""
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 8)
    return struct.pack("<Q", len(blob)) + blob


# ==================================================================== writing
def write_shard(out: BinaryIO, header: dict[str, Any], segments: Iterable[tuple[str | None, Iterable[bytes]]]
                ) -> dict[str, str]:
    """Write a safetensors file whose ``__metadata__`` carries the checksums of the bytes written; return them.

    ``header`` is the whole header (tensor entries with their relative ``data_offsets``, and any
    ``__metadata__``); ``segments`` gives the data region in file order: ``(tensor name, blocks)``,
    or ``(None, blocks)`` for bytes that belong to no tensor (copied unhashed). The header goes out
    first with placeholder digests and is patched in place once every block is through, so the data
    is read once. ``out`` must be seekable and positioned at the start of the file.

    Example::

        with open(path, "wb") as f:
            write_shard(f, {"x": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]}}, [("x", [b"abc"])])
    """
    names = [k for k in header if k != "__metadata__"]
    meta = {**(header.get("__metadata__") or {})}
    final = dict(header)

    def blob(digests: dict[str, str]) -> bytes:
        final["__metadata__"] = {**meta, **checksum_metadata(digests)}
        return encode_header(final)

    start = out.tell()
    first = blob(dict.fromkeys(names, _PLACEHOLDER))
    out.write(first)
    digests: dict[str, str] = {}
    for name, blocks in segments:
        if name is None:
            for b in blocks:
                out.write(b)
            continue
        e = header[name]
        h = new_digest(e["dtype"], e["shape"])
        for b in blocks:
            out.write(b)
            h.update(b)
        digests[name] = h.hexdigest()
    if set(digests) != set(names):
        raise ValueError(f"write_shard: data for {sorted(set(names) ^ set(digests))[:5]} missing or unexpected")
    patched = blob(digests)
    if len(patched) != len(first):  # cannot happen: digests have a fixed width
        raise AssertionError("checksum header changed length")
    end = out.tell()
    out.seek(start)
    out.write(patched)
    out.seek(end)
    return digests


def add_checksums(path: str | os.PathLike) -> dict[str, str]:
    """Rewrite a shard so that its header carries the checksums of its current bytes; return them.

    The data bytes are streamed unchanged (bounded memory) into ``<path>.tmp`` in the same folder,
    which is synced and renamed over ``path``: an interruption leaves the old file intact. Call it
    only on bytes known to be right (``tpde verify`` first, or a file just written).

    Example::

        add_checksums("repo/model.safetensors")
    """
    path = os.fspath(path)
    head = read_shard_header(path)
    order = sorted(head.tensors.values(), key=lambda t: (t.begin, t.end))
    with open(path, "rb") as src, atomic_file(path) as out:
        return write_shard(out, head.raw, _file_segments(src, order, head.data_start, head.size))


def _file_segments(src: BinaryIO, order: list[StoredTensor], data_start: int, size: int
                   ) -> Iterator[tuple[str | None, Iterator[bytes]]]:
    """The data region of ``src`` as ``write_shard`` segments: every tensor, and any gap between them."""
    pos = data_start
    for t in order:
        if t.begin < pos:
            raise TpdeFormatError(src.name, f"tensors overlap at {t.name!r}; the header is damaged")
        if t.begin > pos:
            yield None, _read_range(src, pos, t.begin)
        yield t.name, _read_range(src, t.begin, t.end)
        pos = t.end
    if size > pos:
        yield None, _read_range(src, pos, size)


def _read_range(f: BinaryIO, begin: int, end: int) -> Iterator[bytes]:
    f.seek(begin)
    left = end - begin
    while left:
        block = f.read(min(_CHUNK, left))
        if not block:
            raise TpdeFormatError(f.name, "unexpected end of file")
        left -= len(block)
        yield block


def mark_config(folder: str | os.PathLike) -> None:
    """Set ``quantization_config.integrity`` in ``folder/config.json`` (atomically) once the shards have checksums."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get(CONFIG_FIELD) == ALGO:
        return
    qc[CONFIG_FIELD] = ALGO
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def repo_weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a repo folder: from its index, or ``model.safetensors``, or all of them."""
    folder = Path(folder)
    index = folder / _SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise TpdeFormatError(str(index), f"unreadable index ({exc})") from None
        return [folder / n for n in names]
    if (folder / _SAFE_WEIGHTS_NAME).is_file():
        return [folder / _SAFE_WEIGHTS_NAME]
    return sorted(folder.glob("*.safetensors"))


def add_repo_checksums(folder: str | os.PathLike) -> list[Path]:
    """:func:`add_checksums` on every shard of ``folder``, then :func:`mark_config`; returns the shards."""
    files = repo_weight_files(folder)
    for f in files:
        add_checksums(f)
    if (Path(folder) / "config.json").is_file():
        mark_config(folder)
    return files


# ==================================================================== checking
@dataclass
class IntegrityReport:
    """What :func:`check_checkpoint` did: ``checked`` is False for a repo without checksums."""

    checked: bool
    n_tensors: int = 0
    n_skipped: int = 0
    nbytes: int = 0


def hash_stored(head: ShardHeader, names: Iterable[str]) -> dict[str, str]:
    """xxh3 digests of the named tensors of a shard, read through one memory map in bounded chunks."""
    todo = sorted((head.tensors[n] for n in names), key=lambda t: t.begin)
    out: dict[str, str] = {}
    if not todo:
        return out
    with open(head.path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if hasattr(mm, "madvise") and hasattr(mmap, "MADV_SEQUENTIAL"):
            mm.madvise(mmap.MADV_SEQUENTIAL)
        view = memoryview(mm)
        try:
            for t in todo:
                h = new_digest(t.dtype, t.shape)
                for off in range(t.begin, t.end, _CHUNK):
                    h.update(view[off : min(off + _CHUNK, t.end)])
                out[t.name] = h.hexdigest()
        finally:
            view.release()
    return out


def check_shard(head: ShardHeader, sums: dict[str, str], skip: Callable[[str], bool] = lambda name: False) -> int:
    """Compare a shard's bytes with its checksums; return the bytes hashed.

    Every stored tensor must have a checksum and every checksum a tensor (names are checked even for
    ``skip``-ped tensors, whose bytes are not read). Raises :class:`TpdeFormatError` naming the first
    damaged tensor and the file.
    """
    unlisted = sorted(set(head.tensors) - set(sums))
    if unlisted:
        raise TpdeFormatError(unlisted[0], f"is stored in {head.path} but has no checksum there: the header is damaged"
                                           f"{_more(unlisted)}")
    absent = sorted(set(sums) - set(head.tensors))
    if absent:
        raise TpdeFormatError(absent[0], f"has a checksum in {head.path} but no tensor there: the header is damaged"
                                         f"{_more(absent)}")
    names = [n for n in head.tensors if not skip(n)]
    got = hash_stored(head, names)
    bad = sorted(n for n in names if got[n] != sums[n])
    if bad:
        raise TpdeFormatError(bad[0], f"the bytes stored in {head.path} differ from the checksum written with them "
                                      f"({ALGO}): the file is damaged{_more(bad)}. Download it again (e.g. "
                                      "force_download=True) or convert the model again; `tpde verify REPO` lists "
                                      "every damaged tensor.")
    return sum(head.tensors[n].end - head.tensors[n].begin for n in names)


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def check_checkpoint(files: Sequence[str | os.PathLike], *, integrity: str | None = None, enabled: bool = True,
                     skip_suffixes: Sequence[str] = (), skip_storage_delta: bool = False) -> IntegrityReport:
    """The load-time check: every stored byte a load will read matches its shard's checksum.

    ``integrity`` is the repo config's ``quantization_config.integrity`` (``None`` for a repo written
    before checksums). ``skip_suffixes`` (``mode='base'``: the delta parts) names tpde parts whose
    bytes are not read; ``skip_storage_delta`` (also ``mode='base'``) skips the parts of a weight laid out by a
    base storage (``X.tpde_storage.S.<part>``) other than its ``meta`` and ``base_*`` parts. A repo whose
    shards carry no checksum and whose config does not ask for them
    loads unchecked, with a one-line notice per folder and process; a config that asks for them, or
    a shard that has none while another has, is an error (damaged metadata). ``enabled=False``
    (``TpdeConfig(check_integrity=False)``) skips everything.

    Example::

        check_checkpoint(["repo/model.safetensors"], integrity="xxh3_64", skip_suffixes=("delta", "lanes", "tables"))
    """
    if not enabled:
        return IntegrityReport(checked=False)
    heads = [read_shard_header(f) for f in files]
    sums = [h.checksums() for h in heads]
    if all(s is None for s in sums):
        if integrity is not None:
            raise TpdeFormatError(heads[0].path if heads else "config.json",
                                  f"config.json says every shard carries {integrity} checksums, but this shard has "
                                  "none: its header (or the config) is damaged")
        _notify_unchecked(heads)
        return IntegrityReport(checked=False)
    for h, s in zip(heads, sums, strict=True):
        if s is None:
            raise TpdeFormatError(h.path, "has no tpde checksums while the repo's other shards or its config.json have "
                                          "them: its header is damaged")
    names = {n for h in heads for n in h.tensors}

    def skip(name: str) -> bool:  # a delta part of a weight stored in tpde form
        stem, _, suffix = name.rpartition(".")
        if skip_storage_delta and (m := _STORAGE_PART.match(name)) and f"{m['stem']}.meta" in names:
            return not (m["part"] == "meta" or m["part"].startswith("base_"))  # base mode reads meta and base_*
        return suffix in skip_suffixes and all(f"{stem}.{s}" in names for s in SUFFIXES)

    report = IntegrityReport(checked=True)
    for h, s in zip(heads, sums, strict=True):
        report.nbytes += check_shard(h, s, skip)
        n_skip = sum(map(skip, h.tensors))
        report.n_skipped += n_skip
        report.n_tensors += len(h.tensors) - n_skip
    return report


def _notify_unchecked(heads: list[ShardHeader]) -> None:
    """One line per folder and process: this repo predates checksums, and how to add them."""
    folder = os.path.dirname(os.path.abspath(heads[0].path)) if heads else "?"
    if folder in _NOTIFIED:
        return
    _NOTIFIED.add(folder)
    if any(os.path.islink(h.path) for h in heads):  # a Hugging Face cache snapshot: its files are links to blobs
        how = ("download it to a folder (`hf download REPO_ID --local-dir DIR`) and run "
               "`tpde verify --write-checksums DIR`")
    else:
        how = f"add them with `tpde verify --write-checksums {folder}`"
    logger.warning("tpde: %s was written without per-tensor checksums (an earlier tpde-hf), so this load cannot detect "
                   "a damaged file; %s", folder, how)
