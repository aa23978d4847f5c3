"""Checkpoint entries on disk: one file per checkpoint, a chain of deltas back to a keyframe.

Layout beside Trainer's ``checkpoint-N`` folders (``sort_checkpoints`` only globs ``checkpoint-*``,
so Trainer's rotation never touches the store)::

    out/.tpde-checkpoints/checkpoint-40.tpde    # safetensors: coded tensors + zstd skeletons + manifest
    out/checkpoint-40/tpde_checkpoint.json      # pointer: which entry, which files it stands for

An entry codes every tensor of the checkpoint's files against the same tensor of its *parent* entry
(the previous checkpoint) with the ``ckpt-delta`` codec, and every file's skeleton (the bytes that
are not tensor data: headers, pickles, JSON, small tensors) with zstd using the parent's skeleton as
a dictionary. A keyframe has no parent. Restoring rebuilds each file byte for byte and checks its
xxh3 hash before it is moved into place.

Every write is a temporary file then ``os.replace``; an entry's pointer is written only after the
entry is on disk (and, by default, checked), and the original files are deleted
only after that. A crash at any point leaves either the original files or a complete entry.

Example::

    entry = encode_entry("out/checkpoint-40", parent=previous)    # previous: a Decoded or None
    decoded = decode_chain(store_root, "checkpoint-40")
"""

from __future__ import annotations

import json
import mmap
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash
import zstandard
from safetensors import SafetensorError, safe_open

from tpde_hf.checkpoints import predict
from tpde_hf.checkpoints.codec import CheckpointDelta
from tpde_hf.checkpoints.entry_file import write_checked_file, write_tensors
from tpde_hf.checkpoints.layout import tensor_ranges
from tpde_hf.codec.registry import TENSOR_CODECS, CodecContext, stored_parts
from tpde_hf.errors import TpdeFormatError
from tpde_hf.files import atomic_file

STORE_DIRNAME = ".tpde-checkpoints"
POINTER = "tpde_checkpoint.json"
FORMAT = "tpde-ckpt"
VERSION = 1  # a forward entry: its parent is an earlier checkpoint's entry
#: A backward entry: its parent is the next *later* checkpoint, an entry or a held raw folder (``<name>.raw``,
#: hard links of the files Trainer wrote) which the resume reads as is.
BACKWARD_VERSION = 2
VERSIONS = (VERSION, BACKWARD_VERSION)
RAW_SUFFIX = ".raw"
CODEC = CheckpointDelta.name
MIN_CODED = 4096  # tensors with fewer elements stay in the skeleton
KEEP_FILE = 1 << 20  # files smaller than this (and without coded tensors) stay in the folder too
_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}
_INT = {torch.float32: np.int32, torch.bfloat16: np.int16, torch.float16: np.int16}
_INT_T = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@dataclass
class Decoded:
    """One checkpoint in memory: coded tensors by key and file skeletons by file name."""

    name: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    skeletons: dict[str, bytes] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)


def file_hash(data: bytes | memoryview) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def atomic_write(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    with atomic_file(path) as f:
        f.write(data)


def read_checkpoint(ckpt_dir: str | Path, name: str | None = None, hash_files: bool = True,
                    runner: Any = None) -> Decoded:
    """Split every file of ``ckpt_dir`` into coded tensors and a skeleton (see the module docstring);
    ``name``: the checkpoint's name if it is not the folder's (a held raw folder). ``hash_files`` False (a
    checkpoint read only as the reference of a later decode): the manifest's ``xxh3`` fields are None and the
    files are memory-mapped copy-on-write instead of read (their tensors are views of the maps).
    ``runner(fn, items)``: a map for the reads (pieces of :data:`READ_STEP` bytes) and the files' splits and
    hashes, which other threads may share (the pack's :class:`~tpde_hf.checkpoints.assist.Assist`: the training
    thread waiting at a save reads beside the packing thread)."""
    ckpt_dir = Path(ckpt_dir)
    dec = Decoded(name or ckpt_dir.name)
    paths = sorted(p for p in ckpt_dir.iterdir() if p.is_file() and p.name != POINTER and not p.name.startswith("."))
    run = runner if runner is not None else (lambda fn, items: list(map(fn, items)))
    # one writable buffer per file, the tensors views of it: read into memory, or (a reference only) mapped
    datas = _read_arrays(paths, run) if hash_files else [_map_array(p) for p in paths]
    files = []
    for (tensors, skel, rec) in run(lambda job: _split_file(*job, hash_files), list(zip(paths, datas, strict=True))):
        for key, t in tensors.items():
            dec.tensors.setdefault(key, t)
        dec.skeletons[rec["name"]] = skel
        files.append(rec)
    dec.manifest = {"files": files}
    return dec


def _split_file(path: Path, data: np.ndarray, hash_files: bool) -> tuple[dict[str, torch.Tensor], bytes, dict]:
    """One file's coded tensors (views of ``data``), skeleton and manifest record."""
    ranges = [r for r in tensor_ranges(path) if r.nbytes // max(1, _itemsize(r.dtype)) >= MIN_CODED]
    tensors: dict[str, torch.Tensor] = {}
    skel, pos, rec = bytearray(), 0, []
    for r in ranges:
        key = f"{path.name}:{r.name}"
        if key in tensors or r.offset < pos:
            continue  # a storage seen twice or overlapping ranges: leave it in the skeleton
        skel += memoryview(data[pos:r.offset])
        arr = data[r.offset:r.offset + r.nbytes].view(_INT[r.dtype])
        if r.offset % _itemsize(r.dtype):
            arr = arr.copy()  # unaligned: the kernels want aligned arrays
        tensors[key] = torch.from_numpy(arr).view(r.dtype)
        rec.append([key, r.offset, r.nbytes, _DTYPE_NAMES[r.dtype]])
        pos = r.offset + r.nbytes
    skel += memoryview(data[pos:])
    return tensors, bytes(skel), {"name": path.name, "size": len(data),
                                  "xxh3": file_hash(data) if hash_files else None, "ranges": rec}


READ_STEP = 16 << 20  # bytes per piece of a file read (pieces may be read on several threads)


def _read_arrays(paths: Sequence[Path], run: Any) -> list[np.ndarray]:
    """The bytes of each file as a writable uint8 array, read in pieces of :data:`READ_STEP` mapped with ``run``."""
    bufs = [np.empty(p.stat().st_size, np.uint8) for p in paths]
    pieces = [(p, b, off) for p, b in zip(paths, bufs, strict=True) for off in range(0, b.size, READ_STEP)]
    pieces.sort(key=lambda j: -min(READ_STEP, j[1].size - j[2]))  # largest first: the threads end together
    run(_read_piece, pieces)
    return bufs


def _read_piece(job: tuple[Path, np.ndarray, int]) -> None:
    """Bytes ``[off, off + READ_STEP)`` of the file into the same range of ``buf`` (a file shorter than when its
    size was taken: :class:`TpdeFormatError` naming it)."""
    path, buf, off = job
    view = memoryview(buf)[off:off + READ_STEP]
    with open(path, "rb", buffering=0) as f:
        f.seek(off)
        got = 0
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                raise TpdeFormatError(str(path), f"changed while being read ({off + got} of {buf.size} bytes)")
            got += n


def _map_array(path: Path) -> np.ndarray:
    """The bytes of ``path`` as a copy-on-write memory map (pages come from the page cache, nothing copied;
    writes stay private). Empty files are read instead (an empty file cannot be mapped)."""
    size = path.stat().st_size
    if not size:
        return np.zeros(0, np.uint8)
    with open(path, "rb") as f:
        return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), np.uint8)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _skeleton_dict(parent_skeletons: Mapping[str, bytes] | None, name: str) -> zstandard.ZstdCompressionDict | None:
    """The zstd dictionary of file ``name``'s skeleton: the parent's skeleton of the same file (None: none)."""
    d = parent_skeletons.get(name) if parent_skeletons is not None else None
    return zstandard.ZstdCompressionDict(d, dict_type=zstandard.DICT_TYPE_RAWCONTENT) if d else None


SAME_FAST_MIN = 1 << 16  # skeletons at least this long, equal to the parent's, try zstd -3 first


def compress_skeleton(data: bytes, parent_skeletons: Mapping[str, bytes] | None, name: str) -> bytes:
    """File ``name``'s skeleton as stored: zstd -10 with the parent's skeleton of that file as dictionary.

    A skeleton equal to the parent's (a tokenizer, a config: most files of a run never change) is one match of
    the whole dictionary: zstd -3 finds it in a tenth of the time (tokenizer.json, 711 KB: 3 ms against 28 ms,
    82 bytes either way). Where -3 misses it (its smaller match tables lose the positions of a large,
    random-looking dictionary), -10 is used as before."""
    d = _skeleton_dict(parent_skeletons, name)
    if d is not None and len(data) >= SAME_FAST_MIN and data == parent_skeletons[name]:  # type: ignore[index]
        blob = zstandard.ZstdCompressor(level=3, dict_data=d).compress(data)
        if len(blob) <= 64 + len(data) // 4096:
            return blob
    return zstandard.ZstdCompressor(level=10, dict_data=d).compress(data)


def skeleton_bytes(blob: bytes, parent_skeletons: Mapping[str, bytes] | None, rec: dict[str, Any]) -> bytes:
    """The skeleton of manifest file ``rec`` from its stored ``blob`` (the inverse of :func:`compress_skeleton`;
    at most ``rec["size"]`` bytes)."""
    return zstandard.ZstdDecompressor(dict_data=_skeleton_dict(parent_skeletons, rec["name"])).decompress(
        blob, max_output_size=int(rec["size"])) if blob else b""


def encode_entry(cur: Decoded, parent: Decoded | None, *, step: int | None = None, depth: int = 0,
                 param_names: Sequence[str] | None = None, verify: bool = False, backward: bool = False,
                 runner: Any = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and manifest of ``cur``'s entry, coded against ``parent`` (None: a keyframe).

    Each tensor's prediction sees exactly the tensors :func:`decode_entry` has when it decodes it (those
    of earlier :func:`~tpde_hf.checkpoints.predict.stages`), so both sides compute it from the same
    inputs. With ``verify`` every tensor's payload is checked right after it is made (the decoder's inverse
    of every element, sampled chunks decoded and compared bit for bit: ``CheckpointDelta._verify``).
    ``backward``: ``parent`` is the *next later* checkpoint (a version-2 entry, whose features
    follow :func:`~tpde_hf.checkpoints.predict.options`' backward relations). ``runner(fn, items)``
    maps the tensors of one stage (default: in order on this thread; the callback's lets the waiting
    training thread help, see :mod:`~tpde_hf.checkpoints.assist`).
    """
    codec = TENSOR_CODECS.get(CODEC)
    out: dict[str, torch.Tensor] = {}
    prev = parent.tensors if parent is not None else None
    done: dict[str, torch.Tensor] = {}

    def one(key: str) -> dict[str, torch.Tensor]:
        opts = predict.options(key, done, prev, param_names, backward=backward)
        if verify:
            opts["verify"] = True
        ref = prev.get(key) if prev is not None else None
        return stored_parts(key, CODEC, codec.encode(cur.tensors[key], CodecContext(key, ref, opts)))

    for stage in predict.stages(list(cur.tensors)):
        big_first = sorted(stage, key=lambda k: -cur.tensors[k].numel())  # longest jobs first when shared
        for parts in (runner(one, big_first) if runner is not None else map(one, big_first)):
            out.update(parts)
        done.update((k, cur.tensors[k]) for k in stage)
    for i, f in enumerate(cur.manifest["files"]):
        blob = compress_skeleton(cur.skeletons[f["name"]], parent.skeletons if parent is not None else None, f["name"])
        out[f"skeleton.{i}"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return out, entry_manifest(cur, parent, step=step, depth=depth, param_names=param_names, backward=backward)


def entry_manifest(cur: Decoded, parent: Decoded | None, *, step: int | None, depth: int,
                   param_names: Sequence[str] | None, backward: bool) -> dict[str, Any]:
    """The manifest of ``cur``'s entry coded against ``parent`` (None: a keyframe, depth 0)."""
    return {"format": FORMAT, "version": BACKWARD_VERSION if backward else VERSION, "name": cur.name, "step": step,
            "parent": parent.name if parent is not None else None, "depth": depth if parent is not None else 0,
            "param_names": list(param_names) if param_names else None, "files": cur.manifest["files"]}


def write_entry(path: Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any], checked: bool = False,
                runner: Any = None) -> str | None:
    """Write an entry file at ``path`` (through a temporary name in the same folder), on disk (``fsync``) when it
    returns.

    ``checked``: ``path`` is the caller's temporary name, written in place piece by piece, each piece compared with
    the bytes meant right after it is written while the next is written
    (:func:`~tpde_hf.checkpoints.entry_file.write_checked_file`, mapped with ``runner``); returns None, or what
    differs."""
    if checked:
        return write_checked_file(path, tensors, {FORMAT: json.dumps(manifest)}, runner)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, "wb") as f:  # save_file's bytes, the writeback started as it goes (entry_file)
            write_tensors(f, tensors, {FORMAT: json.dumps(manifest)})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return None


def check_entry(path: Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any], cur: Decoded,
                parent: Decoded | None) -> None:
    """Check that the entry on disk holds exactly ``tensors`` and ``manifest`` and that its skeletons and
    ranges rebuild every file of ``cur`` to its recorded hash; :class:`TpdeFormatError` if not.

    With ``encode_entry(..., verify=True)`` (each payload checked) this proves the entry decodes to
    the original files without decoding it a second time.
    """
    if read_manifest(path) != json.loads(json.dumps(manifest)):
        raise TpdeFormatError(str(path), "entry manifest on disk differs from the one written")
    try:
        with safe_open(str(path), "pt") as f:
            if set(f.keys()) != set(tensors):
                raise TpdeFormatError(str(path), "entry on disk does not hold the tensors written")
            for k, v in tensors.items():
                got = f.get_tensor(k)
                if got.dtype != v.dtype or got.shape != v.shape or not np.array_equal(
                        _bytes(got), _bytes(v)):
                    raise TpdeFormatError(str(path), f"part {k} on disk differs from the one written")
    except SafetensorError as exc:
        raise TpdeFormatError(str(path), f"entry unreadable after writing ({exc})") from None
    for i, rec in enumerate(manifest["files"]):
        blob = _bytes(tensors[f"skeleton.{i}"]).tobytes()
        if skeleton_bytes(blob, parent.skeletons if parent is not None else None, rec) != cur.skeletons[rec["name"]]:
            raise TpdeFormatError(str(path), f"skeleton of {rec['name']} does not decompress to the original")
        file_digest(cur, rec["name"])


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of an entry file; :class:`TpdeFormatError` naming the file if it is not one."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        manifest = json.loads(meta[FORMAT])
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise TpdeFormatError(str(path), f"not a readable tpde checkpoint entry ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") not in VERSIONS:
        raise TpdeFormatError(str(path), "not a tpde checkpoint entry of a known version")
    return manifest


def decode_entry(path: Path, parent: Decoded | None, threads: int | None = None) -> Decoded:
    """Decode one entry against its decoded parent (None for a keyframe).

    Its tensors are decoded on ``threads`` threads at once (default: numba's thread count), largest first,
    each as soon as the tensors it reads are there (:mod:`~tpde_hf.checkpoints.chain`); the kernels and numpy
    release the GIL.
    """
    from tpde_hf.checkpoints.chain import decode_links

    return decode_links([Path(path)], parent, threads)


def _unbuildable(label: str, why: object) -> TpdeFormatError:
    return TpdeFormatError(label, f"cannot be rebuilt ({why})")


def _file_plan(label: str, rec: dict[str, Any], skeleton: bytes) -> tuple[list[tuple[np.ndarray, str, int]],
                                                                            np.ndarray]:
    """File ``rec``'s layout, checked against its skeleton: ``([(skeleton gap before a tensor, its key, its
    bytes)], the skeleton's tail)``; :class:`TpdeFormatError` (naming ``label``) where they do not fit."""
    try:
        src, size = np.frombuffer(skeleton, np.uint8), int(rec["size"])
        plan: list[tuple[np.ndarray, str, int]] = []
        done = pos = 0
        for key, offset, nbytes, _ in rec["ranges"]:
            gap = offset - done
            if gap < 0 or pos + gap > src.size or offset + nbytes > size:
                raise ValueError(f"range of {key} is outside the file")
            plan.append((src[pos:pos + gap], key, nbytes))
            pos += gap
            done = offset + nbytes
        if src.size - pos != size - done:
            raise ValueError("skeleton length does not match the file size")
    except (KeyError, ValueError, TypeError) as exc:
        raise _unbuildable(label, exc) from None
    return plan, src[pos:]


def _tensor_bytes(label: str, key: str, t: torch.Tensor | None, nbytes: int) -> np.ndarray:
    if t is None:
        raise _unbuildable(label, f"no tensor {key}")
    if t.dtype not in _INT_T:
        raise _unbuildable(label, f"tensor {key} is {t.dtype}")
    data = t.view(_INT_T[t.dtype]).numpy().view(np.uint8).reshape(-1)
    if data.size != nbytes:
        raise _unbuildable(label, f"tensor {key} has {data.size} bytes, the file {nbytes}")
    return data


def file_pieces(label: str, rec: dict[str, Any], skeleton: bytes,
                tensor: Callable[[str], torch.Tensor | None]) -> Iterator[np.ndarray]:
    """File ``rec``'s bytes in file order as views (skeleton gaps and tensor data). The layout is checked at the
    call; each tensor is got from ``tensor(key)`` (None: missing) only when the file reaches it, so a file can be
    written while its later tensors still decode. :class:`TpdeFormatError` (naming ``label``) where the record,
    the skeleton and the tensors do not fit together; an error that ``tensor`` raises passes through as it is.

    Example::

        h = xxhash.xxh3_64()
        for piece in file_pieces("ckpt/model.safetensors", rec, dec.skeletons[rec["name"]], dec.tensors.get):
            h.update(piece)
    """
    plan, tail = _file_plan(label, rec, skeleton)

    def pieces() -> Iterator[np.ndarray]:
        for gap, key, nbytes in plan:
            yield gap
            yield _tensor_bytes(label, key, tensor(key), nbytes)
        yield tail

    return pieces()


def _pieces(dec: Decoded, name: str) -> tuple[dict[str, Any], str, Iterator[np.ndarray]]:
    """The record of file ``name``, its label for errors and its bytes as views (:func:`file_pieces`)."""
    rec = next((r for r in dec.manifest["files"] if r["name"] == name), None)
    if rec is None:
        raise TpdeFormatError(name, f"not a file of checkpoint {dec.name}")
    label = f"{dec.name}/{name}"
    return rec, label, file_pieces(label, rec, dec.skeletons[name], dec.tensors.get)


def _mismatch(label: str) -> TpdeFormatError:
    return TpdeFormatError(label, "rebuilt file does not match its recorded hash (corrupt checkpoint entry)")


def file_digest(dec: Decoded, name: str) -> None:
    """Check file ``name`` of a decoded checkpoint against its recorded hash without assembling it."""
    rec, label, pieces = _pieces(dec, name)
    h = xxhash.xxh3_64()
    for p in pieces:
        h.update(p)
    if h.hexdigest() != rec["xxh3"]:
        raise _mismatch(label)


def rebuild(dec: Decoded, name: str) -> memoryview:
    """File ``name`` of a decoded checkpoint, byte for byte; :class:`TpdeFormatError` if its hash differs."""
    rec, label, pieces = _pieces(dec, name)
    out = np.concatenate(list(pieces))
    if file_hash(out) != rec["xxh3"]:
        raise _mismatch(label)
    return memoryview(out)


def write_pieces(label: str, rec: dict[str, Any], pieces: Iterator[np.ndarray], path: Path) -> None:
    """Write ``pieces`` (file ``rec``'s bytes) to ``path``, hashed on the way (no assembled copy); moved into place
    only if the hash is the recorded one (else :class:`TpdeFormatError` naming ``label``, and no file)."""
    h = xxhash.xxh3_64()
    with atomic_file(path) as f:
        for p in pieces:
            h.update(p)
            f.write(p)
        if h.hexdigest() != rec["xxh3"]:  # raised inside the block: the old file stays, no temporary is left
            raise _mismatch(label)


def write_file(dec: Decoded, name: str, path: Path) -> None:
    """Write file ``name`` of a decoded checkpoint to ``path`` (:func:`write_pieces`)."""
    rec, label, pieces = _pieces(dec, name)
    write_pieces(label, rec, pieces, path)


def entry_path(root: Path, name: str) -> Path:
    return Path(root) / f"{name}.tpde"


def raw_path(root: Path, name: str) -> Path:
    """Where the store holds checkpoint ``name``'s files as Trainer wrote them (hard links)."""
    return Path(root) / f"{name}{RAW_SUFFIX}"


def raw_source(root: Path, name: str) -> Path | None:
    """The plain files of checkpoint ``name``: its held raw folder, else its own unpacked folder, else None."""
    held = raw_path(root, name)
    if held.is_dir():
        return held
    own = Path(root).parent / name
    if own.is_dir() and not (own / POINTER).exists() and any(own.iterdir()):
        return own
    return None


def links(root: Path, name: str) -> tuple[list[Path], Path | None]:
    """The entries to decode for ``name``, in decoding order, and the plain folder the first one is coded
    against (None: it is a keyframe). A backward chain ends at a later checkpoint's plain files; a
    forward one at a keyframe. :class:`TpdeFormatError` if a link is missing or the chain loops.

    A held raw folder wins over an entry of the same checkpoint (a crash between writing the entry and
    dropping the hold leaves both, and they hold the same bytes): it needs no decoding.
    """
    out, seen = [], set()
    cur: str | None = name
    while cur is not None:
        p = entry_path(root, cur)
        held = raw_path(root, cur)
        if held.is_dir() or not p.exists():
            raw = held if held.is_dir() else raw_source(root, cur)
            if raw is None:
                raise TpdeFormatError(str(p), f"missing: checkpoint {name} needs it (its chain is broken)")
            return out[::-1], raw
        if cur in seen:
            raise TpdeFormatError(str(p), "checkpoint chain loops (corrupt manifest)")
        seen.add(cur)
        out.append(p)
        cur = read_manifest(p).get("parent")
    return out[::-1], None


def chain(root: Path, name: str) -> list[Path]:
    """Entry files from the keyframe (or the plain checkpoint a backward chain ends at) to ``name``."""
    return links(root, name)[0]


def raw_name(root: Path, raw: Path) -> str:
    """The checkpoint name of a plain folder a chain ends at (a held ``<name>.raw`` or the folder itself)."""
    return raw.name[: -len(RAW_SUFFIX)] if raw.parent == Path(root) and raw.name.endswith(RAW_SUFFIX) else raw.name


def decode_chain(root: Path, name: str, cache: Decoded | None = None) -> Decoded:
    """Decode checkpoint ``name``: read the plain files its chain ends at (if any), then decode every link
    (starting from ``cache`` if it is on the chain)."""
    paths, raw = links(root, name)
    names = [p.name[: -len(".tpde")] for p in paths]
    dec: Decoded | None = None
    if cache is not None and cache.name in names:
        start, dec = names.index(cache.name) + 1, cache
    elif raw is not None and cache is not None and cache.name == raw_name(root, raw):
        start, dec = 0, cache
    else:
        start = 0
        if raw is not None:  # the plain end of a backward chain; its file hashes are needed only if it is the result
            dec = read_checkpoint(raw, name=raw_name(root, raw), hash_files=not paths)
    if paths[start:]:
        from tpde_hf.checkpoints.chain import decode_links

        dec = decode_links(paths[start:], dec)  # every link as one graph of tensor jobs
    assert dec is not None
    return dec


def entries(root: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(name, manifest)`` of every entry in the store, oldest step first."""
    found = []
    for p in Path(root).glob("*.tpde"):
        try:
            found.append((p.name[:-5], read_manifest(p)))
        except TpdeFormatError:
            continue
    yield from sorted(found, key=lambda e: (e[1].get("step") is None, e[1].get("step") or 0, e[0]))

